"""Train a draft model on the target's answers: black-box (cross-entropy on the target's tokens) or
white-box (forward KL to the target's renormalized top-k distribution), full fine-tune or LoRA.

The draft is our own `CausalLM` (HF parameter names), trained without a KV cache through a plain causal
attention backend. LoRA adapters are injected with `peft` into its nn.Linear projections and merged back
before export, so the result is an ordinary model directory. Checkpoints are written to a temp file and
renamed over the previous one, so a crash or a full disk mid-save never loses the last good checkpoint.
"""

from __future__ import annotations

import errno
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from longserve.distill.teacher import Example, FullAttention, TeacherData
from longserve.errors import InvalidParameterError, LongserveError
from longserve.model import CausalLM

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHECKPOINT = "checkpoint.pt"


class DistillError(LongserveError):
    """Training or checkpointing failed in a way the user can act on."""


@dataclass
class TrainConfig:
    mode: str = "whitebox"  # or "blackbox"
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lr: float | None = None  # default: 1e-5 full fine-tune, 2e-4 LoRA
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 4  # examples per optimizer step (gradient accumulation, one sequence at a time)
    max_len: int = 1024
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    checkpoint_every: int = 50  # optimizer steps; 0 = only at the end
    warmup: float = 0.1  # fraction of the steps with a linear lr ramp (Adam's first steps are sign-like)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("whitebox", "blackbox"):
            raise InvalidParameterError(
                f"distillation mode must be 'whitebox' or 'blackbox', got {self.mode!r}"
            )
        if self.epochs < 1 or self.batch_size < 1 or self.max_len < 2 or self.lora_r < 1:
            raise InvalidParameterError("epochs, batch_size, lora_r must be >= 1 and max_len >= 2")

    def lr_factor(self, step: int, total: int) -> float:
        """Linear warmup over `warmup` of the steps, then linear decay to 10% at the end."""
        warm = max(1, round(self.warmup * total)) if self.warmup > 0 else 0
        if step < warm:
            return (step + 1) / (warm + 1)
        rest = max(1, total - warm)
        return 1.0 - 0.9 * (step - warm) / rest

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-4 if self.lora else 1e-5)


@dataclass
class TrainResult:
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    trainable_params: int = 0
    resumed_from: int = 0


# ---- LoRA -----------------------------------------------------------------------------------------
def apply_lora(model: CausalLM, r: int, alpha: int) -> CausalLM:
    """Inject LoRA adapters into the attention and MLP projections; only they stay trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
    return inject_adapter_in_model(config, model)


def merge_lora(model: CausalLM) -> CausalLM:
    """Fold the adapters into the base weights and put the plain nn.Linear modules back."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(False)
    if model.model.layers[0].self_attn.qkv is not None:
        model.fuse()  # peft merges through `.data`, which the fused copies cannot notice
    return model


# ---- losses ---------------------------------------------------------------------------------------
def _fit(e: Example, max_len: int) -> tuple[list[int], int, int] | None:
    """(ids, n_prompt, n_answer) cut to max_len by dropping the answer's tail; None if nothing is left."""
    n_answer = min(len(e.answer_ids), max_len - len(e.prompt_ids))
    if n_answer <= 0:
        return None
    return e.prompt_ids + e.answer_ids[:n_answer], len(e.prompt_ids), n_answer


def _answer_logits(model: CausalLM, ids: list[int], n_prompt: int) -> torch.Tensor:
    x = torch.tensor([ids])
    positions = torch.arange(len(ids))[None]
    hidden = model.hidden_states(x, positions, FullAttention(model.args, positions))[0]
    return model.logits(hidden[n_prompt - 1 : len(ids) - 1])


def example_loss(model: CausalLM, e: Example, mode: str, max_len: int) -> tuple[torch.Tensor, int] | None:
    """(summed loss over the answer tokens, number of tokens)."""
    fit = _fit(e, max_len)
    if fit is None:
        return None
    ids, n_prompt, n_answer = fit
    logp = _answer_logits(model, ids, n_prompt).float().log_softmax(-1)
    if mode == "blackbox":
        target = torch.tensor(e.answer_ids[:n_answer])
        return -logp.gather(1, target[:, None]).sum(), n_answer
    teacher = e.topk_logprobs[:n_answer].float().log_softmax(-1)  # renormalized over the stored top-k
    student = logp.gather(1, e.topk_ids[:n_answer].long())
    return (teacher.exp() * (teacher - student)).sum(), n_answer


@torch.no_grad()
def evaluate(
    model: CausalLM, data: TeacherData | list[Example], mode: str = "whitebox", max_len: int = 1024
) -> float:
    """Mean per-token loss: top-k KL(target || draft) for "whitebox", cross-entropy for "blackbox"."""
    examples = data.examples if isinstance(data, TeacherData) else data
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for e in examples:
        out = example_loss(model, e, mode, max_len)
        if out is not None:
            total, count = total + float(out[0]), count + out[1]
    model.train(was_training)
    return total / max(count, 1)


# ---- checkpoints ----------------------------------------------------------------------------------
def save_checkpoint(state: dict, path: Path) -> None:
    """Write to a temp file beside `path`, then rename: the previous checkpoint survives any failure."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            kept = f"the previous checkpoint {path} is intact" if path.exists() else "no checkpoint was kept"
            raise DistillError(
                f"disk full while writing a checkpoint to {path.parent}; {kept}. Free space "
                "and re-run with --resume"
            ) from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _trainable(model: CausalLM) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---- the loop -------------------------------------------------------------------------------------
def _schedule(n: int, config: TrainConfig) -> list[list[int]]:
    """Example indices per optimizer step, over all epochs (shuffled per epoch, deterministic)."""
    steps = []
    for epoch in range(config.epochs):
        order = list(range(n))
        random.Random(config.seed * 1000 + epoch).shuffle(order)
        steps += [order[i : i + config.batch_size] for i in range(0, n, config.batch_size)]
    return steps[: config.max_steps] if config.max_steps else steps


def train(
    model: CausalLM,
    data: TeacherData | list[Example],
    config: TrainConfig,
    workdir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune `model` in place (LoRA adapters stay injected until `merge_lora`)."""
    examples = data.examples if isinstance(data, TeacherData) else list(data)
    if not examples:
        raise DistillError("no training examples")
    if config.mode == "whitebox" and any(e.topk_ids is None for e in examples):
        raise DistillError(
            "white-box training needs the target's top-k log-probs: rebuild the teacher data "
            "with --top-k-logits > 0, or use --mode blackbox"
        )
    vocab = model.args.vocab_size
    if config.mode == "whitebox" and max(int(e.topk_ids.max()) for e in examples if e.answer_ids) >= vocab:
        raise DistillError(
            "the target's token ids exceed the draft's vocabulary: white-box distillation needs "
            "a draft that shares the target's tokenizer"
        )
    torch.manual_seed(config.seed)
    if config.lora:
        apply_lora(model, config.lora_r, config.lora_alpha)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    steps = _schedule(len(examples), config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: config.lr_factor(s, len(steps)))
    ckpt = Path(workdir) / CHECKPOINT if workdir else None
    result = TrainResult(0, 0.0, trainable_params=sum(p.numel() for p in params))
    if resume and ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state.get("config") != asdict(config):
            raise DistillError(f"{ckpt} was written with other training settings; delete it or drop --resume")
        with torch.no_grad():
            named = dict(model.named_parameters())
            for name, value in state["trainable"].items():
                named[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        result.steps = result.resumed_from = state["step"]
        result.losses = list(state["losses"])
    if ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
    model.train()
    start = time.perf_counter()
    bar = tqdm(
        total=len(steps),
        initial=result.steps,
        disable=not progress,
        desc=f"distill ({config.mode})",
        unit="step",
    )
    try:
        for step in range(result.steps, len(steps)):
            optimizer.zero_grad(set_to_none=True)
            losses = [example_loss(model, examples[i], config.mode, config.max_len) for i in steps[step]]
            losses = [x for x in losses if x is not None]
            tokens = sum(n for _, n in losses)
            if tokens:
                loss = sum(x for x, _ in losses) / tokens
                loss.backward()
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                result.losses.append(float(loss.detach()))
                if not math.isfinite(result.losses[-1]):
                    raise DistillError(f"the loss became {result.losses[-1]} at step {step + 1}; lower --lr")
                bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
            scheduler.step()
            result.steps = step + 1
            bar.update()
            last = result.steps == len(steps)
            if ckpt is not None and (
                last or (config.checkpoint_every and result.steps % config.checkpoint_every == 0)
            ):
                save_checkpoint(
                    {
                        "step": result.steps,
                        "trainable": _trainable(model),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "config": asdict(config),
                        "losses": result.losses,
                    },
                    ckpt,
                )
    finally:
        bar.close()
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    result.seconds = time.perf_counter() - start
    return result
