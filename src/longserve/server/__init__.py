"""OpenAI-compatible HTTP serving over the continuous-batching engine (and, with a draft, a batch-1
speculative decoder; see `server.speculative`).

`create_app(llm, ...)` builds the FastAPI app (`create_multi_app(ModelRegistry(...))`: several models
behind one server); `longserve serve` runs it with uvicorn. Exports load
lazily so that building the CLI parser (which imports `longserve.server.cli`) stays fast.
"""

from importlib import import_module

_EXPORTS = {
    "create_app": "app",
    "create_multi_app": "multi_app",
    "ModelRegistry": "registry",
    "AsyncEngine": "async_engine",
    "BackgroundServer": "background",
    "KVPlan": "kv_plan",
    "plan_kv": "kv_plan",
    "SpeculativeEngine": "speculative",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'longserve.server' has no attribute '{name}'")
    return getattr(import_module(f"longserve.server.{_EXPORTS[name]}"), name)
