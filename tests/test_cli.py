"""CLI bad-input paths: each is a one-line error with exit code 2, before any weights load."""

import io
import os
import subprocess
import sys
from argparse import Namespace

import pytest

from longserve.cli import main, read_prompt

#: A model that does not exist: if any of these commands loaded the model before checking its input,
#: the error would be "unknown model", not the one expected.
NO_MODEL = ["--model", "no-such-model"]


def _assert_one_line_error(code: int, capsys, message: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err
    assert message.lower() in err.lower()


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
    _assert_one_line_error(main(argv), capsys, message)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--file", "{tmp}/missing.txt"], "cannot read --file {tmp}/missing.txt: No such file"),
        (["generate", "--file", "{tmp}"], "cannot read --file {tmp}: Is a directory"),
        (["generate", "--file", "{tmp}/latin1.txt"], "latin1.txt is not UTF-8 text (byte 0xe9 at offset 3)"),
        (["generate", "--file", "{tmp}/binary.bin"], "binary.bin is not UTF-8 text (byte 0xff at offset 0)"),
        (["generate", "hi", "--threads", "-1"], "--threads must be >= 1, got -1"),
        (["generate", "hi", "--threads", "0"], "--threads must be >= 1, got 0"),
        (["generate", "hi", "--num-draft-tokens", "0"], "--num-draft-tokens must be >= 1, got 0"),
        (["serve", "--threads", "-1"], "--threads must be >= 1, got -1"),
        (["generate", "hi", "--dtype", "fp64"], "--dtype must be one of auto, float32, bfloat16, float16"),
        (["serve", "--dtype", "bf16"], "--dtype must be one of auto, float32, bfloat16, float16, got 'bf16'"),
        (["generate", "hi", "--weights", "int3"], "--weights must be one of auto, bf16, fp32, int8, int4"),
        (["serve", "--weights", "bf16", "--dtype", "float32"], "--weights 'bf16' run with dtype bfloat16"),
        (["generate", "hi", "--seed", str(2**70)], "seed must be an integer in [0, 2**63)"),
        (["generate", "hi", "--temperature", "inf"], "temperature must be >= 0 and finite"),
        (["generate", "hi", "--temperature", "nan"], "temperature must be >= 0 and finite"),
        (["generate", "caf\udce9"], "the prompt argument is not UTF-8 text"),  # argv bytes b"caf\xe9"
        (["compress", "{tmp}/missing.txt", "--out", "{tmp}/c.ctx"], "cannot read the context file"),
        (["compress", "{tmp}/latin1.txt", "--out", "{tmp}/c.ctx"], "latin1.txt is not UTF-8 text"),
        (["compress", "{tmp}/good.txt", "--out", "{tmp}/no/dir/c.ctx"], "no/dir is not a directory"),
        (["compress", "{tmp}/good.txt", "--out", "{tmp}/c.ctx", "--kv-policy", "nope"], "unknown kv policy"),
        (["ask", "{tmp}/missing.ctx", "Who?"], "cannot read the context file {tmp}/missing.ctx: No such"),
        (["ask", "{tmp}/good.txt", "Who?", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        # valid input gets as far as loading the model (which does not exist)
        (["generate", "--file", "{tmp}/good.txt"], "unknown model 'no-such-model'"),
        (["compress", "{tmp}/good.txt", "--out", "{tmp}/c.ctx"], "unknown model 'no-such-model'"),
        (["ask", "{tmp}/good.txt", "Who?"], "unknown model 'no-such-model'"),
    ],
)
def test_bad_files_and_counts_are_refused_before_the_model_loads(
    argv, message, capsys, tmp_path, monkeypatch
):
    monkeypatch.setenv("LONGSERVE_HOME", str(tmp_path / "home"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "binary.bin").write_bytes(b"\xff\xfe\x00\x01" * 8)
    (tmp_path / "good.txt").write_text("Ünïcödé is fine.\r\n")
    argv = [a.format(tmp=tmp_path) for a in argv] + NO_MODEL
    _assert_one_line_error(main(argv), capsys, message.format(tmp=tmp_path))


@pytest.mark.parametrize(
    "data, message",
    [
        ("café".encode("latin-1"), "stdin is not UTF-8 text (byte 0xe9 at offset 3)"),
        (b"\x00\x9f\x92\x96 binary", "stdin is not UTF-8 text (byte 0x9f at offset 1)"),
        ("Ünïcödé\n".encode(), "unknown model 'no-such-model'"),
    ],
)
def test_stdin_must_be_utf8(data, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LONGSERVE_HOME", str(tmp_path))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    _assert_one_line_error(main(["generate", *NO_MODEL]), capsys, message)


def test_files_and_stdin_read_with_universal_newlines(tmp_path, monkeypatch):
    """As text-mode reads did before the bytes were decoded by hand: CRLF and CR become LF."""
    (tmp_path / "crlf.txt").write_bytes(b"one\r\ntwo\rthree\n")
    assert read_prompt(Namespace(file=str(tmp_path / "crlf.txt"), prompt=None)) == "one\ntwo\nthree\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"one\r\ntwo")))
    assert read_prompt(Namespace(file=None, prompt="-")) == "one\ntwo"


def test_binary_stdin_in_a_real_process_is_one_line_exit_2(tmp_path):
    """The process's own stdin (a byte stream), not a test double; no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "longserve.cli", "generate", *NO_MODEL],
        input=b"\x89PNG\r\n\x1a\n\x00\x00",
        capture_output=True,
        timeout=120,
        env={**os.environ, "LONGSERVE_HOME": str(tmp_path)},
    )
    err = proc.stderr.decode().strip()
    assert proc.returncode == 2, err
    assert (
        err
        == "error: stdin is not UTF-8 text (byte 0x89 at offset 0); convert it first, e.g. `iconv -f latin1 -t utf-8`"
    )


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
