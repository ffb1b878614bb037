"""`longserve serve` with several models: `--model a --model b`, `--models experts.toml`,
`--max-weight-memory`, `--default-model NAME|auto` (see `server.registry` for how they are served)."""

from __future__ import annotations

import sys
from pathlib import Path

from longserve.cli import policy_kwargs
from longserve.coe.experts import Expert, load_experts
from longserve.errors import InvalidParameterError
from longserve.server.kv_plan import parse_byte_size, parse_kv_memory


def expert_name(model: str) -> str:
    """An expert named after its `--model`: the zoo name, or a path's last component (no .gguf)."""
    name = Path(model.rstrip("/")).name or model
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def experts_of(args) -> list[Expert]:
    if args.models and args.model:
        raise InvalidParameterError("give the models with --models FILE or with --model, not both")
    if args.models:
        return load_experts(args.models)
    from longserve.zoo import DEFAULT_MODEL

    models = args.model or [DEFAULT_MODEL]
    experts = [Expert(expert_name(m), m, dtype=args.dtype) for m in models]
    names = [e.name for e in experts]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise InvalidParameterError(
            f"several --model arguments are named {', '.join(dup)}: use an experts file (--models) "
            "to name them"
        )
    return experts


def check_flags(args) -> None:
    """What a several-model server does not do yet, refused before any weights load."""
    for flag, value in (
        ("--draft", args.draft),
        ("--prefill-draft", args.prefill_draft),
        ("--prefix-cache-memory", args.prefix_cache_memory),
        ("--served-model-name", args.served_model_name),
    ):
        if value:
            raise InvalidParameterError(
                f"{flag} is not supported with several models yet"
                + (
                    " (each expert is named by --models or its --model)"
                    if flag == "--served-model-name"
                    else ""
                )
            )
    if args.max_kv_memory:
        parse_kv_memory(args.max_kv_memory)


def build_registry(args, build=None):
    """The registry `longserve serve` would serve (not started: `create_multi_app` starts it)."""
    from longserve.server.registry import ModelRegistry
    from longserve.server.resident import ServeSettings

    check_flags(args)
    experts = experts_of(args)
    budget = (
        parse_byte_size(args.max_weight_memory, "--max-weight-memory") if args.max_weight_memory else None
    )
    if build is None:
        import dataclasses

        from longserve.coe import AttachLoader

        # tier 1: a parked expert re-attaches by mapping its weights file (no reload, no conversion)
        loader = AttachLoader(
            **({"max_batch_size": args.max_batch_size} if args.max_batch_size else {}),
            prefill_chunk=args.prefill_chunk,
            threads=args.threads,
            **policy_kwargs(args),
        )

        def build(expert: Expert):
            if expert.weights == "auto" and args.weights not in (None, "auto"):
                expert = dataclasses.replace(expert, weights=args.weights)
            return loader(expert)

    settings = ServeSettings(
        max_model_len=args.max_model_len,
        max_batch_size=args.max_batch_size,
        max_kv_memory=args.max_kv_memory,
        max_waiting=args.max_waiting,
        default_max_tokens=args.default_max_tokens,
        max_step_tokens=args.max_step_tokens,
    )
    return ModelRegistry(
        experts, build, max_weight_memory=budget, settings=settings, default_model=args.default_model
    )


def serve_several(args, api_key: str | None) -> int:
    import uvicorn

    from longserve.server.multi_app import create_multi_app

    registry = build_registry(args)
    app = create_multi_app(registry, api_key=api_key, max_request_bytes=args.max_request_bytes)
    print(
        f"serving {', '.join(repr(n) for n in registry.experts)} at http://{args.host}:{args.port}/v1"
        f"{' | API key required' if api_key else ''}\n{registry.describe()}",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
