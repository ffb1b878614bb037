"""`longserve proxy`: the compressing OpenAI-compatible proxy (registered into the main CLI via `register`)."""

from __future__ import annotations

import argparse
import os
import sys

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(sub) -> None:
    from longserve.zoo import DEFAULT_MODEL

    p: argparse.ArgumentParser = sub.add_parser(
        "proxy",
        help="OpenAI-compatible proxy that prunes long prompts (speculative prefill) for any upstream",
    )
    p.add_argument("--upstream", required=True, help="upstream base URL, e.g. http://127.0.0.1:8080/v1")
    # `--prefill-draft`/`--prefill-keep` as in `longserve generate` and `serve`; the proxy has no other draft
    p.add_argument(
        "--draft",
        "--prefill-draft",
        dest="draft",
        default=DEFAULT_MODEL,
        help="draft model scoring the prompt (zoo name, HF dir, .gguf)",
    )
    p.add_argument(
        "--keep",
        "--prefill-keep",
        dest="keep",
        type=float,
        default=0.25,
        help="fraction of the long messages' tokens kept, in (0, 1]",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument(
        "--min-tokens", type=int, default=1024, help="messages shorter than this are never compressed"
    )
    p.add_argument(
        "--roles", default="user,tool", help="comma-separated roles whose messages may be compressed"
    )
    p.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' from clients (default: $LONGSERVE_API_KEY)"
    )
    p.add_argument(
        "--upstream-api-key",
        help="API key sent to the upstream (default: forward the client's, "
        "when the proxy has no key of its own)",
    )
    p.add_argument(
        "--tokenizer",
        help="the upstream model's tokenizer (zoo name or HF dir) to state keep rates "
        "and sizes in its tokens (default: the draft's)",
    )
    p.add_argument("--keep-tail", type=int, default=64, help="last draft tokens of a prompt always kept")
    p.add_argument("--chunk", type=int, default=32, help="selection granularity (draft tokens)")
    p.add_argument("--lookahead", type=int, default=8, help="draft decode steps whose attention votes")
    p.add_argument("--delimiter", default=" [...] ", help="what replaces each dropped gap")
    p.add_argument("--timeout", type=float, default=600.0, help="upstream timeout (s)")
    p.add_argument("--threads", type=int, help="torch threads for the draft")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="the draft's weights (bfloat16 scores 2-3x faster on CPUs with AVX512-BF16)",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_proxy)


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    from longserve import zoo

    return AutoTokenizer.from_pretrained(zoo.resolve(name, progress=True))


def cmd_proxy(args) -> int:
    import torch
    import uvicorn

    from longserve.llm import LLM
    from longserve.proxy.app import ProxyConfig, create_proxy_app
    from longserve.specprefill import SpecPrefillConfig, SpeculativePrefill

    if args.threads:
        torch.set_num_threads(args.threads)
    roles = tuple(r.strip() for r in args.roles.split(",") if r.strip())
    api_key = args.api_key or os.environ.get("LONGSERVE_API_KEY") or None
    config = ProxyConfig(
        args.upstream,
        keep=args.keep,
        min_tokens=args.min_tokens,
        roles=roles,
        api_key=api_key,
        upstream_api_key=args.upstream_api_key,
        timeout_s=args.timeout,
    )
    sp_config = SpecPrefillConfig(
        keep=args.keep,
        chunk=args.chunk,
        lookahead=args.lookahead,
        keep_tail=args.keep_tail,
        delimiter=args.delimiter,
    )
    if api_key is None and args.host not in _LOOPBACK:
        print(
            f"warning: proxying on {args.host} without an API key; anyone who can reach it can use the upstream",
            file=sys.stderr,
        )
    draft = LLM(args.draft, dtype=args.dtype)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    app = create_proxy_app(config, SpeculativePrefill(draft, sp_config), target_tokenizer=tokenizer)
    print(
        f"proxy at http://{args.host}:{args.port}/v1 -> {config.upstream} | draft '{args.draft}', keep "
        f"{args.keep:g} of {','.join(roles)} messages >= {args.min_tokens} tokens"
        f"{' | API key required' if api_key else ''}",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
