import errno
import json

import pytest
import torch

from longserve import zoo
from longserve.distill import data as data_mod
from longserve.distill import train as train_mod
from longserve.distill.data import DistillDataError, read_prompts, split, synthesize_prompts
from longserve.distill.export import export_model
from longserve.distill.pipeline import run_distill
from longserve.distill.teacher import TeacherData, build_teacher_data
from longserve.distill.train import CHECKPOINT, DistillError, TrainConfig, evaluate, merge_lora, train
from longserve.errors import InvalidParameterError
from longserve.llm import LLM
from longserve.loader import build_model, load_state
from tests.tiny import tiny_loaded

PROMPTS = [
    "def add(a, b):",
    "for i in range(",
    "import numpy as",
    "class Stack:",
    "while x > 0:",
    "return [y for",
]


@pytest.fixture(scope="module")
def target():
    return LLM(loaded=tiny_loaded("llama", seed=0)[0], progress=False)


@pytest.fixture(scope="module")
def teacher(target):
    return build_teacher_data(target, PROMPTS[:4], max_new_tokens=12, top_k_logits=16, progress=False)


def fresh_draft():
    loaded, ref = tiny_loaded("llama", seed=1, num_hidden_layers=1)
    return LLM(loaded=loaded, progress=False), ref.config


# ---- prompts ---------------------------------------------------------------------------------------
def test_read_prompts_reports_every_bad_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(
        '{"prompt": "ok"}\n\n{"prompt": \n["x"]\n{"text": "no prompt"}\n{"prompt": ""}\n{"prompt": "fine"}\n'
    )
    with pytest.raises(DistillDataError) as err:
        read_prompts(f)
    msg = str(err.value)
    for line in (3, 4, 5, 6):
        assert f"line {line}:" in msg
    assert "line 1:" not in msg and "line 7:" not in msg and "4 malformed" in msg


def test_read_prompts_empty_file_and_good_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DistillDataError, match="no prompts"):
        read_prompts(empty)
    good = tmp_path / "good.jsonl"
    data_mod.write_prompts(good, ["a", "b\nc"])
    assert read_prompts(good) == ["a", "b\nc"]
    with pytest.raises(DistillDataError, match="cannot read"):
        read_prompts(tmp_path / "missing.jsonl")


def test_split_keeps_training_prompts():
    train_p, held = split(PROMPTS, 0.34, seed=1)
    assert len(held) == 2 and sorted(train_p + held) == sorted(PROMPTS)
    assert split(["only"], 0.5) == (["only"], [])


def test_synthesize_prompts_with_the_target(target):
    out = synthesize_prompts(target, "python lists", 3, max_new_tokens=16)
    assert 1 <= len(out) <= 3 and len(set(out)) == len(out)


# ---- teacher data ----------------------------------------------------------------------------------
def test_teacher_data_is_compact_and_round_trips(teacher, tmp_path):
    assert teacher.white_box and teacher.n_answer_tokens == 4 * 12
    e = teacher.examples[0]
    assert e.topk_ids.shape == (12, 16) and e.topk_ids.dtype == torch.int32
    assert e.topk_logprobs.dtype == torch.float16
    assert e.topk_ids[:, 0].tolist() == e.answer_ids  # greedy answers: the argmax is the answer token
    path = teacher.save(tmp_path / "t.safetensors")
    assert path.stat().st_size < 4 * 12 * 16 * 6 + 4096
    back = TeacherData.load(path)
    assert back.meta == teacher.meta
    for a, b in zip(back.examples, teacher.examples, strict=True):
        assert (a.prompt, a.prompt_ids, a.answer_ids, a.answer) == (
            b.prompt,
            b.prompt_ids,
            b.answer_ids,
            b.answer,
        )
        assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.topk_logprobs, b.topk_logprobs)


# ---- training --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("mode", "lora"), [("whitebox", False), ("whitebox", True), ("blackbox", False)])
def test_training_lowers_the_loss_to_the_target(teacher, mode, lora):
    draft, _ = fresh_draft()
    model = draft.loaded.model
    embed = model.model.embed_tokens.weight.clone()
    before = evaluate(model, teacher, mode)
    epochs = 10 if lora else 6
    config = TrainConfig(
        mode=mode, lora=lora, lora_r=8, lora_alpha=16, lr=1e-2 if lora else 5e-3, epochs=epochs, batch_size=2
    )
    result = train(model, teacher, config, progress=False)
    assert result.steps == 2 * epochs and len(result.losses) == result.steps
    if lora:
        assert result.trainable_params < sum(p.numel() for p in model.parameters()) / 5
        merge_lora(model)
        assert not any("lora" in n for n, _ in model.named_parameters())
        assert torch.equal(model.model.embed_tokens.weight, embed)  # only the adapted projections moved
    after = evaluate(model, teacher, mode)
    # a 1-layer random draft adapted by rank-8 LoRA cannot follow a random 3-layer target far
    assert after < (0.95 if lora else 0.7) * before, (before, after)


def test_disk_full_during_checkpoint_keeps_the_previous_one(teacher, tmp_path, monkeypatch):
    draft, _ = fresh_draft()
    config = TrainConfig(lr=1e-3, epochs=2, batch_size=2, checkpoint_every=1)
    first = train(
        draft.loaded.model,
        teacher,
        config.__class__(**{**config.__dict__, "max_steps": 2}),
        tmp_path,
        progress=False,
    )
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert saved["step"] == first.steps == 2
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"partial")  # the disk fills mid-write
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    draft2, _ = fresh_draft()
    with pytest.raises(DistillError, match="disk full.*previous checkpoint .* is intact"):
        train(
            draft2.loaded.model,
            teacher,
            TrainConfig(lr=1e-3, epochs=2, batch_size=2, checkpoint_every=1),
            tmp_path,
            progress=False,
        )
    monkeypatch.setattr(torch, "save", real_save)
    kept = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert kept["step"] == 2 and [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]
    for name, value in saved["trainable"].items():
        assert torch.equal(kept["trainable"][name], value)


def test_resume_continues_from_the_checkpoint(teacher, tmp_path, monkeypatch):
    config = TrainConfig(lr=1e-3, epochs=2, batch_size=2, checkpoint_every=1)
    full, _ = fresh_draft()
    train(full.loaded.model, teacher, config, progress=False)
    real_save = train_mod.save_checkpoint

    def crash_after_two(state, path):
        real_save(state, path)
        if state["step"] == 2:
            raise KeyboardInterrupt  # the run is killed right after its second checkpoint

    monkeypatch.setattr(train_mod, "save_checkpoint", crash_after_two)
    half, _ = fresh_draft()
    with pytest.raises(KeyboardInterrupt):
        train(half.loaded.model, teacher, config, tmp_path, progress=False)
    monkeypatch.undo()
    resumed, _ = fresh_draft()
    result = train(resumed.loaded.model, teacher, config, tmp_path, resume=True, progress=False)
    assert result.resumed_from == 2 and result.steps == 4
    for a, b in zip(resumed.loaded.model.parameters(), full.loaded.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(DistillError, match="other training settings"):
        train(
            fresh_draft()[0].loaded.model,
            teacher,
            TrainConfig(lr=2e-3),
            tmp_path,
            resume=True,
            progress=False,
        )


def test_whitebox_needs_topk(target):
    data = build_teacher_data(target, PROMPTS[:1], max_new_tokens=4, top_k_logits=0, progress=False)
    draft, _ = fresh_draft()
    with pytest.raises(DistillError, match="top-k"):
        train(draft.loaded.model, data, TrainConfig(), progress=False)


# ---- export and the whole pipeline ----------------------------------------------------------------
def test_export_registers_a_zoo_model(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGSERVE_HOME", str(tmp_path / "home"))
    draft, config = fresh_draft()
    with pytest.raises(InvalidParameterError):
        export_model(draft.loaded.model, "bad/name", None, config)
    with pytest.raises(InvalidParameterError):
        export_model(draft.loaded.model, "smollm2-135m-instruct", None, config)
    path = export_model(draft.loaded.model, "tiny-draft", None, config, source={"teacher": "t"})
    assert zoo.is_cached("tiny-draft") and zoo.resolve("tiny-draft") == path
    manifest = json.loads((path / zoo.MANIFEST).read_text())
    assert manifest["source"]["kind"] == "distilled" and zoo.WEIGHTS in manifest["files"]
    from transformers import AutoConfig

    again = build_model(AutoConfig.from_pretrained(path))
    load_state(again, path)
    for (name, a), b in zip(
        draft.loaded.model.state_dict().items(), again.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_pipeline_end_to_end(target, tmp_path, monkeypatch):
    monkeypatch.setenv("LONGSERVE_HOME", str(tmp_path / "home"))
    draft, config = fresh_draft()
    report = run_distill(
        target,
        draft,
        "tiny-code-draft",
        tmp_path / "work",
        prompts=PROMPTS,
        held_out=2,
        max_new_tokens=8,
        config=TrainConfig(lr=1e-3, epochs=3, batch_size=2, lora=True, lora_r=4),
        eval_max_new_tokens=6,
        eval_k=2,
        general_prompts=["hello there"],
        draft_hf_config=config,
        progress=False,
    )
    assert report["data"]["train_prompts"] == 4 and report["data"]["held_out_prompts"] == 2
    assert report["after"]["train_kl"] < report["before"]["train_kl"]
    for when in ("before", "after"):
        assert report[when]["domain_held_out"]["prompts"] == 2 and report[when]["general"]["prompts"] == 1
    assert zoo.resolve("tiny-code-draft") == zoo.model_dir("tiny-code-draft")
    assert json.loads((tmp_path / "work" / "report.json").read_text())["name"] == "tiny-code-draft"


def test_cli_registers_distill():
    import argparse

    from longserve.distill.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "distill",
            "--target",
            "t",
            "--draft",
            "d",
            "--name",
            "n",
            "--domain",
            "python",
            "--lora",
            "--mode",
            "blackbox",
        ]
    )
    assert args.lora and args.mode == "blackbox" and args.func.__name__ == "cmd_distill"
    with pytest.raises(SystemExit):
        parser.parse_args(["distill", "--target", "t", "--draft", "d", "--name", "n"])  # no prompts source
