import re

import pytest

from longserve.errors import InvalidParameterError
from longserve.eval import synthetic
from longserve.eval.metrics import string_match_all
from longserve.eval.sample import fit_length
from longserve.eval.suite import make_suite
from longserve.eval.synthetic import word_counts
from longserve.eval.tasks import TASKS

SYNTHETIC = [t for t in TASKS if t != "code_debug"]
NIAH = [
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
]


def test_same_seed_same_samples(count_tokens):
    a = make_suite(SYNTHETIC, 2, 1500, count_tokens, seed=3)
    b = make_suite(SYNTHETIC, 2, 1500, count_tokens, seed=3)
    c = make_suite(SYNTHETIC, 2, 1500, count_tokens, seed=4)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    assert [s.context for s in a] != [s.context for s in c]
    assert len({s.id for s in a}) == len(a) == 2 * len(SYNTHETIC)


@pytest.mark.parametrize("length", [800, 6000])
def test_lengths_hit_target(count_tokens, length):
    for s in make_suite(SYNTHETIC, 1, length, count_tokens, seed=1):
        assert s.actual_tokens == count_tokens(s.prompt)
        assert length - max(64, 0.05 * length) <= s.actual_tokens <= length, s.task
        assert s.target_tokens == length and s.length_label == str(length)


def test_niah_needles_appear_exactly_once(count_tokens):
    for s in make_suite(NIAH, 3, 2000, count_tokens, seed=5):
        for answer in s.answers:
            assert s.context.count(answer) == 1, (s.id, answer)
        for key in s.metadata["keys"]:
            assert s.context.count(f"for {key} is:") == len(s.context.split(f"for {key} is:")) - 1 >= 1
        for key in s.metadata["asked"]:
            assert key in s.question
        assert string_match_all(" ".join(s.answers), s.answers) == 1.0
    multikey = make_suite(["niah_multikey"], 1, 2000, count_tokens)[0]
    assert len(multikey.answers) == 1 and multikey.context.count("One of the special magic") == 4
    multivalue = make_suite(["niah_multivalue"], 1, 2000, count_tokens)[0]
    assert len(multivalue.answers) == 4 and len(multivalue.metadata["keys"]) == 1


def test_value_types(count_tokens):
    number, word, uid = (make_suite([t], 1, 600, count_tokens)[0].answers[0] for t in NIAH[:3])
    assert re.fullmatch(r"\d{7}", number)
    assert re.fullmatch(r"[a-z]+", word)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", uid)


@pytest.mark.parametrize("task", ["niah_single", "passkey"])
def test_needle_at_requested_depth(count_tokens, task):
    samples = make_suite([task], 5, 3000, count_tokens, seed=2)
    assert [s.depth for s in samples] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for s in samples:
        body = s.context.split("\n", 1)[1]
        pos = body.index(s.answers[0])
        assert abs(pos / len(body) - s.depth) < 0.02
        assert s.context.count(s.answers[0]) == 1


def test_vt_chains_resolve(count_tokens):
    for s in make_suite(["vt"], 3, 2500, count_tokens, seed=7, task_params={"vt": {"num_chains": 2}}):
        statements = re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", s.context)
        assert len(statements) == 2 * 5
        value: dict[str, str] = {}
        for var, rhs in statements:  # in text order: each hop refers to an already defined variable
            value[var] = value[rhs[4:]] if rhs.startswith("VAR ") else rhs
        asked = re.search(r"value (\d+)", s.question).group(1)
        assert sorted(v for v, x in value.items() if x == asked) == sorted(s.answers)
        assert len(s.answers) == 5


@pytest.mark.parametrize("length", [1000, 30000])
def test_cwe_answers_are_most_common(count_tokens, length):
    s = make_suite(["cwe"], 1, length, count_tokens, seed=1)[0]
    counts = word_counts(s.context.split("\n")[1])
    least_common_answer = min(counts[a] for a in s.answers)
    others = max(c for w, c in counts.items() if w not in s.answers)
    assert least_common_answer > others
    assert len(s.answers) == 10


def test_fwe_answers_are_top3(count_tokens):
    s = make_suite(["fwe"], 1, 3000, count_tokens, seed=1)[0]
    counts = word_counts(s.context.split("\n")[1]).most_common()
    assert [w for w, _ in counts[:3]] == s.answers
    assert counts[0][1] > counts[1][1] > counts[2][1] > counts[3][1]


def test_errors(count_tokens):
    with pytest.raises(InvalidParameterError, match="unknown task.*known: niah_single"):
        make_suite(["niah_nope"], 1, 1000, count_tokens)
    with pytest.raises(InvalidParameterError, match="exceeds the model's context window"):
        make_suite(["passkey"], 1, 9000, count_tokens, max_context=8192)
    with pytest.raises(InvalidParameterError, match="too small"):
        make_suite(["niah_multiquery"], 1, 20, count_tokens)


def test_fit_length_uses_few_tokenizer_calls():
    calls = []

    def counting(text: str) -> int:
        calls.append(1)
        return len(text.split())

    n, (context, question), got = fit_length(
        lambda n: ("x " * (3 * n), "q?"), counting, 100_000, max_units=10**7
    )
    assert (n, got) == (33_333, 100_000)
    assert len(calls) <= 25
    with pytest.raises(InvalidParameterError, match="could only fill"):
        fit_length(lambda n: ("x " * (3 * n), "q?"), counting, 100_000, max_units=1000)


def test_fits_with_a_locally_trained_bpe_tokenizer():
    """Real subword tokenizers are not additive over words; fitting must still land within tolerance."""
    tokenizers = pytest.importorskip("tokenizers")
    from longserve.eval.synthetic import NOISE, load_words

    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=600, special_tokens=["[UNK]"], show_progress=False)
    tok.train_from_iterator([NOISE, " ".join(load_words())], trainer)

    def count(text: str) -> int:
        return len(tok.encode(text).ids)

    for s in make_suite(["niah_single_3", "vt", "cwe", "fwe", "passkey"], 1, 3000, count, seed=2):
        assert 3000 - 150 <= s.actual_tokens == count(s.prompt) <= 3000, s.task


@pytest.mark.parametrize("task", ["niah_multikey", "niah_multivalue", "niah_multiquery"])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_multi_needle_tasks_honour_depth(count_tokens, task, depth):
    """`depth` places the asked needles at that fraction of the haystack (it used to be ignored)."""
    (s,) = make_suite([task], 1, 3000, count_tokens, seed=2, task_params={task: {"depth": depth}})
    asked = set(s.metadata["asked"])
    per_key = len(s.answers) // len(asked)  # needles are listed key by key, values of a key together
    keys = [k for k in s.metadata["keys"] for _ in range(per_key)]
    assert s.depth == depth
    assert [d for k, d in zip(keys, s.metadata["needle_depths"], strict=True) if k in asked] == [depth] * len(
        s.answers
    )
    haystack = s.context[s.context.index("\n") + 1 :]
    for value in s.answers:
        assert abs(haystack.index(value) / len(haystack) - depth) < 0.05, (value, depth)
    again = make_suite([task], 1, 3000, count_tokens, seed=2)[0]
    assert again.depth is None  # without `depth` the needles stay at random depths


def test_filler_passkey_prompt_places_the_key_at_its_depth():
    prompt = synthetic.filler_passkey_prompt(48213, 40, 0.25)
    body = prompt.split("\n")[1]
    before, _, after = body.partition("The pass key is 48213.")
    assert before.count(synthetic.NOISE) == 10 and after.count(synthetic.NOISE) == 30
    assert prompt.endswith("What is the pass key? The pass key is")
