"""KVzip (Kim et al., 2025): keep the entries the model needs to *reconstruct* the context.

Query-agnostic: after the prompt is prefilled, the model is asked to repeat it ("Repeat the previous
context exactly." + the end of the user turn + the context itself, on top of the context's KV); each
entry's score is the largest attention it receives from those tokens, over each KV head's query group
(`kv/scoring_pass.py`). What a model needs to repeat a text is what any later question about it can
need, so one compressed context answers many questions.

Details follow the reference implementation in kvpress (`KVzipPress`): the chat template's opening
(system prompt, user header) is not repeated and scores 0 apart from the `n_sink` first tokens
(which score 1); contexts longer than `chunk_size` are repeated chunk by chunk, each later chunk
prompted with "Repeat the part of the previous context exactly, starting with" + the previous
chunk's last `overlap` tokens; a chunk's scores are softmax-normalised over the sinks, the chunk's
entries and the repeat tokens only. Differences: kvpress prunes one global threshold over all layers
and heads; here every layer keeps the same number of tokens (the pool's layout), per KV head
(`kvzip`) or, wrapped in AdaKV (`head_adaptive=True`, `head_floor=0` for kvpress's no-floor
behaviour), with one top-k over the heads of a layer. The prompt's last token is not part of the
pass (the pass runs on top of the others) and is always kept (`window=1`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from longserve.errors import InvalidParameterError
from longserve.kv.policies.base import Policy, ScoreInputs, ScoringChunk

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
LATER_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"


def template_parts(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(ids of a user turn's opening, ids that close the turn and open the answer), from the chat
    template (kvpress's dummy-context split); a model without one: ([], "\\n")."""
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    if not getattr(tokenizer, "chat_template", None):
        return [], encode("\n")
    dummy = "dummy context"
    sep = "\n" + "#" * len(dummy)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": dummy + sep}], add_generation_prompt=True, tokenize=False
    )
    head, suffix = text.split(sep)
    return encode(head.split(dummy)[0]), encode(suffix)


@dataclass
class KVzipPolicy(Policy):
    name: ClassVar[str] = "kvzip"
    has_scoring_pass: ClassVar[bool] = True
    window: int = 1
    n_sink: int = 4
    chunk_size: int = 2048  # context tokens repeated per pass (bounds the pass's attention memory)
    overlap: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_size < 1 or self.overlap < 0:
            raise InvalidParameterError(
                f"kvzip needs chunk_size >= 1 and overlap >= 0, got {self.chunk_size} and {self.overlap}"
            )

    def scoring_pass(self, prompt_ids: list[int], tokenizer: Any) -> list[ScoringChunk]:
        """The reconstruction chunks that score the entries of `prompt_ids`."""
        if tokenizer is None:
            raise InvalidParameterError("kvzip builds its reconstruction prompt with the model's tokenizer")
        opening, suffix = template_parts(tokenizer)
        start = 0
        for offset in (0, 1):  # a tokenizer may prepend BOS to the templated text
            if opening and prompt_ids[offset : offset + len(opening)] == opening:
                start = offset + len(opening)
                break
        first = tokenizer.encode(FIRST_PROMPT, add_special_tokens=False)
        later = tokenizer.encode(LATER_PROMPT, add_special_tokens=False)
        chunks = []
        for c0 in range(start, len(prompt_ids), self.chunk_size):
            c1 = min(len(prompt_ids), c0 + self.chunk_size)
            head = first if c0 == start else later + prompt_ids[max(start, c0 - self.overlap) : c0]
            chunks.append(ScoringChunk(head + suffix + prompt_ids[c0:c1], c0, c1, self.n_sink))
        return chunks

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        if inputs.pass_scores is None:
            raise InvalidParameterError(
                "kvzip scores the cache with its reconstruction pass, which this code path does not "
                "run; use LLM.generate / LLM.compress (the engine runs the pass)"
            )
        return inputs.pass_scores
