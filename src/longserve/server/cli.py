"""`longserve serve`: the OpenAI-compatible server (registered into the main CLI by `longserve.cli`)."""

from __future__ import annotations

import argparse
import os
import sys

from longserve.cli import (
    add_dtype_args,
    add_policy_args,
    check_dtype,
    policy_kwargs,
    require_positive,
)

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(sub) -> None:
    from longserve.zoo import DEFAULT_MODEL

    p: argparse.ArgumentParser = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server (continuous batching, KV compression, /metrics)"
    )
    p.add_argument(
        "--model",
        action="append",
        help=f"zoo name, HF directory or .gguf file (default {DEFAULT_MODEL}); repeat it to serve several "
        "models (each named by its last path component)",
    )
    p.add_argument("--served-model-name", help="model id clients use (default: --model)")
    g = p.add_argument_group(
        "several models (a request's 'model' picks one; 'auto' routes by rules and prompt embeddings)"
    )
    g.add_argument("--models", metavar="TOML", help="experts file: name, model, description, examples, rules")
    g.add_argument(
        "--max-weight-memory",
        metavar="SIZE",
        help="weight budget (e.g. 4GiB): the least recently used models are parked to stay within it "
        "(default: every model resident)",
    )
    g.add_argument("--default-model", metavar="NAME", help="model for requests without one: a name or auto")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: $LONGSERVE_API_KEY)"
    )
    p.add_argument("--max-kv-memory", help="KV cache budget: bytes (4GiB, 512MB) or tokens (65536tok)")
    p.add_argument(
        "--max-model-len", type=int, help="prompt + output tokens per request (default: context window)"
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        help="most sequences decoded together (KV slots); default: all that --max-kv-memory holds "
        "(up to 256), or 8 without it",
    )
    p.add_argument(
        "--max-waiting", type=int, default=128, help="queued requests beyond which 429 is returned"
    )
    p.add_argument("--default-max-tokens", type=int, help="max_tokens when a request gives none")
    p.add_argument("--prefill-chunk", type=int, default=4096, help="prompt tokens per prefill step when idle")
    p.add_argument(
        "--max-step-tokens",
        type=int,
        default=512,
        help="prompt tokens a prefill step may run while other requests decode (bounds their stalls)",
    )
    p.add_argument(
        "--prefix-cache-memory",
        help="reuse the KV of repeated prompt prefixes (full policy) within this size, e.g. 1GiB",
    )
    p.add_argument(
        "--max-request-bytes", type=int, default=4 << 20, help="larger request bodies get 413 (default 4 MiB)"
    )
    add_dtype_args(p)
    p.add_argument("--threads", type=int)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_policy_args(p)
    g = p.add_argument_group(
        "speculative decoding (a draft proposes tokens, the target verifies them)",
        "Batch 1: speculative requests run one at a time (FIFO), outside the continuous batch, because every "
        "sequence has its own draft/verify rounds and accepted lengths. Lower latency per stream, less "
        'throughput under load; a request may opt out with the body field "speculative": false. Cannot be '
        "combined with --prefill-draft yet.",
    )
    g.add_argument(
        "--draft",
        metavar="MODEL",
        help="draft model for speculative decoding (must share the target's tokenizer)",
    )
    g.add_argument(
        "--num-draft-tokens",
        type=int,
        default=4,
        metavar="K",
        help="draft tokens per verification (start value; adapts to acceptance) (default 4)",
    )
    from longserve.specprefill.cli import add_args as add_spec_prefill_args

    add_spec_prefill_args(p, keep_alias=False)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    import uvicorn

    from longserve.errors import InvalidParameterError
    from longserve.llm import LLM
    from longserve.server.app import create_app
    from longserve.specprefill.cli import from_args
    from longserve.zoo import DEFAULT_MODEL

    # refuse bad combinations before any weights load
    if args.draft and args.prefill_draft:
        raise InvalidParameterError("--prefill-draft and --draft cannot be combined yet; use one of them")
    require_positive(
        threads=args.threads,
        num_draft_tokens=args.num_draft_tokens,
        max_step_tokens=args.max_step_tokens,
        max_request_bytes=args.max_request_bytes,
        max_batch_size=args.max_batch_size,
    )
    check_dtype(args)
    if args.prefix_cache_memory:
        from longserve.server.kv_plan import parse_byte_size

        parse_byte_size(args.prefix_cache_memory, "--prefix-cache-memory")
    if args.prefill_draft and not 0 < args.prefill_keep <= 1:
        raise InvalidParameterError(f"--prefill-keep must be in (0, 1], got {args.prefill_keep}")

    api_key = args.api_key or os.environ.get("LONGSERVE_API_KEY") or None
    if api_key is None and args.host not in _LOOPBACK:
        print(
            f"warning: serving on {args.host} without an API key; anyone who can reach it can use it",
            file=sys.stderr,
        )
    if args.models or (args.model and len(args.model) > 1) or args.max_weight_memory or args.default_model:
        from longserve.server.multi_cli import serve_several

        return serve_several(args, api_key)
    llm = LLM(
        args.model[0] if args.model else DEFAULT_MODEL,
        dtype=args.dtype,
        weights=args.weights,
        **({"max_batch_size": args.max_batch_size} if args.max_batch_size else {}),
        prefill_chunk=args.prefill_chunk,
        threads=args.threads,
        draft=args.draft,
        num_draft_tokens=args.num_draft_tokens,
        prefix_cache=args.prefix_cache_memory,
        **policy_kwargs(args),
    )
    spec_prefill = from_args(args)
    app = create_app(
        llm,
        served_model_name=args.served_model_name,
        max_model_len=args.max_model_len,
        max_batch_size=args.max_batch_size,
        max_kv_memory=args.max_kv_memory,
        max_waiting=args.max_waiting,
        default_max_tokens=args.default_max_tokens,
        api_key=api_key,
        spec_prefill=spec_prefill,
        max_step_tokens=args.max_step_tokens,
        max_request_bytes=args.max_request_bytes,
    )
    state = app.state.server
    plan = state.plan
    extras = ""
    if state.spec is not None:
        extras += (
            f" | speculative decoding: draft '{state.spec.draft_name}', k={args.num_draft_tokens} "
            "(batch 1: one request at a time)"
        )
    if spec_prefill is not None:
        extras += (
            f" | speculative prefill: draft '{state.prefill.draft_name}', keep {spec_prefill.config.keep:g}"
        )
    print(
        f"serving '{state.model_id}' at http://{args.host}:{args.port}/v1 | {plan.describe()}"
        f"{extras}{' | API key required' if api_key else ''}",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
