"""dtype="auto": bf16 only where the CPU multiplies bf16 natively; explicit names are checked."""

from __future__ import annotations

import io

import pytest
import torch

from longserve import loader
from longserve.errors import InvalidParameterError
from longserve.llm import LLM
from tests.tiny import tiny_loaded


@pytest.mark.parametrize(
    "flags, native",
    [
        ("fpu vme sse avx2 avx512f avx512bw", False),
        ("fpu sse avx512f avx512_bf16 avx512_vnni", True),
        ("fpu sse amx_bf16 amx_tile", True),
        ("fpu neon asimd", False),
    ],
)
def test_native_bf16_reads_the_cpu_flags(flags, native, monkeypatch):
    real_open = open

    def fake_open(path, *a, **k):
        if path == "/proc/cpuinfo":
            return io.StringIO(f"processor\t: 0\nflags\t\t: {flags}\n")
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", fake_open)
    assert loader.native_bf16() is native
    assert loader.dtype_name("auto") == ("bfloat16" if native else "float32")
    assert loader.dtype_name("float32") == "float32"  # explicit names are never overridden


def test_no_cpuinfo_means_float32(monkeypatch):
    def no_proc(path, *a, **k):
        raise FileNotFoundError(path)

    monkeypatch.setattr("builtins.open", no_proc)
    assert loader.default_dtype() == "float32"


def test_unknown_dtype_names_the_choices():
    with pytest.raises(InvalidParameterError, match="dtype must be one of auto, float32, bfloat16, float16"):
        loader.dtype_name("fp64")
    with pytest.raises(InvalidParameterError, match="got 'bf16'"):
        LLM("no-such-model", dtype="bf16")  # refused before the model is looked up


def test_a_model_handed_in_keeps_its_dtype():
    loaded, _ = tiny_loaded("llama")
    assert LLM(loaded=loaded, progress=False).dtype == torch.float32
    loaded.model.to(torch.bfloat16)
    assert LLM(loaded=loaded, progress=False).dtype == torch.bfloat16
