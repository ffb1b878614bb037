"""The target's answers to the domain prompts, generated once offline, with its top-k log-probs.

White-box distillation needs the teacher's distribution at every answer position; the full vocabulary
(150k for Qwen) would cost 600 KB per position, so only the top-k (k=16: 96 bytes per position as int32
ids + float16 log-probs) is stored. The data lives in one safetensors file (no pickle), written to a
temp file and renamed into place.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from longserve.llm import LLM
from longserve.model import CausalLM


class FullAttention:
    """Cache-free causal attention over the given tokens (sliding windows honoured): teacher forcing."""

    def __init__(self, args, positions: torch.Tensor):
        self.args, self.positions = args, positions

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        window = self.args.layer_windows[layer]
        if not window:
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.args.scaling, enable_gqa=True
            )
        pos = self.positions[0]
        delta = pos[:, None] - pos[None, :]
        mask = (delta >= 0) & (delta < window)
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.args.scaling, enable_gqa=True
        )


def answer_logits(model: CausalLM, ids: list[int], n_prompt: int, chunk: int = 128):
    """Yield (start, logits [n, V]) over the positions that predict the answer tokens ids[n_prompt:]."""
    x = torch.tensor([ids])
    positions = torch.arange(len(ids))[None]
    hidden = model.hidden_states(x, positions, FullAttention(model.args, positions))[0]
    for start in range(n_prompt - 1, len(ids) - 1, chunk):
        end = min(start + chunk, len(ids) - 1)
        yield start - (n_prompt - 1), model.logits(hidden[start:end])


@dataclass
class Example:
    prompt: str
    prompt_ids: list[int]
    answer_ids: list[int]
    answer: str
    topk_ids: torch.Tensor | None = None  # [len(answer_ids), K] int32
    topk_logprobs: torch.Tensor | None = None  # [len(answer_ids), K] float16


@dataclass
class TeacherData:
    examples: list[Example]
    meta: dict = field(default_factory=dict)

    @property
    def n_answer_tokens(self) -> int:
        return sum(len(e.answer_ids) for e in self.examples)

    @property
    def white_box(self) -> bool:
        return bool(self.examples) and all(e.topk_ids is not None for e in self.examples)

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        ex = self.examples
        tensors = {
            "prompt_lens": torch.tensor([len(e.prompt_ids) for e in ex], dtype=torch.int32),
            "answer_lens": torch.tensor([len(e.answer_ids) for e in ex], dtype=torch.int32),
            "prompt_ids": torch.tensor([t for e in ex for t in e.prompt_ids], dtype=torch.int32),
            "answer_ids": torch.tensor([t for e in ex for t in e.answer_ids], dtype=torch.int32),
        }
        if self.white_box:
            tensors["topk_ids"] = torch.cat([e.topk_ids for e in ex]).to(torch.int32).contiguous()
            tensors["topk_logprobs"] = torch.cat([e.topk_logprobs for e in ex]).to(torch.float16).contiguous()
        metadata = {
            "meta": json.dumps(self.meta),
            "prompts": json.dumps([e.prompt for e in ex]),
            "answers": json.dumps([e.answer for e in ex]),
        }
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            save_file(tensors, str(tmp), metadata=metadata)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TeacherData:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
            t = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        prompts, answers = json.loads(metadata["prompts"]), json.loads(metadata["answers"])
        examples, p_off, a_off = [], 0, 0
        for i, (pl, al) in enumerate(zip(t["prompt_lens"].tolist(), t["answer_lens"].tolist(), strict=True)):
            e = Example(
                prompts[i],
                t["prompt_ids"][p_off : p_off + pl].tolist(),
                t["answer_ids"][a_off : a_off + al].tolist(),
                answers[i],
            )
            if "topk_ids" in t:
                e.topk_ids, e.topk_logprobs = (
                    t["topk_ids"][a_off : a_off + al],
                    t["topk_logprobs"][a_off : a_off + al],
                )
            examples.append(e)
            p_off, a_off = p_off + pl, a_off + al
        return cls(examples, json.loads(metadata["meta"]))


def as_prompt(llm: LLM, text: str):
    """A user turn for chat models, the raw text otherwise."""
    return [{"role": "user", "content": text}] if llm.tokenizer.chat_template else text


@torch.inference_mode()
def build_teacher_data(
    target: LLM,
    prompts: list[str],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k_logits: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> TeacherData:
    """Generate the target's answers (greedy or sampled) and, if `top_k_logits`, its top-k log-probs."""
    examples = []
    for i, text in enumerate(tqdm(prompts, disable=not progress, desc="teacher answers", unit="prompt")):
        prompt = as_prompt(target, text)
        out = target.generate(
            prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed + i if temperature > 0 else None,
        )[0]
        prompt_ids = target.encode(prompt)
        e = Example(text, prompt_ids, list(out.token_ids), out.text)
        if top_k_logits and e.answer_ids:
            ids, lps = [], []
            for _, logits in answer_logits(target.loaded.model, prompt_ids + e.answer_ids, len(prompt_ids)):
                top = logits.float().log_softmax(-1).topk(top_k_logits, dim=-1)
                ids.append(top.indices.to(torch.int32))
                lps.append(top.values.to(torch.float16))
            e.topk_ids, e.topk_logprobs = torch.cat(ids), torch.cat(lps)
        examples.append(e)
    meta = {
        "target": target.loaded.name,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_k_logits": top_k_logits,
        "seed": seed,
    }
    return TeacherData(examples, meta)
