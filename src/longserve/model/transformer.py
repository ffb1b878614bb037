"""A plain-PyTorch decoder (gpt-fast style) for the Llama, Mistral, Qwen2, Qwen3 and Gemma3 families.

Weights keep Hugging Face's parameter names, so a HF state dict loads as is. The model never
touches a KV cache itself: every attention layer hands its post-RoPE queries, keys and values to
an `AttentionBackend` (see `longserve.kv.attention`), which owns caching, eviction and masking.
That is what lets one model serve every compression policy and every batching scheme.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from longserve.model.config import ModelArgs


class AttentionBackend(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [B, Hq, T, D], k/v: [B, Hkv, T, D] for the new tokens; returns [B, Hq, T, D]."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma multiplies in fp32 before casting
            return (normed * (self.offset + self.weight.float())).type_as(x)
        return self.weight * normed.type_as(x)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """The row-wise concatenation of ``parts``: the tensor they already are row blocks of when they lie
    back to back in one storage (the loader reads them that way), else a new concatenated copy."""
    first = parts[0]
    storage, offset = first.untyped_storage(), first.storage_offset()
    for p in parts:
        if p.untyped_storage().data_ptr() != storage.data_ptr() or p.storage_offset() != offset:
            return torch.cat(parts).detach()
        if not p.is_contiguous() or p.dtype != first.dtype or p.shape[1:] != first.shape[1:]:
            return torch.cat(parts).detach()
        offset += p.numel()
    rows = sum(p.shape[0] for p in parts)
    return first.detach().new_empty(0).set_(storage, first.storage_offset(), (rows, *first.shape[1:]))


class FusedLinear:
    """Concatenated copies of several nn.Linear weights of `owner`, used only while they are still exact:
    not while training (gradients must reach the originals), not once a weight changed or a module was
    replaced (e.g. wrapped by LoRA)."""

    def __init__(self, owner: nn.Module, names: list[str]):
        self.owner, self.names = owner, names
        parts = [getattr(owner, n) for n in names]
        self.weight = _joined([p.weight for p in parts])
        self.bias = _joined([p.bias for p in parts]) if parts[0].bias is not None else None
        with torch.no_grad():  # the parts become views of the fused tensor: one copy of the weights, not two
            sizes = [p.weight.shape[0] for p in parts]
            for p, w in zip(parts, self.weight.split(sizes), strict=True):
                p.weight.data = w
            if self.bias is not None:
                for p, b in zip(parts, self.bias.split(sizes), strict=True):
                    p.bias.data = b
        self.key = [(id(p.weight), p.weight._version) for p in parts]
        self.checked = False

    def usable(self) -> bool:
        """Checked on every eager call. A compiled graph cannot read `_version` without breaking, so
        it reads `checked`, which `CausalLM.check_fused` sets from this before each compiled call
        (dynamo guards on the bool: a change recompiles rather than running stale weights)."""
        if torch.is_grad_enabled():
            return False
        parts = [getattr(self.owner, n) for n in self.names]
        return all(type(p) is nn.Linear for p in parts) and self.key == [
            (id(p.weight), p.weight._version) for p in parts
        ]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.args = layer, args
        d, hd = args.hidden_size, args.head_dim
        self.q_proj = nn.Linear(d, args.n_heads * hd, bias=args.qkv_bias)
        self.k_proj = nn.Linear(d, args.n_kv_heads * hd, bias=args.qkv_bias)
        self.v_proj = nn.Linear(d, args.n_kv_heads * hd, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * hd, d, bias=False)
        self.qkv: FusedLinear | None = None  # set by fuse()
        if args.qk_norm:
            offset = 1.0 if args.gemma_style else 0.0
            self.q_norm = RMSNorm(hd, args.rms_eps, offset)
            self.k_norm = RMSNorm(hd, args.rms_eps, offset)

    def fuse(self) -> None:
        """One [q; k; v] matmul instead of three: fewer, larger GEMMs are what a CPU decode step needs."""
        self.qkv = FusedLinear(self, ["q_proj", "k_proj", "v_proj"])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: AttentionBackend):
        b, t, _ = x.shape
        hd, hq, hkv = self.args.head_dim, self.args.n_heads, self.args.n_kv_heads
        if self.qkv is not None and (
            self.qkv.checked if torch.compiler.is_compiling() else self.qkv.usable()
        ):
            q, k, v = F.linear(x, self.qkv.weight, self.qkv.bias).split([hq * hd, hkv * hd, hkv * hd], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, t, -1, hd).transpose(1, 2)
        k = k.view(b, t, -1, hd).transpose(1, 2)
        v = v.view(b, t, -1, hd).transpose(1, 2)
        if self.args.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = backend.attend(self.layer, q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.gemma_style = args.gemma_style
        self.gate_up: FusedLinear | None = None  # set by fuse()

    def fuse(self) -> None:
        self.gate_up = FusedLinear(self, ["gate_proj", "up_proj"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None and (
            self.gate_up.checked if torch.compiler.is_compiling() else self.gate_up.usable()
        ):
            gate, up = F.linear(x, self.gate_up.weight).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        gate = F.gelu(gate, approximate="tanh") if self.gemma_style else F.silu(gate)
        return self.down_proj(gate * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        offset = 1.0 if args.gemma_style else 0.0
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_eps, offset)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_eps, offset)
        self.sandwich = args.gemma_style
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(args.hidden_size, args.rms_eps, offset)
            self.post_feedforward_layernorm = RMSNorm(args.hidden_size, args.rms_eps, offset)

    def forward(self, x, cos, sin, backend):
        h = self.self_attn(self.input_layernorm(x), cos, sin, backend)
        if self.sandwich:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_eps, 1.0 if args.gemma_style else 0.0)


class _FirstRow:
    """Wraps a backend for a one-token forward padded to two rows: attention sees only the real token."""

    def __init__(self, backend: AttentionBackend):
        self.backend = backend

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self.backend.attend(layer, q[:, :, :1], k[:, :, :1], v[:, :, :1])
        return out.repeat(1, 1, 2, 1)


class CausalLM(nn.Module):
    """`forward(ids, positions, backend)` -> logits. Positions are explicit per token, so evicted or
    skipped tokens never shift the RoPE phase of what comes after them.

    `row_invariant`: a one-token forward runs its linears on two rows (the token twice). A CPU GEMM
    computes each row of a 2..k-row product exactly as it does in any other row count, but the 1-row
    product takes a GEMV path that sums in another order (bf16: up to an ulp per output); padding makes a
    token's logits the same bits whether it runs alone or in a speculative k+1-row verify."""

    row_invariant: bool = False

    def __init__(self, args: ModelArgs, rope: dict[str, tuple[torch.Tensor, float]]):
        super().__init__()
        self.args = args
        self.model = Decoder(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope_kinds = list(rope)
        # non-persistent buffers, so `.to(device)` moves them; `_apply` keeps them fp32 whatever dtype
        # the weights take (bf16 frequencies would shift the phase of far positions)
        for kind, (inv_freq, _) in rope.items():
            self.register_buffer(f"inv_freq_{kind}", inv_freq.float(), persistent=False)
        self.rope_scale = {kind: scale for kind, (_, scale) in rope.items()}
        self.layer_rope_index = [self.rope_kinds.index(k) for k in args.layer_rope]

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin per RoPE kind for positions [B, T], shaped [B, 1, T, D] to broadcast over heads."""
        out = []
        for kind in self.rope_kinds:
            freqs = positions[..., None].float() * getattr(self, f"inv_freq_{kind}")
            emb = torch.cat((freqs, freqs), dim=-1)
            scale = self.rope_scale[kind]
            out.append(((emb.cos() * scale).to(dtype)[:, None], (emb.sin() * scale).to(dtype)[:, None]))
        return out

    def layer_inv_freq(self, layer: int) -> torch.Tensor:
        """[D/2] RoPE inverse frequencies of one layer: a scorer can rotate a post-RoPE vector to
        another position (expected attention predicts future queries that way)."""
        return getattr(self, f"inv_freq_{self.rope_kinds[self.layer_rope_index[layer]]}")

    def hidden_states(self, ids: torch.Tensor, positions: torch.Tensor, backend) -> torch.Tensor:
        x = self.model.embed_tokens(ids)
        if self.args.gemma_style:
            x = x * torch.tensor(self.args.hidden_size**0.5, dtype=x.dtype, device=x.device)
        tables = self.rope(positions, x.dtype)
        for layer, rope_index in zip(self.model.layers, self.layer_rope_index, strict=True):
            cos, sin = tables[rope_index]
            x = layer(x, cos, sin, backend)
        return self.model.norm(x)

    def _apply(self, fn, recurse: bool = True):
        freqs = {kind: getattr(self, f"inv_freq_{kind}") for kind in self.rope_kinds}
        super()._apply(fn, recurse)
        for kind, f in freqs.items():  # follow the device, never the dtype
            name = f"inv_freq_{kind}"
            setattr(self, name, f.to(getattr(self, name).device))
        if any(layer.self_attn.qkv is not None for layer in self.model.layers):
            self.fuse()  # the fused copies follow the weights to their new device / dtype
        return self

    def fuse(self) -> CausalLM:
        """Concatenate q/k/v and gate/up weights for inference (the separate weights stay for loading
        and training; call again after changing them)."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        return self

    def unfuse(self) -> CausalLM:
        """Drop the fused copies (the separate weights stay and are used instead). A fused copy points
        back at its module, a reference cycle: without this, freeing a dropped model waits for a full
        garbage collection (most of a second in a process with a few tokenizers loaded)."""
        for layer in self.model.layers:
            layer.self_attn.qkv = None
            layer.mlp.gate_up = None
        return self

    def check_fused(self) -> None:
        """Before a compiled forward: record, per fused copy, whether it is still exact (`checked`)."""
        for layer in self.model.layers:
            for fused in (layer.self_attn.qkv, layer.mlp.gate_up):
                if fused is not None:
                    fused.checked = fused.usable()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        if self.args.final_softcap:
            cap = self.args.final_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, backend, last_only: bool = True):
        if self.row_invariant and ids.numel() == 1 and not torch.compiler.is_compiling():
            hidden = self.hidden_states(ids.repeat(1, 2), positions.repeat(1, 2), _FirstRow(backend))[:, :1]
            return self.logits(hidden[:, -1] if last_only else hidden)
        hidden = self.hidden_states(ids, positions, backend)
        return self.logits(hidden[:, -1] if last_only else hidden)
