"""ACE's Generator -> Reflector -> Curator loop over a task with execution feedback.

Generator: answers with the playbook in its context. The playbook is the same prefix for every query
until it changes, so it is compressed once per version (`LLM.compress`) and each query pays only for
itself (`LLM.ask`). Reflector: reads the question, the answer and the checker's feedback, and names a
lesson and the bullets that helped or hurt. Curator: turns that into delta operations, which the code
merges (`Playbook.apply`). Offline adaptation runs over a training split (several epochs); online
adaptation answers each test query first, then learns from its feedback.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from jinja2 import Environment, StrictUndefined
from tqdm.auto import tqdm

from longserve.ace.playbook import Playbook, parse_operations
from longserve.icl.tasks import Example, Task, first_json

_ENV = Environment(undefined=StrictUndefined, keep_trailing_newline=True)

GENERATOR = _ENV.from_string(
    "{{ instruction }}\n\nPlaybook of strategies learned so far:\n{{ playbook }}\n\n"
    "Use the playbook. Answer with the output only."
)
REFLECTOR = _ENV.from_string(
    "A model answered a task using a playbook.\n\nTask: {{ instruction }}\nPlaybook:\n{{ playbook }}\n\n"
    "Input: {{ input }}\nModel answer: {{ answer }}\nFeedback: {{ feedback }}\n\n"
    "Reply with one JSON object: "
    '{"lesson": "<one general rule that would give the right answer>", '
    '"helpful": [<ids of bullets that helped>], "harmful": [<ids of bullets that misled>]}'
)
CURATOR = _ENV.from_string(
    "You maintain a playbook of strategies for this task: {{ instruction }}\n\nPlaybook:\n{{ playbook }}\n\n"
    "New reflection:\n{{ reflection }}\n\n"
    "Reply with a JSON list of operations, only what is new: "
    '{"op": "add", "section": "...", "content": "..."}, {"op": "update", "id": "b1", "content": "..."}, '
    '{"op": "remove", "id": "b2"}. Reply [] if nothing is new.'
)


@dataclass
class StepRecord:
    input: str
    answer: str
    correct: bool
    feedback: str
    operations: list[str] = field(default_factory=list)
    playbook_version: int = 0
    playbook_tokens: int = 0
    seconds: float = 0.0


class ACE:
    """`ACE(llm, task).adapt(train)` grows `self.playbook`; `evaluate(test)` measures it."""

    def __init__(
        self,
        llm,
        task: Task,
        playbook: Playbook | None = None,
        embed=None,
        kv_policy: str = "full",
        max_new_tokens: int = 96,
    ):
        self.llm, self.task, self.embed = llm, task, embed
        self.playbook = playbook or Playbook()
        self.kv_policy, self.max_new_tokens = kv_policy, max_new_tokens
        self._context: tuple[int, object] | None = None  # (playbook version, its compressed context)
        self.compressions = 0

    def context(self):
        """The generator's prefix for the current playbook version, compressed once."""
        if self._context is None or self._context[0] != self.playbook.version:
            text = GENERATOR.render(instruction=self.task.instruction, playbook=self.playbook.render())
            self._context = (self.playbook.version, self.llm.compress(text, kv_policy=self.kv_policy))
            self.compressions += 1
        return self._context[1]

    def playbook_tokens(self) -> int:
        return self.context().n_context_tokens

    def answer(self, example: Example) -> str:
        query = f"Input: {example.input}\nOutput:"
        return self.llm.ask(self.context(), query, max_new_tokens=self.task.max_new_tokens).text

    def _chat(self, prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        prompt_in = messages if self.llm.tokenizer.chat_template else prompt
        return self.llm.generate(prompt_in, max_new_tokens=self.max_new_tokens)[0].text

    def learn(self, example: Example, answer: str, feedback: str, correct: bool) -> list[str]:
        """Reflect on one answer and merge the curator's operations."""
        playbook = self.playbook.render()
        reflection_text = self._chat(
            REFLECTOR.render(
                instruction=self.task.instruction,
                playbook=playbook,
                input=example.input,
                answer=answer.strip(),
                feedback=feedback,
            )
        )
        reflection = first_json(reflection_text) or {}
        ops = [
            {"op": "tag", "id": i, "tag": tag}
            for tag in ("helpful", "harmful")
            for i in _ids(reflection, tag)
        ]
        lesson = str(reflection.get("lesson", "")).strip()
        curated = self._chat(
            CURATOR.render(
                instruction=self.task.instruction, playbook=playbook, reflection=lesson or reflection_text
            )
        )
        proposed = parse_operations(curated)
        if proposed is None:  # the curator wrote no operations at all: keep a wrong answer's lesson as is
            proposed = (
                [{"op": "add", "section": "lessons", "content": lesson}] if lesson and not correct else []
            )
        return self.playbook.apply(ops + proposed, embed=self.embed)

    def step(self, example: Example, learn: bool = True) -> StepRecord:
        start = time.perf_counter()
        answer = self.answer(example)
        correct, feedback = self.task.check(answer, example)
        ops = self.learn(example, answer, feedback, correct) if learn else []
        return StepRecord(
            example.input,
            answer,
            correct,
            feedback,
            ops,
            self.playbook.version,
            self.playbook_tokens(),
            time.perf_counter() - start,
        )

    def adapt(self, train: list[Example], epochs: int = 1, progress: bool = False) -> list[StepRecord]:
        """Offline adaptation: learn from every training example's feedback."""
        records = []
        for epoch in range(epochs):
            for ex in tqdm(train, disable=not progress, desc=f"ace offline {epoch + 1}/{epochs}", unit="ex"):
                records.append(self.step(ex))
        return records

    def evaluate(self, test: list[Example], online: bool = False, progress: bool = False) -> list[StepRecord]:
        """Answer the test stream with the playbook; `online` learns from each answer after giving it."""
        desc = "ace online" if online else "ace eval"
        return [self.step(ex, learn=online) for ex in tqdm(test, disable=not progress, desc=desc, unit="ex")]


def _ids(reflection: dict, key: str) -> list[str]:
    value = reflection.get(key, [])
    return [str(v) for v in value] if isinstance(value, list) else []


def accuracy(records: list[StepRecord]) -> float | None:
    return sum(r.correct for r in records) / len(records) if records else None


def summary(records: list[StepRecord]) -> dict:
    return {
        "n": len(records),
        "accuracy": accuracy(records),
        "playbook_tokens_final": records[-1].playbook_tokens if records else 0,
        "playbook_version_final": records[-1].playbook_version if records else 0,
        "seconds": sum(r.seconds for r in records),
        "operations_applied": sum(not op.startswith("skipped") for r in records for op in r.operations),
    }
