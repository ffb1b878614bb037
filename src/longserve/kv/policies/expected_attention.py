"""Expected attention (Devoto et al., 2025; kvpress `ExpectedAttentionPress`): score each key by the
attention that *future* queries are expected to pay it, without seeing any of them.

Query-agnostic: the prompt's own queries give a Gaussian model of queries (mean and covariance, per
query head, before RoPE); rotated forward to the next `n_future` positions (the average rotation),
the expected softmax logit of a key k is  mu.k * s + k' Sigma k * s^2 / 2  (s = the attention
scaling; the second term is the Gaussian's moment-generating correction). Scores are the softmax
of those logits over the keys, averaged over each KV head's query group, times the value's norm
(a key that draws attention but carries a small value changes little).

Here the statistics come from the post-RoPE queries of the last prefill chunk (the whole prompt when
it fits one chunk), each rotated back to position 0 with the layer's RoPE frequencies; kvpress
projects the hidden states with W_q instead, which is the same for models without a q bias or QK
norm, and ignores both for the others. The first `n_sink` tokens are kept and left out of the
statistics (their queries are outliers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from longserve.errors import InvalidParameterError
from longserve.kv.policies.base import Policy, ScoreInputs, rotate_by


@dataclass
class ExpectedAttentionPolicy(Policy):
    name: ClassVar[str] = "expected_attention"
    window: int = 0
    n_sink: int = 4
    n_future: int = 512  # future positions the mean rotation averages over
    use_covariance: bool = True
    use_vnorm: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_future < 1:
            raise InvalidParameterError(f"expected_attention needs n_future >= 1, got {self.n_future}")

    def query_statistics(self, inputs: ScoreInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean [Hq, D], covariance [Hq, D, D] or None) of the queries as the next `n_future`
        positions will see them: pre-RoPE statistics under the average forward rotation."""
        q = inputs.queries.float()
        tq = q.shape[1]
        q_pos = inputs.positions[-tq:]
        q = inputs.rotate(q, -q_pos)[:, q_pos >= self.n_sink]  # back to position 0; sinks left out
        if q.shape[1] == 0:
            raise InvalidParameterError("expected_attention needs prompt queries beyond the sink tokens")
        mean = q.mean(1)
        cov = None
        if self.use_covariance:
            centred = q - mean[:, None]
            cov = centred.transpose(1, 2) @ centred / q.shape[1]
        start = int(inputs.positions[-1]) + 1
        future = torch.arange(start, start + self.n_future, device=q.device, dtype=torch.float32)
        angles = future[:, None] * inputs.inv_freq.float()[None, :]
        angles = torch.cat([angles, angles], -1)
        cos, sin = angles.cos().mean(0), angles.sin().mean(0)  # the average rotation R
        mean = rotate_by(mean, cos, sin)
        if cov is not None:  # R Sigma R^T: rotate the columns, then the rows
            cov = rotate_by(rotate_by(cov, cos, sin).transpose(1, 2), cos, sin)
        return mean, cov

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        if inputs.inv_freq is None:
            raise InvalidParameterError(
                "expected_attention rotates queries with the model's RoPE frequencies, which this code "
                "path does not pass; use LLM.generate / LLM.compress"
            )
        mean, cov = self.query_statistics(inputs)
        keys = inputs.keys.float()
        hkv, length, d = keys.shape
        if length <= self.n_sink:  # nothing but sinks, which are kept anyway
            return torch.zeros(hkv, length, device=keys.device)
        group = inputs.group_size
        s = inputs.scaling
        kg = keys.repeat_interleave(group, 0)  # [Hq, L, D]
        logits = (kg @ mean[:, :, None])[..., 0] * s
        if cov is not None:
            logits = logits + ((kg @ cov) * kg).sum(-1) * (s * s / 2)
        logits[:, : self.n_sink] = float("-inf")
        scores = logits.softmax(-1).view(hkv, group, length).mean(1)
        if self.use_vnorm:
            scores = scores * inputs.values.float().norm(dim=-1)
        return scores
