"""`longserve distill` end to end: prompts -> teacher data -> training -> evaluation -> zoo entry."""

from __future__ import annotations

import json
import time
from pathlib import Path

from longserve.distill.data import GENERAL_PROMPTS, split, synthesize_prompts, write_prompts
from longserve.distill.evaluate import acceptance
from longserve.distill.export import check_name, export_model
from longserve.distill.teacher import Example, TeacherData, as_prompt, build_teacher_data
from longserve.distill.train import DistillError, TrainConfig, evaluate, merge_lora, train
from longserve.llm import LLM
from longserve.spec import TokenizerMismatchError, check_same_tokenizer


def retokenize(data: TeacherData, draft: LLM) -> list[Example]:
    """Black-box data for a draft with another tokenizer: the target's text in the draft's tokens."""
    eos = draft.loaded.eos_ids[:1]
    out = []
    for e in data.examples:
        answer = list(draft.tokenizer.encode(e.answer, add_special_tokens=False))
        out.append(Example(e.prompt, draft.encode(as_prompt(draft, e.prompt)), answer + list(eos), e.answer))
    return out


def run_distill(
    target: LLM,
    draft: LLM,
    name: str,
    workdir: str | Path,
    *,
    prompts: list[str] | None = None,
    domain: str | None = None,
    num_prompts: int = 64,
    held_out: float | int = 0.2,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k_logits: int = 16,
    config: TrainConfig | None = None,
    eval_max_new_tokens: int = 64,
    eval_k: int = 4,
    general_prompts: list[str] | tuple[str, ...] = GENERAL_PROMPTS,
    run_eval: bool = True,
    register: bool = True,
    resume: bool = False,
    draft_hf_config=None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Distill `draft` towards `target` on a domain; returns a report (also written to workdir/report.json)."""
    config = config or TrainConfig()
    if register:
        check_name(name)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        check_same_tokenizer(target, draft)
        shared = True
    except TokenizerMismatchError:
        if config.mode == "whitebox":
            raise
        shared = False
    report: dict = {
        "name": name,
        "target": target.loaded.name,
        "draft": draft.loaded.name,
        "mode": config.mode,
        "lora": config.lora,
        "shared_tokenizer": shared,
    }

    # 1. prompts
    t0 = time.perf_counter()
    synthesized = prompts is None
    if synthesized:
        if not domain:
            raise DistillError("give domain prompts (--prompts FILE.jsonl) or a --domain description")
        prompts = synthesize_prompts(target, domain, num_prompts, seed=seed)
        write_prompts(workdir / "prompts.jsonl", prompts)
    train_prompts, held = split(prompts, held_out, seed=seed)
    report["data"] = {
        "prompts": len(prompts),
        "train_prompts": len(train_prompts),
        "held_out_prompts": len(held),
        "synthesized": synthesized,
    }

    # 2. the target's answers (+ top-k log-probs), reused on --resume
    data_path = workdir / "teacher.safetensors"
    reused = resume and data_path.exists()
    if reused:
        data = TeacherData.load(data_path)
    else:
        data = build_teacher_data(
            target,
            train_prompts,
            max_new_tokens,
            temperature,
            top_k_logits if config.mode == "whitebox" else 0,
            seed=seed,
            progress=progress,
        )
        data.save(data_path)
    examples = data.examples if shared else retokenize(data, draft)
    report["data"].update(
        {
            "answer_tokens": data.n_answer_tokens,
            "teacher_file_bytes": data_path.stat().st_size,
            "teacher_seconds": time.perf_counter() - t0,
            "teacher_reused": reused,
            "top_k_logits": data.meta.get("top_k_logits"),
        }
    )

    # 3. before
    model = draft.loaded.model
    if run_eval:
        report["before"] = _evaluate(
            target,
            draft,
            examples,
            held if shared else [],
            general_prompts if shared else [],
            config,
            eval_max_new_tokens,
            eval_k,
            progress,
        )

    # 4. training
    result = train(model, examples, config, workdir, resume=resume, progress=progress)
    if config.lora:
        merge_lora(model)
    report["train"] = {
        "steps": result.steps,
        "seconds": result.seconds,
        "trainable_params": result.trainable_params,
        "first_loss": result.losses[0] if result.losses else None,
        "last_loss": result.losses[-1] if result.losses else None,
        "resumed_from": result.resumed_from,
        "lr": config.learning_rate,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
    }

    # 5. after
    if run_eval:
        report["after"] = _evaluate(
            target,
            draft,
            examples,
            held if shared else [],
            general_prompts if shared else [],
            config,
            eval_max_new_tokens,
            eval_k,
            progress,
        )

    # 6. export
    if register:
        source = {
            "teacher": target.loaded.name,
            "base_draft": draft.loaded.name,
            "mode": config.mode,
            "lora": config.lora,
            "train_prompts": len(train_prompts),
        }
        path = export_model(model, name, draft.loaded.path, draft_hf_config, source=source)
        report["model_dir"] = str(path)
    (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _evaluate(
    target: LLM,
    draft: LLM,
    examples: list[Example],
    held: list[str],
    general,
    config: TrainConfig,
    max_new_tokens: int,
    k: int,
    progress: bool,
) -> dict:
    out = {
        ("train_kl" if config.mode == "whitebox" else "train_ce"): evaluate(
            draft.loaded.model, examples, config.mode, config.max_len
        )
    }
    if held:
        out["domain_held_out"] = acceptance(
            target, draft, held, max_new_tokens, k, progress, "held-out acceptance"
        )
    if general:
        out["general"] = acceptance(
            target, draft, list(general), max_new_tokens, k, progress, "general acceptance"
        )
    return out
