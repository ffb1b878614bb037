"""Grammar-constrained decoding end to end: a random tiny model (which left alone emits byte noise) can
only produce JSON that matches the schema, greedy or hot, and ends on EOS when the JSON is complete."""

from __future__ import annotations

import json

import pytest

from longserve.engine.grammar import json_grammar
from longserve.errors import InvalidParameterError
from longserve.llm import LLM
from tests.tiny import tiny_loaded

pytest.importorskip("llguidance")

SCHEMA = {
    "type": "object",
    "properties": {
        "n": {"type": "integer", "minimum": -50, "maximum": 999},
        "ok": {"type": "boolean"},
        "tag": {"enum": ["a", "b"]},
    },
    "required": ["n", "ok", "tag"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(loaded=tiny_loaded("llama")[0], max_batch_size=4, prefill_chunk=64)


def test_unconstrained_output_is_not_json(llm):
    """The premise: without the grammar this model does not write JSON (so the tests below can fail)."""
    out = llm.generate(["{", "x"], temperature=1.0, seed=3, max_new_tokens=40)
    for completion in out:
        with pytest.raises(json.JSONDecodeError):
            json.loads(completion.text)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_parses_and_matches(llm, temperature):
    grammar = json_grammar(SCHEMA, llm.loaded)
    prompts = ["hello", "give me json", "zzz", "1 2 3"]
    out = llm.generate(prompts, temperature=temperature, seed=11, max_new_tokens=200, grammar=grammar)
    for completion in out:
        assert completion.finish_reason == "stop", completion.text
        value = json.loads(completion.text)
        assert set(value) == {"n", "ok", "tag"}
        assert (
            isinstance(value["n"], int)
            and -50 <= value["n"] <= 999
            and isinstance(value["ok"], bool)
            and value["tag"] in ("a", "b")
        )


def test_json_object_mode_gives_an_object(llm):
    out = llm.generate(
        "x", temperature=1.0, seed=5, max_new_tokens=300, grammar=json_grammar(None, llm.loaded)
    )
    assert out[0].finish_reason == "stop" and isinstance(json.loads(out[0].text), dict)


@pytest.mark.parametrize(
    "schema", [{"type": "nonsense"}, {"type": "object", "properties": {"a": {"$ref": "#/x"}}}]
)
def test_a_schema_it_cannot_follow_is_refused_before_generating(llm, schema):
    with pytest.raises(InvalidParameterError, match="schema"):
        json_grammar(schema, llm.loaded)
