"""`make demo`'s prompt under `sage` on SmolLM2-135M-Instruct (issue 15, item 3): with the paper's
single last-token query the selection loses the answer's surname and, once the ring has overwritten the
question's tokens, the answer degenerates ("Ilse V. V. V. V."); eight queries answer it."""

import pytest

from longserve.demo import EXPECTED, QUESTION, document
from longserve.kv.policies import make_policy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def llm():
    from longserve import LLM

    return LLM("smollm2-135m-instruct", progress=False)


def answer(llm, policy) -> str:
    messages = [{"role": "user", "content": f"{document()}\n\nQuestion: {QUESTION}"}]
    return llm.generate(messages, max_new_tokens=24, kv_policy=policy)[0].text


def test_single_query_sage_degenerates_on_the_demo(llm):
    text = answer(llm, make_policy("sage", budget=256, n_queries=1))
    assert EXPECTED not in text and "V. V. V." in text, text


def test_sage_answers_the_demo(llm):
    text = answer(llm, make_policy("sage", budget=256))
    assert EXPECTED in text and "V. V." not in text, text
