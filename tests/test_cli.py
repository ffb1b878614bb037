"""CLI bad-input paths: each is a one-line error with exit code 2, before any weights load."""

import pytest

from longserve.cli import main


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["generate", "hi", "--model", "no-such-model"],
            "unknown model 'no-such-model': use a zoo name (smollm2-135m-instruct",
        ),
        (
            ["generate", "hi", "--model", "/nonexistent/dir"],
            "a Hugging Face model directory containing config.json",
        ),
        (["generate", "hi", "--temperature", "-1"], "temperature must be >= 0"),
        (["generate", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["generate", "hi", "--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
        (["generate", "hi", "--kv-policy", "nope"], "unknown kv policy 'nope'; known: full, streaming"),
        (["generate", "hi", "--kv-policy", "snapkv", "--kv-budget", "0"], "budget must be > 0"),
        (["generate", "hi", "--kv-policy", "snapkv", "--kv-ratio", "2"], "ratio must be in (0, 1]"),
        (
            ["generate", "hi", "--kv-policy", "snapkv", "--kv-budget", "16", "--kv-window", "64"],
            "exceed the kv budget",
        ),
        (
            ["generate", "hi", "--kv-policy", "h2o", "--kv-budget", "64", "--kv-head-adaptive"],
            "head_adaptive budgets are not supported by policy 'h2o'",
        ),
        (
            ["models", "pull", "no-such-model"],
            "unknown zoo model 'no-such-model'; known: smollm2-135m-instruct",
        ),
    ],
)
def test_bad_input_is_one_line_error(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LONGSERVE_HOME", str(tmp_path))
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err
    assert message.lower() in err.lower()


def test_models_list(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LONGSERVE_HOME", str(tmp_path))
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for name in (
        "smollm2-135m-instruct",
        "gemma-3-270m",
        "qwen2.5-coder-0.5b-instruct",
        "qwen2.5-coder-1.5b-instruct",
    ):
        assert name in out
