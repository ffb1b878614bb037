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
from longserve.engine import grammar
from longserve.icl.tasks import Example, Task, first_json

_ENV = Environment(undefined=StrictUndefined, keep_trailing_newline=True)

GENERATOR = _ENV.from_string(
    "{{ instruction }}\n\nPlaybook of strategies learned so far:\n{{ playbook }}\n\n"
    "Use the playbook. Answer with the output only."
)
# The reflector and curator prompts are written for 0.5B-1.5B models: the reflector first copies the
# expected output from the feedback and says how the answer differs, then writes the rule (a small
# model asked for "a lesson" restates the input: "Replace 'w' with 'i'"); the replies' JSON shapes are
# given and, where llguidance is installed, enforced by a grammar (`reflector_schema`, `curator_schema`).
# A worked example in the prompt was tried and dropped: a 0.5B model copies it verbatim into every rule.
REFLECTOR = _ENV.from_string(
    "A model answered a task {{ 'correctly' if correct else 'wrong' }}. The checker's feedback shows the "
    "expected output.\n\nTask: {{ instruction }}\nPlaybook the model used:\n{{ playbook }}\n\n"
    "Input: {{ input }}\nModel answer: {{ answer }}\nFeedback from the checker: {{ feedback }}\n\n"
    "Write the rule that turns any input of this task into an output of exactly the expected form, so the "
    "model gets the next input right.\n"
    'Reply with JSON: {"expected": "<the expected output, copied from the feedback>", '
    '"difference": "<how the model answer differs from it>", '
    '"rule": "<the rule, for every input: say exactly what the output must look like>", '
    '"helpful": [<ids of playbook bullets that helped>], "harmful": [<ids of bullets that misled>]}'
)
CURATOR = _ENV.from_string(
    "You keep a playbook of rules for the task: {{ instruction }}\n\nPlaybook:\n{{ playbook }}\n\n"
    "A reviewer proposes this rule: {{ rule }}\n\n"
    "Edit the playbook: add the rule as a new bullet if no bullet says it yet; update a bullet (by its "
    "id) that the rule corrects; remove a bullet the rule shows is wrong; no operation if a bullet "
    "already says it.\n"
    'Reply with one JSON object: {"operations": [...]}, each operation one of '
    '{"op": "add", "section": "<short topic>", "content": "<the rule>"}, '
    '{"op": "update", "id": "<bullet id>", "content": "<the corrected rule>"}, '
    '{"op": "remove", "id": "<bullet id>"}.'
)
RULE_CHARS = 240  # a playbook bullet is one rule, not an essay (and bounds the grammar's output)


def reflector_schema(ids: list[str]) -> dict:
    """The reflection's JSON: expected output, difference, rule; tags can only name existing bullets."""
    tags = (
        {"type": "array", "items": {"enum": ids}, "maxItems": 3} if ids else {"type": "array", "maxItems": 0}
    )
    text = {"type": "string", "maxLength": RULE_CHARS}
    return {
        "type": "object",
        "properties": {
            "expected": text,
            "difference": text,
            "rule": text,
            "helpful": tags,
            "harmful": tags,
        },
        "required": ["expected", "difference", "rule", "helpful", "harmful"],
        "additionalProperties": False,
    }


def curator_schema(ids: list[str]) -> dict:
    """The curator's JSON: at most three operations; update/remove only on existing bullet ids."""
    text = {"type": "string", "minLength": 1, "maxLength": RULE_CHARS}
    add = {
        "type": "object",
        "properties": {
            "op": {"const": "add"},
            "section": {"type": "string", "maxLength": 40},
            "content": text,
        },
        "required": ["op", "section", "content"],
        "additionalProperties": False,
    }
    kinds = [add]
    if ids:
        bullet = {"enum": ids}
        kinds.append(
            {
                "type": "object",
                "properties": {"op": {"const": "update"}, "id": bullet, "content": text},
                "required": ["op", "id", "content"],
                "additionalProperties": False,
            }
        )
        kinds.append(
            {
                "type": "object",
                "properties": {"op": {"const": "remove"}, "id": bullet},
                "required": ["op", "id"],
                "additionalProperties": False,
            }
        )
    operations = {"type": "array", "items": {"anyOf": kinds}, "maxItems": 3}
    return {
        "type": "object",
        "properties": {"operations": operations},
        "required": ["operations"],
        "additionalProperties": False,
    }


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
    reflection: str = ""  # the reflector's and the curator's raw replies, to read what the model did
    curation: str = ""


class ACE:
    """`ACE(llm, task).adapt(train)` grows `self.playbook`; `evaluate(test)` measures it.

    `structured`: constrain the reflector's and the curator's replies to their JSON schemas with a
    grammar (default: when the optional llguidance is installed). Small models otherwise drift into
    prose or truncated JSON, and a reply that does not parse teaches nothing."""

    def __init__(
        self,
        llm,
        task: Task,
        playbook: Playbook | None = None,
        embed=None,
        kv_policy: str = "full",
        max_new_tokens: int = 256,
        structured: bool | None = None,
    ):
        self.llm, self.task, self.embed = llm, task, embed
        self.playbook = playbook or Playbook()
        self.kv_policy, self.max_new_tokens = kv_policy, max_new_tokens
        self.structured = grammar.available() if structured is None else structured
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

    def _chat(self, prompt: str, schema: dict) -> str:
        """One user turn (raw text for a model without a chat template), greedy; the reply follows
        `schema` when `structured`."""
        messages = [{"role": "user", "content": prompt}]
        prompt_in = messages if self.llm.tokenizer.chat_template else prompt
        options = {}
        if self.structured:
            options["grammar"] = grammar.json_grammar(schema, self.llm.loaded)
        return self.llm.generate(prompt_in, max_new_tokens=self.max_new_tokens, **options)[0].text

    def learn(
        self, example: Example, answer: str, feedback: str, correct: bool
    ) -> tuple[list[str], str, str]:
        """Reflect on one answer and merge the curator's operations: (merge log, reflection, curation)."""
        playbook, ids = self.playbook.render(), [b.id for b in self.playbook.bullets]
        reflection_text = self._chat(
            REFLECTOR.render(
                instruction=self.task.instruction,
                playbook=playbook,
                input=example.input,
                answer=answer.strip(),
                feedback=feedback,
                correct=correct,
            ),
            reflector_schema(ids),
        )
        reflection = first_json(reflection_text) or {}
        ops = [
            {"op": "tag", "id": i, "tag": tag}
            for tag in ("helpful", "harmful")
            for i in _ids(reflection, tag)
        ]
        rule = str(reflection.get("rule") or reflection.get("lesson") or "").strip()
        curated = ""
        if rule and not correct:  # a correct answer only updates the counters; no rule, nothing to curate
            curated = self._chat(
                CURATOR.render(instruction=self.task.instruction, playbook=playbook, rule=rule),
                curator_schema(ids),
            )
        proposed = parse_operations(curated)
        if proposed is None:  # the curator wrote no operations at all: keep a wrong answer's rule as is
            proposed = [{"op": "add", "section": "lessons", "content": rule}] if rule and not correct else []
        return self.playbook.apply(ops + proposed, embed=self.embed), reflection_text, curated

    def step(self, example: Example, learn: bool = True) -> StepRecord:
        start = time.perf_counter()
        answer = self.answer(example)
        correct, feedback = self.task.check(answer, example)
        ops, reflection, curation = self.learn(example, answer, feedback, correct) if learn else ([], "", "")
        return StepRecord(
            example.input,
            answer,
            correct,
            feedback,
            ops,
            self.playbook.version,
            self.playbook_tokens(),
            time.perf_counter() - start,
            reflection,
            curation,
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
