"""Same-tokenizer path (original positions, exact at keep=1), cross-tokenizer text mapping, eval target."""

from __future__ import annotations

import pytest
import torch

from longserve.errors import ContextLengthError, InvalidParameterError
from longserve.eval.target import EvalRequest, Target
from longserve.specprefill import SpecPrefillConfig, SpeculativePrefill, same_tokenizer
from longserve.specprefill import prompt as P
from longserve.specprefill.eval_target import SpecPrefillTarget
from tests.specprefill.helpers import fast_tokenizer, text, tiny_llm

QUESTION = "\nWhat is the magic number? Answer with the number only."


@pytest.fixture(scope="module")
def byte_pair():
    """(target, draft): different tiny models, one (byte) tokenizer."""
    return tiny_llm("llama", 0), tiny_llm("qwen2", 1)


@pytest.fixture(scope="module")
def chat_pair():
    """(target, draft) sharing a fast BPE tokenizer with a ChatML template."""
    tok = fast_tokenizer("a")
    return tiny_llm("qwen2", 4, tok), tiny_llm("llama", 5, tok)


@pytest.fixture(scope="module")
def cross_pair():
    """(target, draft) with different tokenizers and templates: the text path."""
    return tiny_llm("qwen2", 4, fast_tokenizer("b")), tiny_llm("llama", 5, fast_tokenizer("a"))


def test_keep_one_is_exactly_the_full_prompt_greedy_output(byte_pair, chat_pair):
    target, draft = byte_pair
    prompt = text(60) + QUESTION
    sp = SpeculativePrefill(draft, SpecPrefillConfig(keep=1.0))
    full = target.generate(prompt, max_new_tokens=12)[0]
    ours = sp.generate(target, prompt, max_new_tokens=12)[0]
    assert ours.stats["spec_prefill"]["path"] == "same_tokenizer"
    assert ours.stats["spec_prefill"]["kept_tokens"] == len(target.encode(prompt))
    assert ours.token_ids == full.token_ids
    target, draft = chat_pair
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text(150) + QUESTION}]
    full = target.generate(messages, max_new_tokens=10)[0]
    ours = SpeculativePrefill(draft, keep=1.0).generate(target, messages, max_new_tokens=10)[0]
    assert ours.token_ids == full.token_ids


def test_same_tokenizer_keeps_original_positions_and_specials(chat_pair):
    target, draft = chat_pair
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text(300) + QUESTION}]
    sp = SpeculativePrefill(draft, SpecPrefillConfig(keep=0.25, keep_tail=16))
    cp = sp.compress(target, messages, roles=["user"])
    ids = target.encode(messages)
    assert cp.path == "same_tokenizer" and cp.original_tokens == len(ids)
    assert cp.positions == sorted(cp.positions) and cp.ids == [ids[p] for p in cp.positions]
    assert cp.positions[-16:] == list(range(len(ids) - 16, len(ids)))  # forced tail
    specials = set(target.tokenizer.all_special_ids)
    assert [t for t in cp.ids if t in specials] == [t for t in ids if t in specials]
    system_end = target.tokenizer.apply_chat_template(messages[:1], tokenize=False)
    n_system = len(target.tokenizer(system_end, add_special_tokens=False)["input_ids"])
    assert cp.positions[:n_system] == list(
        range(n_system)
    )  # template + the system turn (role not compressed)
    assert 0.2 < cp.ratio < 0.45
    # decoding continues at the ORIGINAL prompt length
    engine = target.engine(1, 600)
    seq = engine.add_request(
        cp.ids,
        __import__("longserve.engine.sampler", fromlist=["x"]).SamplingParams(4),
        target.policy(),
        positions=cp.positions,
    )
    engine.step()
    assert engine.pool.slots[seq.slot].next_pos == len(ids)
    out = sp.generate_compressed(target, [cp], max_new_tokens=4)[0]
    assert out.prompt_tokens == len(cp.ids) and out.stats["ttft_s"] >= out.stats["target_ttft_s"]


def test_everything_kept_maps_back_to_the_exact_text():
    tok = fast_tokenizer("a")
    raw = "  Leading spaces, naïve café ünïcode — and\ttabs\n\nthe quick brown fox " * 5 + " trailing  "
    r = P.render(tok, raw)
    assert P.rebuild(r, torch.ones(len(r.ids), dtype=torch.bool), " [...] ") == {-1: raw}
    messages = [
        {"role": "system", "content": " sys  "},
        {"role": "user", "content": raw},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "more\n" + raw},
    ]
    for kind in ("a", "b"):  # "b"'s template trims contents: spans are then the trimmed text
        r = P.render(fast_tokenizer(kind), messages)
        texts = P.rebuild(r, torch.ones(len(r.ids), dtype=torch.bool), " [...] ")
        expected = {i: m["content"] if kind == "a" else m["content"].strip() for i, m in enumerate(messages)}
        assert texts == expected


def test_kept_text_is_widened_to_whole_words():
    tok = fast_tokenizer("a")
    raw = "alpha beta gamma the magic number is 3837870 and the dog jumps over the lazy fox"
    r = P.render(tok, raw)
    start = raw.index("870")
    keep = torch.tensor([a >= start and b <= start + 3 for a, b in r.offsets])
    assert keep.any()
    assert "3837870" in P.rebuild(r, keep, " [...] ")[-1]
    assert "3837870" not in P.rebuild(r, keep, " [...] ", word_reach=0)[-1]
    assert P.rebuild(r, keep, " [...] ")[-1] == "[...] 3837870 [...]"


def test_cross_tokenizer_path(cross_pair):
    target, draft = cross_pair
    assert not same_tokenizer(target.tokenizer, draft.tokenizer)
    body = text(500)
    messages = [
        {"role": "system", "content": "You answer questions."},
        {"role": "user", "content": body + QUESTION},
    ]
    sp = SpeculativePrefill(draft, SpecPrefillConfig(keep=0.3, keep_tail=24, tolerance=0.1))
    cp = sp.compress(target, messages, roles=["user"])
    assert cp.path == "cross_tokenizer" and cp.messages[0] == messages[0] and cp.ids is None
    content = cp.messages[1]["content"]
    assert content.endswith(QUESTION.strip()) or content.endswith(QUESTION)  # forced tail, verbatim
    assert cp.within_tolerance and abs(cp.content_ratio - 0.3) <= 0.1 * 0.3
    assert cp.original_tokens == P.count_tokens(target.tokenizer, messages)
    assert cp.kept_tokens == P.count_tokens(target.tokenizer, cp.messages) < cp.original_tokens
    pieces = [p.strip() for p in content.split("[...]") if p.strip()]
    cursor = 0
    for piece in pieces:  # kept text is verbatim and in the original order
        found = (body + QUESTION).find(piece, cursor)
        assert found >= 0, piece
        cursor = found + len(piece)
    # keep=1.0 reproduces the messages exactly
    assert sp.compress(target, messages, keep=1.0).prompt == messages
    # roles: only user messages may change
    cp = sp.compress_text(messages, target, roles=["system"])
    assert cp.path == "passthrough" or cp.messages[1] == messages[1]
    out = sp.generate(target, messages, max_new_tokens=4)[0]
    assert out.stats["spec_prefill"]["path"] == "cross_tokenizer"


def test_raw_text_and_custom_delimiter(cross_pair):
    target, draft = cross_pair
    raw = text(400) + QUESTION
    cp = SpeculativePrefill(draft, keep=0.2, delimiter=" <cut> ", tolerance=0.2).compress_text(raw, target)
    assert isinstance(cp.text, str) and "<cut>" in cp.text and "[...]" not in cp.text
    assert cp.kept_tokens < cp.original_tokens


def test_query_agnostic_context(byte_pair, cross_pair):
    for target, draft in (byte_pair, cross_pair):
        sp = SpeculativePrefill(draft, keep=0.3, tolerance=0.2)
        cp = sp.compress_context(target, text(300), QUESTION)
        assert cp.kept_tokens < cp.original_tokens
        if cp.positions is not None:  # the question follows at its original positions
            n = cp.original_tokens
            tail = cp.positions[-5:]
            assert tail == list(range(n - 5, n))
        else:
            prompt = cp.messages[0]["content"] if cp.messages else cp.text
            assert prompt.endswith(QUESTION)


def test_short_prompts_pass_through_and_bad_input(byte_pair, cross_pair):
    target, draft = byte_pair
    sp = SpeculativePrefill(draft)
    cp = sp.compress(target, "short prompt")  # 12 tokens < one chunk of 32
    assert cp.path == "passthrough" and cp.ids == target.encode("short prompt") and cp.positions is None
    t2, d2 = cross_pair
    messages = [{"role": "user", "content": "hi there"}]
    cp = SpeculativePrefill(d2).compress(t2, messages)
    assert cp.path == "passthrough" and cp.prompt == messages and cp.ratio == 1.0
    for bad in (
        "",
        [],
        [{"role": "user", "content": ""}],
        [{"content": "x"}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    ):
        with pytest.raises(InvalidParameterError):
            sp.compress(target, bad)
    for keep in (0, 1.5, -1):
        with pytest.raises(InvalidParameterError):
            SpeculativePrefill(draft, keep=keep)
        with pytest.raises(InvalidParameterError):
            sp.compress(target, "x" * 100, keep=keep)
    with pytest.raises(InvalidParameterError):
        sp.compress_token_ids(target, [])
    with pytest.raises(ContextLengthError):  # original positions must fit the target's window
        sp.generate(target, "y" * 2040, max_new_tokens=64)


def test_eval_target(byte_pair):
    target, draft = byte_pair
    t = SpecPrefillTarget(target, draft, SpecPrefillConfig(keep=0.5))
    assert isinstance(t, Target) and t.name == "specprefill@0.5"
    reqs = [EvalRequest(text(80), QUESTION, 3), EvalRequest(text(80), QUESTION, 3, setting="query_agnostic")]
    results = t.answer(reqs)
    assert len(results) == 2
    for r in results:
        assert r.prompt_tokens > r.extra["sp_kept_tokens"] and r.ttft_s > 0 and r.extra["setting_applied"]
    assert t.count_tokens("abc") == 3


def test_eval_cli_spec_parser():
    from longserve.specprefill.eval_target import parse_spec

    assert parse_spec("snapkv@256") is None
    spec = parse_spec("specprefill@0.1:draft=tiny:keep_tail=8:chunk=16")
    assert spec.label == "specprefill@0.1:draft=tiny:keep_tail=8:chunk=16" and spec.draft == "tiny"
    assert (spec.config.keep, spec.config.keep_tail, spec.config.chunk) == (0.1, 8, 16)
    for bad in ("specprefill@2", "specprefill@x", "specprefill@0.5:nope=1", "specprefill@0.5:chunk=0"):
        with pytest.raises(InvalidParameterError):
            parse_spec(bad)
    try:
        from longserve.eval.cli import SPEC_PARSERS
        from longserve.eval.cli import parse_spec as eval_parse
    except ImportError:
        pytest.skip("the eval CLI has no spec-parser extension point")
    assert parse_spec in SPEC_PARSERS and eval_parse("specprefill@0.25").config.keep == 0.25


def test_server_glue(byte_pair):
    import asyncio

    from longserve.specprefill.serving import ServerPrefill, parse_option

    target, draft = byte_pair
    assert parse_option(None, None) == (False, None) and parse_option(None, "d") == (True, None)
    assert parse_option({"keep": 0.5, "draft": "d"}, "d") == (True, 0.5)
    assert parse_option({"enabled": False}, None) == (False, None) and parse_option(False, "d") == (
        False,
        None,
    )
    for raw, name in (
        ({"keep": 0.5}, None),
        ({"keep": 2}, "d"),
        ({"draft": "other"}, "d"),
        ({"x": 1}, "d"),
        (3, "d"),
    ):
        with pytest.raises(InvalidParameterError):
            parse_option(raw, name)
    glue = ServerPrefill(SpeculativePrefill(draft, keep=0.5))
    ids = target.encode(text(100) + QUESTION)
    cp = asyncio.run(glue.compress(target, ids, {"keep": 0.25}))
    assert cp.positions[-1] == len(ids) - 1 and cp.ids == [ids[p] for p in cp.positions]
    assert 0.2 < cp.ratio < 0.45
    assert asyncio.run(glue.compress(target, ids, False)) is None
