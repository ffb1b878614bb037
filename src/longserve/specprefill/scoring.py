"""Token importance from a small draft model (Speculative Prefill, Liu et al. 2025) and chunk selection.

The draft reads the prompt, then greedily "answers" for `lookahead` tokens. The tokens the answer attends
to are the ones the target will need: for every layer we take the queries of the last prompt token and of
each look-ahead token, softmax them over the prompt keys (GQA: each query head against its KV head), smooth
every attention row along the sequence (average pooling, so a chunk's neighbours count too), take the max
over layers x heads and the mean over the look-ahead queries. Chunk scores are the mean token score of each
`chunk` tokens; the top `ceil(n_chunks * keep)` chunks are kept in their original order.

Memory: a capturing attention backend keeps each layer's keys/values (the look-ahead decode needs them
anyway) and only the `1 + lookahead` query rows that vote; attention maps are built one layer at a time
and only for those rows ([heads, 1 + lookahead, prompt] floats), never as full [T, T] matrices.

Prompts longer than the draft's window are scored in windows: every window holds the first few prompt
tokens (the attention sink), one slice of the prompt and the prompt's last `max(keep_tail, chunk)` tokens
(the question), so each slice is scored against the question as if it were the whole prompt. Scores of
different windows are softmax-normalised over similar lengths, hence comparable enough to rank chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from longserve.errors import InvalidParameterError
from longserve.model import CausalLM


@dataclass(frozen=True)
class SpecPrefillConfig:
    """Everything that shapes which tokens survive.

    `keep`: fraction of the prompt kept, in (0, 1]; `chunk`: selection granularity in draft tokens;
    `lookahead`: draft decode steps whose queries vote; `pool_kernel`: smoothing width (tokens);
    `keep_tail`: last prompt tokens always kept (the question / instructions); `keep_special`: always keep
    special tokens and chat-template scaffolding; `delimiter`: what replaces a dropped gap when the
    compressed prompt is text (cross-tokenizer path); `word_reach`: kept text is widened to whole words, up to
    this many characters each way (0 = cut at token edges); `tolerance`: relative error allowed on the keep rate
    measured in target tokens (cross-tokenizer path); `window`: longest sequence the draft scores in one
    pass (default: its context window); `prefill_chunk`: draft prefill chunk (bounds activation memory).
    """

    keep: float = 0.25
    chunk: int = 32
    lookahead: int = 8
    pool_kernel: int = 13
    keep_tail: int = 64
    keep_special: bool = True
    delimiter: str = " [...] "
    word_reach: int = 32
    tolerance: float = 0.05
    window: int | None = None
    prefill_chunk: int = 2048

    def __post_init__(self) -> None:
        keep = self.keep
        if isinstance(keep, bool) or not isinstance(keep, int | float) or not (0 < keep <= 1):
            raise InvalidParameterError(f"keep must be a fraction in (0, 1], got {keep!r}")
        for name in ("chunk", "pool_kernel", "prefill_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidParameterError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("lookahead", "keep_tail", "word_reach"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidParameterError(f"{name} must be an integer >= 0, got {value!r}")
        if not (0 < self.tolerance < 1):
            raise InvalidParameterError(f"tolerance must be in (0, 1), got {self.tolerance!r}")
        min_window = 4 * self.chunk + self.lookahead
        if self.window is not None and self.window < min_window:
            raise InvalidParameterError(
                f"window must be >= 4 * chunk + lookahead = {min_window}, got {self.window}"
            )


@dataclass
class Importance:
    """Per-token scores of one prompt and the draft's look-ahead tokens (for inspection and tests)."""

    scores: torch.Tensor  # [N] float32
    lookahead_ids: list[int] = field(default_factory=list)
    windows: int = 1


class _CaptureBackend:
    """Causal attention for the draft's own forward, keeping per layer the keys/values (for the
    look-ahead decode) and the queries of the rows that vote (last prompt token + look-ahead tokens)."""

    def __init__(self, model: CausalLM, capacity: int, n_votes: int, layers: list[int]):
        args = model.args
        dtype = model.lm_head.weight.dtype
        self.args = args
        shape = (args.n_kv_heads, capacity, args.head_dim)
        self.k = [torch.empty(shape, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.empty(shape, dtype=dtype) for _ in range(args.n_layers)]
        self.votes = {
            layer: torch.empty(args.n_heads, n_votes, args.head_dim, dtype=dtype) for layer in layers
        }
        self.pos = torch.arange(capacity)
        self.fill = 0
        self.n_voted = 0
        self.capture = False  # keep the last query row of the current forward

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        start, end = self.fill, self.fill + k.shape[2]
        self.k[layer][:, start:end] = k[0]
        self.v[layer][:, start:end] = v[0]
        window = self.args.layer_windows[layer]
        scale = self.args.scaling
        if start == 0 and window is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            qp, kp = self.pos[start:end, None], self.pos[None, :end]
            mask = kp <= qp
            if window:
                mask &= (qp - kp) < window
            keys, values = self.k[layer][None, :, :end], self.v[layer][None, :, :end]
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
            )
        if self.capture and layer in self.votes:
            self.votes[layer][:, self.n_voted] = q[0, :, -1]
        return out

    def advance(self, n: int) -> None:
        self.fill += n
        if self.capture:
            self.n_voted += 1
            self.capture = False


def scored_layers(model: CausalLM) -> list[int]:
    """Global-attention layers (sliding-window layers only see the tail, which is kept anyway); all layers
    if the model has no global one."""
    windows = model.args.layer_windows
    glob = [i for i, w in enumerate(windows) if w is None]
    return glob or list(range(model.args.n_layers))


def smooth(rows: torch.Tensor, kernel: int) -> torch.Tensor:
    """Average pooling along the last dim (zero padded, same length): [R, N] -> [R, N]."""
    n = rows.shape[-1]
    if kernel <= 1:
        return rows
    out = F.avg_pool1d(rows[:, None], kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    return out[:, 0, :n]


@torch.inference_mode()
def _score_once(model: CausalLM, ids: list[int], cfg: SpecPrefillConfig) -> Importance:
    n, steps = len(ids), cfg.lookahead
    layers = scored_layers(model)
    backend = _CaptureBackend(model, n + steps, 1 + steps, layers)
    tokens = torch.tensor([ids])
    positions = torch.arange(n)[None]
    logits = None
    for start in range(0, n, cfg.prefill_chunk):
        end = min(n, start + cfg.prefill_chunk)
        backend.capture = end == n
        logits = model(tokens[:, start:end], positions[:, start:end], backend)
        backend.advance(end - start)
    lookahead = []
    for _ in range(steps):
        token = int(logits[0].argmax())
        lookahead.append(token)
        backend.capture = True
        logits = model(torch.tensor([[token]]), torch.tensor([[backend.fill]]), backend)
        backend.advance(1)

    args = model.args
    n_q, group = backend.n_voted, args.n_heads // args.n_kv_heads
    q_pos = torch.arange(n - 1, n - 1 + n_q)
    best = None
    for layer in layers:
        q = backend.votes[layer][:, :n_q].float()  # [Hq, Q, D]
        keys = backend.k[layer][:, :n].float()  # [Hkv, N, D]
        logit = q.reshape(args.n_kv_heads, group * n_q, args.head_dim) @ keys.transpose(1, 2)
        logit = logit.view(args.n_heads, n_q, n) * args.scaling
        window = args.layer_windows[layer]
        if window:
            logit = logit.masked_fill((q_pos[:, None] - torch.arange(n)[None]) >= window, float("-inf"))
        probs = smooth(logit.softmax(-1).view(-1, n), cfg.pool_kernel).view(args.n_heads, n_q, n)
        layer_best = probs.amax(0)  # [Q, N]
        best = layer_best if best is None else torch.maximum(best, layer_best)
    return Importance(best.mean(0), lookahead)


def token_importance(
    model: CausalLM, ids: list[int], cfg: SpecPrefillConfig, window: int | None = None
) -> Importance:
    """Importance of every prompt token (see the module docstring); windowed beyond `window` tokens."""
    if not ids:
        raise InvalidParameterError("the prompt is empty")
    limit = (cfg.window or window or model.args.max_position) - cfg.lookahead
    n = len(ids)
    if n <= limit:
        return _score_once(model, ids, cfg)
    n_tail = min(max(cfg.keep_tail, cfg.chunk), limit // 4)
    n_sink = min(4, cfg.chunk)
    head, tail = ids[: n - n_tail], ids[n - n_tail :]
    scores = torch.zeros(n)
    start, windows, lookahead = 0, 0, []
    while start < len(head):
        prefix = [] if start == 0 else head[:n_sink]
        end = min(len(head), start + limit - n_tail - len(prefix))
        part = _score_once(model, prefix + head[start:end] + tail, cfg)
        scores[start:end] = part.scores[len(prefix) : len(prefix) + end - start]
        scores[n - n_tail :] = torch.maximum(scores[n - n_tail :], part.scores[-n_tail:])
        lookahead = part.lookahead_ids
        start, windows = end, windows + 1
    return Importance(scores, lookahead, windows)


def n_chunks(n_tokens: int, chunk: int) -> int:
    return math.ceil(n_tokens / chunk)


def chunks_for(keep: float, total_chunks: int) -> int:
    """`ceil(total_chunks * keep)`, robust to float noise (0.1 * 30 must give 3, not 4)."""
    return min(total_chunks, max(0, math.ceil(total_chunks * keep - 1e-9)))


def chunk_scores(scores: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean token score of each chunk (the last chunk may be shorter)."""
    n = scores.shape[0]
    total = n_chunks(n, chunk)
    padded = torch.zeros(total * chunk)
    padded[:n] = scores.float()
    counts = torch.full((total,), float(chunk))
    counts[-1] = n - (total - 1) * chunk
    return padded.view(total, chunk).sum(1) / counts


def select_tokens(scores: torch.Tensor, forced: torch.Tensor, chunk: int, n_select: int) -> torch.Tensor:
    """Keep-mask [N]: the `n_select` best chunks (chunks made only of forced tokens first, so they count
    against the budget) plus every forced token. Order is preserved by construction (a mask)."""
    n = scores.shape[0]
    total = n_chunks(n, chunk)
    per_chunk = chunk_scores(scores, chunk)
    padded = torch.ones(total * chunk, dtype=torch.bool)
    padded[:n] = forced
    fully_forced = padded.view(total, chunk).all(1)
    per_chunk = per_chunk.masked_fill(fully_forced, float("inf"))
    order = torch.sort(per_chunk, descending=True, stable=True).indices
    chosen = torch.zeros(total, dtype=torch.bool)
    chosen[order[: max(0, min(n_select, total))]] = True
    return chosen.repeat_interleave(chunk)[:n] | forced
