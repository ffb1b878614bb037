"""Incremental detokenization: streamed pieces and final text equal decoding the whole output every step."""

import pytest

from longserve.engine.sampler import SamplingParams
from longserve.kv.policies import FullPolicy
from longserve.llm import LLM
from tests.tiny import ByteTokenizer, tiny_loaded


class WordTokenizer(ByteTokenizer):
    """SentencePiece-like: every id is a word and decoding joins words with spaces, so the first token of
    any decoded slice loses its leading space (a decoder that only decodes new tokens drops spaces)."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(f"w{i}" for i in ids if i < 256)


def whole_output_reference(tok, ids: list[int], params: SamplingParams, eos: int) -> tuple[list[str], str]:
    """The straightforward way: decode all output ids at every step (O(n^2) in the output length)."""
    text, pieces = "", []
    for k in range(1, len(ids) + 1):
        is_eos = ids[k - 1] == eos and not params.ignore_eos
        current = tok.decode(ids[: k - 1] if is_eos else ids[:k])
        if current.endswith("\ufffd") and not is_eos:
            current = text
        reason = "stop" if is_eos else None
        for stop in params.stop:
            cut = current.find(stop)
            if cut != -1:
                current, reason = current[:cut], "stop"
        pieces.append(current[len(text) :])
        text = current
        if reason or k >= params.max_new_tokens:
            break
    return pieces, text


def run(llm: LLM, params: SamplingParams) -> tuple[list[int], list[str], str]:
    prompt = list(range(32, 96))
    engine = llm.engine(1, FullPolicy().capacity(len(prompt), params.max_new_tokens))
    seq = engine.add_request(prompt, params, FullPolicy())
    pieces = []
    while engine.has_unfinished():
        pieces += [out.new_text for out in engine.step()]
    return seq.output_ids, pieces, seq.text


@pytest.mark.parametrize("tokenizer", [ByteTokenizer(), WordTokenizer()], ids=["bytes", "words"])
def test_streamed_pieces_equal_whole_output_decoding(tokenizer):
    loaded, _ = tiny_loaded("llama", seed=3)
    loaded.tokenizer = tokenizer
    llm = LLM(loaded=loaded)
    params = SamplingParams(max_new_tokens=160, ignore_eos=True)
    ids, pieces, text = run(llm, params)
    expected_pieces, expected_text = whole_output_reference(
        tokenizer, ids, params, ByteTokenizer.eos_token_id
    )
    assert pieces == expected_pieces and text == expected_text == "".join(pieces)
    if type(tokenizer) is ByteTokenizer:
        assert "\ufffd" in text  # random bytes: invalid and split UTF-8 sequences were exercised

    # a stop string that spans tokens cuts where it first appears, as whole-output decoding does
    stop = text[len(text) // 2 - 3 : len(text) // 2 + 3]
    cut_params = SamplingParams(max_new_tokens=160, ignore_eos=True, stop=[stop, "never-generated"])
    cut_ids, cut_pieces, cut_text = run(llm, cut_params)
    expected_pieces, expected_text = whole_output_reference(
        tokenizer, cut_ids, cut_params, ByteTokenizer.eos_token_id
    )
    assert cut_text == expected_text == text[: text.find(stop)]
    assert cut_pieces[:-1] == expected_pieces[:-1] and len(cut_ids) < len(ids)
