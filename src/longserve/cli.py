"""`longserve` command line: models, generate, demo, compress/ask, eval, serve."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from longserve.errors import InvalidParameterError, LongserveError


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def add_policy_args(p: argparse.ArgumentParser) -> None:
    from longserve.kv.policies import known_policies

    p.add_argument("--kv-policy", default="full", help=f"one of: {', '.join(known_policies())}")
    p.add_argument("--kv-budget", type=int, help="tokens kept per sequence (sinks + selected + window)")
    p.add_argument("--kv-ratio", type=float, help="fraction of the prompt kept, in (0, 1]")
    p.add_argument("--kv-window", type=int, help="recent tokens always kept (policy default otherwise)")
    p.add_argument(
        "--kv-head-adaptive",
        action="store_true",
        help="AdaKV: one top-k over each layer's heads (same bytes; heads keep different counts)",
    )
    p.add_argument(
        "--kv-layer-budgets",
        help="uniform (default), global (one top-k over all layers: kvzip) or pyramid (more in lower "
        "layers): the same total bytes, layers keep different counts",
    )


def policy_kwargs(args) -> dict:
    out = {"kv_policy": args.kv_policy, "kv_budget": args.kv_budget, "kv_ratio": args.kv_ratio}
    if args.kv_window is not None:
        out["window"] = args.kv_window
    if args.kv_head_adaptive:
        out["head_adaptive"] = True
    if args.kv_layer_budgets:
        out["layer_budgets"] = args.kv_layer_budgets
    return out


def add_dtype_args(p: argparse.ArgumentParser) -> None:
    """`--dtype` and `--weights`, checked by `check_dtype` (not argparse `choices`: its error is a usage)."""
    p.add_argument(
        "--dtype",
        default="auto",
        help="auto (bfloat16 on CPUs with native bf16, e.g. AVX512-BF16/AMX; float32 elsewhere), "
        "float32, bfloat16 or float16",
    )
    p.add_argument(
        "--weights",
        default="auto",
        help="auto (dense, in --dtype), bf16, fp32, or int8/int4 (weight-only quantized linears, CPU)",
    )


def check_dtype(args) -> tuple[str, str]:
    """(dtype, weights) resolved, or the one-line error before any weights load."""
    from longserve.loader import dtype_and_weights

    try:
        return dtype_and_weights(args.dtype, args.weights)
    except InvalidParameterError as exc:
        raise InvalidParameterError(f"--{exc}") from None


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def cmd_models(args) -> int:
    from longserve import zoo

    if args.action == "list":
        rows = zoo.list_models()
        print(f"{'name':30} {'family':8} {'params':>7} {'context':>8}  {'license':12} cached")
        for r in rows:
            print(
                f"{r['name']:30} {r['family']:8} {r['params']:>7} {r['context_window']:>8}  "
                f"{r['license']:12} {'yes' if r['cached'] else 'no'}"
            )
        return 0
    if args.action == "verify":
        return verify_models(args.name)
    if not args.name:
        raise LongserveError("usage: longserve models pull NAME [--force]")
    path = zoo.pull(args.name, force=args.force)
    print(f"{args.name}: ready in {path}")
    return 0


def verify_models(name: str | None) -> int:
    """Re-hash every file of one cached model (or of all of them) against its manifest's sha256."""
    from longserve import zoo

    results = zoo.verify_cached(name)
    if not results:
        print(f"no models in {zoo.home() / 'models'}")
    failures = [err for _, err in results if err]
    for n, err in results:
        print(f"{n}: {'CORRUPT' if err else 'ok'}")
    if failures:
        raise LongserveError(failures[0] + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""))
    return 0


def require_positive(**flags: int | None) -> None:
    """Counts that must be >= 1 when given (`threads=-1` checks --threads): refused before weights load,
    since torch and the speculative decoder only reject them after the model is in memory."""
    for name, value in flags.items():
        if value is not None and value < 1:
            raise InvalidParameterError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def decode_text(data: bytes, source: str) -> str:
    """UTF-8 text with universal newlines (as text-mode reads give), or a one-line error naming the source:
    tokenizers need text, and a latin-1 or binary file otherwise fails with a traceback."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LongserveError(
            f"{source} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "convert it first, e.g. `iconv -f latin1 -t utf-8`"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_bytes(path: str, what: str, limit: int = -1) -> bytes:
    """The file's first ``limit`` bytes (all by default), or a one-line error naming it and the cause."""
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError as exc:
        raise LongserveError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def read_text(path: str, what: str) -> str:
    return decode_text(read_bytes(path, what), f"{what} {path}")


def read_prompt(args) -> str:
    if args.file:
        return read_text(args.file, "--file")
    if args.prompt is not None and args.prompt != "-":
        try:
            args.prompt.encode("utf-8")  # undecodable argv bytes arrive as lone surrogates
        except UnicodeEncodeError:
            raise LongserveError("the prompt argument is not UTF-8 text") from None
        return args.prompt
    if sys.stdin.isatty() and args.prompt is None:
        raise LongserveError("give a prompt as an argument, with --file PATH, or on stdin")
    stdin = getattr(sys.stdin, "buffer", None)  # bytes, so a bad encoding is our error, not a traceback
    return decode_text(stdin.read(), "stdin") if stdin is not None else sys.stdin.read()


def check_policy(args) -> None:
    """The --kv-* flags build a valid policy (cheap; the model is not needed)."""
    from longserve.kv.policies import make_policy

    kv = policy_kwargs(args)
    make_policy(kv.pop("kv_policy"), budget=kv.pop("kv_budget"), ratio=kv.pop("kv_ratio"), **kv)


def print_stats(stats: dict, out=sys.stderr) -> None:
    ttft = stats["ttft_s"]
    tps = stats["decode_tokens_per_s"]
    print(
        f"\n[prompt {stats['prompt_tokens']} tok | TTFT {ttft:.2f} s | decode "
        f"{tps:.1f} tok/s | KV {stats['kv_policy']}: {_human(stats['kv_bytes_final'])} held, "
        f"{_human(stats['kv_bytes_allocated'])} allocated, {stats['kv_tokens_final']} tok/layer, "
        f"ratio {stats['compression_ratio']:.1f}x]"
        if tps
        else f"\n[prompt {stats['prompt_tokens']} tok | TTFT {ttft:.2f} s | KV {_human(stats['kv_bytes_final'])}]",
        file=out,
    )


def cmd_generate(args) -> int:
    from longserve.engine.sampler import SamplingParams
    from longserve.llm import LLM
    from longserve.specprefill.cli import from_args, summary
    from longserve.specprefill.compress import with_stats

    # validate everything cheap before loading weights
    require_positive(threads=args.threads, num_draft_tokens=args.num_draft_tokens)
    check_dtype(args)
    SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed, args.stop)
    check_policy(args)
    text = read_prompt(args)
    spec_prefill = from_args(args)
    if spec_prefill and args.draft:
        raise LongserveError("--prefill-draft and --draft cannot be combined yet; use one of them")
    llm = LLM(
        args.model,
        dtype=args.dtype,
        weights=args.weights,
        draft=args.draft,
        num_draft_tokens=args.num_draft_tokens,
        compile=args.compile,
        **({"threads": args.threads} if args.threads is not None else {}),
    )
    prompt = [{"role": "user", "content": text}] if (llm.tokenizer.chat_template and not args.raw) else text
    kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
        **policy_kwargs(args),
    )
    stream = spec_prefill.stream(llm, prompt, **kwargs) if spec_prefill else llm.stream(prompt, **kwargs)
    last = None
    for out in stream:
        print(out.new_text, end="", flush=True)
        last = out
    print()
    stats = last.seq.stats()
    if spec_prefill:
        print(summary(last.seq.spec_prefill, args.prefill_draft), file=sys.stderr)
        stats = with_stats(stats, last.seq.spec_prefill)
    print_stats(stats)
    if args.draft:
        from longserve.spec import format_stats

        print(format_stats(stats), file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from longserve.demo import run_demo

    return run_demo(model=args.model, budget=args.kv_budget, policies=args.policies)


def cmd_compress(args) -> int:
    from longserve.llm import LLM

    text = read_text(args.context, "the context file")
    check_policy(args)
    out_dir = Path(args.out).parent
    if not out_dir.is_dir():
        raise LongserveError(f"cannot write --out {args.out}: {out_dir} is not a directory")
    llm = LLM(args.model)
    ctx = llm.compress(text, **policy_kwargs(args))
    ctx.save(args.out)
    print(
        f"compressed {ctx.n_context_tokens} tokens -> {ctx.fill} per layer ({_human(ctx.nbytes)}) in {args.out}"
    )
    return 0


def cmd_ask(args) -> int:
    from longserve.context import CompressedContext
    from longserve.llm import LLM

    read_bytes(args.context, "the context file", limit=1)  # readable, before the model loads
    require_positive(max_new_tokens=args.max_new_tokens)
    llm = LLM(args.model)
    ctx = CompressedContext.load(args.context, expected_fingerprint=llm.fingerprint)
    for question in args.question:
        answer = llm.ask(ctx, question, max_new_tokens=args.max_new_tokens)
        print(f"Q: {question}\nA: {answer.text.strip()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from longserve.zoo import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="longserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list, pull or verify (re-hash) zoo models")
    p.add_argument("action", choices=["list", "pull", "verify"])
    p.add_argument("name", nargs="?")
    p.add_argument("--force", action="store_true", help="re-download and re-convert")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("generate", help="generate from a prompt (argument, --file or stdin), streaming")
    p.add_argument("prompt", nargs="?")
    p.add_argument("--file")
    p.add_argument("--model", default=DEFAULT_MODEL, help="zoo name, HF directory or .gguf file")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    add_dtype_args(p)
    p.add_argument("--threads", type=int)
    p.add_argument("--draft", help="draft model for speculative decoding (must share the target's tokenizer)")
    p.add_argument("--num-draft-tokens", type=int, default=4, help="draft tokens per verification (adaptive)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (all policies but h2o, quest and adakv); slow first step",
    )
    add_sampling_args(p)
    add_policy_args(p)
    from longserve.specprefill.cli import add_args as add_spec_prefill_args

    add_spec_prefill_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="one long document, one question, answered under several KV policies")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--kv-budget", type=int, default=256)
    p.add_argument("--policies", default="full,streaming,snapkv,sage,snapstream")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("compress", help="compress a context once (query-agnostic) and save it")
    p.add_argument("context", help="text file")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=DEFAULT_MODEL)
    add_policy_args(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("ask", help="answer questions from a saved compressed context")
    p.add_argument("context", help="file written by `longserve compress`")
    p.add_argument("question", nargs="+")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=cmd_ask)

    for extra in ("eval", "server", "proxy", "distill", "icl"):
        try:
            module = __import__(f"longserve.{extra}.cli", fromlist=["register"])
        except ImportError:
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LongserveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
