"""Weight-only int8 / int4 linear layers on PyTorch's native CPU kernels, swapped in after a model loads.

Batch-1 decode reads every weight once per token, so it is bound by weight bytes: bf16 halves fp32's, int8
halves bf16's, int4 quarters it. The kernels are ATen's own (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`), which take bf16 (fast path), fp16 or fp32 activations; no extra package.

The quantized weights are made from the loaded (bf16/fp32) weights, not from the GGUF blocks directly:
- int8: symmetric, one scale per output channel (``max|w| / 127``).
- int4: asymmetric min-max per group of `group_size` input channels (32 by default: the block size of
  GGUF's Q4_0/Q4_1 and of Q4_K's sub-blocks, so weights that came from a 4-bit GGUF fall back on a grid
  close to their source's, up to bf16 rounding of the scales).
Every `nn.Linear` of the decoder and the LM head is replaced (a tied head gets its own quantized copy;
the embedding table stays dense for lookups); the fused q/k/v and gate/up copies are dropped.
"""

from __future__ import annotations

import torch
from torch import nn

from longserve.errors import InvalidParameterError

#: What `--weights` / `LLM(weights=)` accept. "auto": dense, in the compute dtype.
WEIGHT_CHOICES = ("auto", "bf16", "fp32", "int8", "int4")
QUANTIZED = ("int8", "int4")
DENSE = {"bf16": "bfloat16", "fp32": "float32"}
INT4_GROUPS = (32, 64, 128)


def check_weights(weights: str) -> str:
    if weights not in WEIGHT_CHOICES:
        raise InvalidParameterError(f"weights must be one of {', '.join(WEIGHT_CHOICES)}, got {weights!r}")
    return weights


class Int8Linear(nn.Module):
    """y = x @ (q * s)^T + b with q int8 [out, in] and s one scale per output row (activation dtype)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        qweight = torch.empty(weight.shape, dtype=torch.int8)
        scales = torch.empty(weight.shape[0])
        for rows in _row_chunks(weight):  # fp32 temporaries of a few MiB, not of the whole matrix
            w = weight[rows].to(torch.float32, copy=True)  # in-place math below: never on the weight
            scales[rows] = w.abs().amax(dim=1).clamp(min=1e-12) / 127
            qweight[rows] = w.div_(scales[rows, None]).round_().clamp_(-127, 127).to(torch.int8)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales.to(dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features), self.qweight, self.scales)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (a new tensor each call: for inspection and fingerprints, not compute)."""
        return self.qweight.to(self.scales.dtype) * self.scales[:, None]


class Int4Linear(nn.Module):
    """y = x @ W^T + b with W = (q - 8) * scale + zero per group of input channels, q in 0..15 packed two
    per byte in the CPU kernel's layout."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, group_size: int = 32):
        super().__init__()
        n, k = linear.out_features, linear.in_features
        if group_size not in INT4_GROUPS or k % group_size:
            raise InvalidParameterError(
                f"int4 needs a group size in {INT4_GROUPS} that divides {k} input channels, got {group_size}"
            )
        self.in_features, self.out_features, self.group_size = k, n, group_size
        rows = -(-n // 16) * 16  # the kernel packs 16 output rows at a time: pad with zero rows
        weight = linear.weight.detach()
        if rows != n:
            weight = torch.cat([weight, weight.new_zeros(rows - n, k)])
        n, groups = rows, k // group_size
        packed = torch.empty(n, k // 2, dtype=torch.uint8)
        scale, lo = torch.empty(n, groups, 1), torch.empty(n, groups, 1)
        # fp32 and int32 temporaries of a few MiB, not of the whole matrix; the kernel's packing works on
        # blocks of 64 rows, so chunks of 64-row multiples pack exactly as the whole matrix would
        for r in _row_chunks(weight, multiple=64):
            w = weight[r].to(torch.float32, copy=True).reshape(-1, groups, group_size)
            lo[r] = w.amin(dim=-1, keepdim=True)
            scale[r] = (w.amax(dim=-1, keepdim=True) - lo[r]).clamp(min=1e-12) / 15
            q = w.sub_(lo[r]).div_(scale[r]).round_().clamp_(0, 15).to(torch.int32).reshape(-1, k)
            packed[r] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        zero = lo + 8 * scale  # the kernel computes (q - 8) * scale + zero
        self.register_buffer("packed", packed)
        sz = torch.cat([scale.reshape(n, -1, 1), zero.reshape(n, -1, 1)], dim=2).transpose(0, 1)
        self.register_buffer("scales_zeros", sz.contiguous().to(dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.in_features), self.packed, self.group_size, self.scales_zeros
        )
        if out.shape[-1] != self.out_features:  # padded rows
            out = out[:, : self.out_features].contiguous()
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, read back through the kernel itself (x = identity), so it is exactly
        what forward multiplies by."""
        eye = torch.eye(self.in_features, dtype=self.scales_zeros.dtype, device=self.packed.device)
        w_t = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self.scales_zeros)
        return w_t[:, : self.out_features].t().contiguous()


def _row_chunks(weight: torch.Tensor, chunk_bytes: int = 4 << 20, multiple: int = 1) -> list[slice]:
    """Row slices of ``weight`` whose fp32 copy is about ``chunk_bytes`` (a multiple of ``multiple`` rows)."""
    per = max(multiple, chunk_bytes // (4 * weight.shape[1]) // multiple * multiple)
    return [slice(i, min(i + per, weight.shape[0])) for i in range(0, weight.shape[0], per)]


def int4_group(in_features: int, preferred: int) -> int:
    """``preferred`` if it divides ``in_features``, else the largest of INT4_GROUPS that does."""
    if in_features % preferred == 0:
        return preferred
    fits = [g for g in INT4_GROUPS if in_features % g == 0]
    if not fits:
        raise InvalidParameterError(f"int4: no group size in {INT4_GROUPS} divides {in_features} channels")
    return max(fits)


def _swap(parent: nn.Module, weights: str, dtype: torch.dtype, group_size: int) -> None:
    """Replace the nn.Linear children of ``parent`` by their quantized versions."""
    for name, child in list(parent.named_children()):
        if type(child) is nn.Linear:
            if weights == "int8":
                setattr(parent, name, Int8Linear(child, dtype))
            else:
                setattr(parent, name, Int4Linear(child, dtype, int4_group(child.in_features, group_size)))


def _check(weights: str) -> None:
    if weights not in QUANTIZED:
        raise InvalidParameterError(f"quantize takes {' or '.join(QUANTIZED)}, got {weights!r}")


@torch.no_grad()
def quantize_layer(layer: nn.Module, weights: str, dtype: torch.dtype, group_size: int = 32) -> None:
    """Quantize one decoder layer's linears (the loader calls this as each layer is read)."""
    _check(weights)
    layer.self_attn.qkv = None  # the fused dense copies would keep the dense weights alive
    layer.mlp.gate_up = None
    _swap(layer.self_attn, weights, dtype, group_size)
    _swap(layer.mlp, weights, dtype, group_size)


@torch.no_grad()
def quantize_head(model: nn.Module, weights: str, group_size: int = 32) -> None:
    """Quantize the LM head (a tied one gets its own copy: the embedding stays dense for lookups)."""
    _check(weights)
    _swap(model, weights, model.model.embed_tokens.weight.dtype, group_size)


def quantize(model: nn.Module, weights: str, group_size: int = 32) -> nn.Module:
    """Replace every nn.Linear of ``model`` (a loaded CausalLM on the CPU) by its int8/int4 version, in
    the dtype of the model's activations; layer by layer, so at most one layer is held twice."""
    _check(weights)
    dtype = model.model.embed_tokens.weight.dtype
    if model.model.embed_tokens.weight.device.type != "cpu":
        raise InvalidParameterError("int8/int4 weights run on the CPU kernels only; load on the CPU")
    for layer in model.model.layers:
        quantize_layer(layer, weights, dtype, group_size)
    quantize_head(model, weights, group_size)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer (quantized payloads, scales, the embedding)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum({t.data_ptr(): t.nbytes for t in tensors}.values())
