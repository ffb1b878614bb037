"""The README's Python examples run as written and print what the README says they print."""

import re
from collections.abc import Callable
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
COLOURS = ("red", "orange", "yellow", "green", "blue", "indigo", "violet", "purple", "pink", "white", "black")


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


def _full_cache_bytes(ns: dict) -> int:
    """KV bytes of the example's pass-key prompt under the full cache, the size compression must beat."""
    return ns["llm"].generate(ns["prompt"], max_new_tokens=8, kv_policy="full")[0].stats["kv_bytes_allocated"]


def check_head_adaptive(block: str, ns: dict, printed: str) -> None:
    """The pass key survives, and the bytes printed are those of the uniform budget of 256 (as commented)."""
    text, kv_bytes = re.fullmatch(r"(.*) (\d+)\n", printed, flags=re.S).groups()
    assert "71432" in text
    uniform = ns["llm"].generate(ns["prompt"], max_new_tokens=8, kv_policy="snapkv", kv_budget=256)[0]
    assert 0 < int(kv_bytes) == uniform.stats["kv_bytes_allocated"] < _full_cache_bytes(ns)


def check_python_api(block: str, ns: dict, printed: str) -> None:
    """snapstream finds the pass key in fewer bytes than the full cache; the chat answer names colours."""
    text, kv_bytes, ratio, chat = re.fullmatch(r"(.*) (\d+) (\d+\.\d+)\n(.*)\n", printed, flags=re.S).groups()
    assert "71432" in text
    assert 0 < int(kv_bytes) < _full_cache_bytes(ns)
    assert float(ratio) > 1
    assert len({c for c in COLOURS if c in chat.lower()}) >= 3, chat


#: The right answer to each question the compress-once example may ask of its library/café context.
ANSWERS = {
    "When does the library open?": r"\b9(:00)? ?(am|a\.m\.)",
    "When does the café close?": r"\b6(:00)? ?(pm|p\.m\.)",
}


def check_compress_once(block: str, ns: dict, printed: str) -> None:
    """The answer read from the saved, reloaded context states the time the context gives."""
    question = re.search(r'llm\.ask\(ctx, "(.*?)"', block).group(1)
    assert re.search(ANSWERS[question], printed, flags=re.I), printed


def check_sampling_params(block: str, ns: dict, printed: str) -> None:
    """Token ids in, the stop string cuts the answer; prompt_tokens counts the ids."""
    text, n = re.fullmatch(r"(.*) (\d+)\n", printed, flags=re.S).groups()
    assert "Paris" in text and "\n" not in text and int(n) == len(ns["ids"])


def check_prefix_cache(block: str, ns: dict, printed: str) -> None:
    """The second prompt reuses most of the first one's KV; the first had nothing to reuse."""
    first, second = map(int, printed.split())
    manual_tokens = len(ns["llm"].tokenizer.encode(ns["manual"]))
    assert first == 0 and manual_tokens - 64 <= second <= manual_tokens


def check_many_shot(block: str, ns: dict, printed: str) -> None:
    """A reused block: each query prefills only itself; re-prefilled: block + query."""
    accuracy, reused, again = map(float, printed.split())
    assert 0 <= accuracy <= 1 and reused < 40 and again > reused + 16 * 5


def check_new_policy(block: str, ns: dict, printed: str) -> None:
    """Both made-up policies run through the engine and hold exactly the uniform budget of 128 tokens;
    the wrapper's own parameter is recorded next to the wrapped policy's."""
    lines = printed.strip().splitlines()
    assert len(lines) == 2 and "'name': 'vnorm'" in lines[0] and "'weight': 0.5" in lines[1]
    budget = ns["llm"].generate(ns["prompt"], max_new_tokens=8, kv_policy="snapkv", kv_budget=128)[0]
    sizes = {int(line.rsplit(" ", 1)[1]) for line in lines}
    assert sizes == {budget.stats["kv_bytes_allocated"]}


def check_layer_budgets(block: str, ns: dict, printed: str) -> None:
    """Layers of the stored context hold different counts summing to the uniform 25%; it still answers."""
    counts_text, nbytes, answer = re.fullmatch(r"\[(.*)\] (\d+)\n(.*)\n", printed, flags=re.S).groups()
    counts = [int(c) for c in counts_text.split(",")]
    llm, ctx = ns["llm"], ns["ctx"]
    uniform = -(-ctx.n_context_tokens // 4)  # ceil(0.25 * tokens)
    assert len(set(counts)) > 1 and sum(counts) == uniform * len(counts)
    assert int(nbytes) == uniform * llm.loaded.args.kv_bytes_per_token(llm.dtype)
    assert "526814" in answer, answer


def check_compressed_prefix(block: str, ns: dict, printed: str) -> None:
    """The first question compresses the system turn, the second reuses it; the cache holds half of it."""
    (c1, p1, b1), (c2, p2, b2) = (map(int, line.split()) for line in printed.strip().splitlines())
    assert c1 == 0 and 0 < c2 < p2 and b1 == b2 > 0
    per_token = ns["llm"].loaded.args.kv_bytes_per_token(ns["llm"].dtype)
    full_bytes = c2 * per_token
    assert b1 <= 0.5 * full_bytes + 64 * per_token


#: Each example's check, found by a line that only that example has.
CHECKS: dict[str, Callable[[str, dict, str], None]] = {
    "kv_budget=256, head_adaptive=True": check_head_adaptive,
    'layer_budgets="global", head_adaptive=True': check_layer_budgets,
    'kv_policy="snapstream", kv_budget=256)': check_python_api,
    "CompressedContext.load(": check_compress_once,
    "SamplingParams(max_new_tokens=8": check_sampling_params,
    "second = llm.generate(manual": check_prefix_cache,
    "ShotConfig(16)": check_many_shot,
    "class Recency(PolicyWrapper)": check_new_policy,
    "cache_prefix=spec": check_compressed_prefix,
}


def test_every_example_has_a_check():
    for i, block in enumerate(BLOCKS):
        assert sum(key in block for key in CHECKS) == 1, f"README python block {i} needs one entry in CHECKS"


@pytest.mark.integration
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, capsys):
    block, ns = BLOCKS[index], {}
    exec(compile(block, f"README.md[python block {index}]", "exec"), ns)
    printed = capsys.readouterr().out
    next(check for key, check in CHECKS.items() if key in block)(block, ns, printed)


def readme_commands() -> list[str]:
    """Every `longserve ...` command in the README's bash blocks (pipes and `&&` split, comments cut)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():  # continued lines are one command
            for part in re.split(r"\s*(?:\|(?!\|)|&&)\s*", line.split("  #")[0]):
                if part.startswith("longserve "):
                    commands.append(part.strip())
    return commands


def test_readme_commands_parse():
    """The README's command lines use flags the CLI really has (parsed, not run)."""
    import shlex

    from longserve.cli import build_parser

    commands = readme_commands()
    assert len(commands) >= 10
    parser = build_parser()
    for command in commands:
        try:
            parser.parse_args(shlex.split(command)[1:])
        except SystemExit:
            pytest.fail(f"README command does not parse: {command}")
