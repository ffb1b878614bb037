"""longserve: long-context LLM inference on a memory budget."""

from longserve.errors import LongserveError

__version__ = "0.1.0"
__all__ = ["LLM", "CompressedContext", "LongserveError", "SamplingParams", "__version__"]


def __getattr__(name: str):  # lazy: `longserve --help` should not pay for importing torch
    if name == "LLM":
        from longserve.llm import LLM

        return LLM
    if name == "CompressedContext":
        from longserve.context import CompressedContext

        return CompressedContext
    if name == "SamplingParams":
        from longserve.engine.sampler import SamplingParams

        return SamplingParams
    raise AttributeError(name)
