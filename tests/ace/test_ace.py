"""ACE: deterministic delta merges, atomic playbook files, and the loop with a scripted curator."""

from __future__ import annotations

import json

import pytest
import torch

from longserve.ace import ACE, Playbook, PlaybookError, parse_operations
from longserve.icl import make_task
from longserve.llm import LLM
from tests.tiny import tiny_loaded


def test_add_update_remove_tag_and_counters():
    pb = Playbook()
    log = pb.apply(
        [
            {"op": "add", "section": "rules", "content": "Shift every letter by three."},
            {"op": "add", "content": "Keep the case."},
        ]
    )
    assert log == ["add: b1", "add: b2"] and pb.version == 1
    assert [(b.id, b.section) for b in pb.bullets] == [("b1", "rules"), ("b2", "strategies")]
    log = pb.apply(
        [
            {"op": "update", "id": "b2", "content": "Keep lower case."},
            {"op": "tag", "id": "b1", "tag": "helpful"},
            {"op": "tag", "id": "b1", "tag": "harmful"},
            {"op": "tag", "id": "b1", "tag": "helpful"},
            {"op": "remove", "id": "b9"},
            {"op": "explode"},
            "not even a dict",
        ]
    )
    b1, b2 = pb.bullets
    assert (b1.helpful, b1.harmful, b2.content) == (2, 1, "Keep lower case.")
    assert log[-3:] == [
        'skipped invalid operation {"op": "remove", "id": "b9"}',
        'skipped invalid operation {"op": "explode"}',
        'skipped invalid operation "not even a dict"',
    ]
    pb.apply([{"op": "remove", "id": "b1"}, {"op": "add", "content": "New one"}])
    assert [b.id for b in pb.bullets] == ["b2", "b3"]  # ids are never reused
    assert pb.version == 3 and pb.apply([{"op": "remove", "id": "b1"}]) and pb.version == 3


def test_duplicates_are_merged_by_text_and_by_embedding():
    pb = Playbook()
    pb.apply([{"op": "add", "content": "Answer with the label only."}])
    assert pb.apply([{"op": "add", "content": "answer with the LABEL only!"}]) == [
        "add: duplicate of b1, counted as helpful"
    ]

    def embed(texts):  # "label" and "class" mean the same here
        return torch.nn.functional.normalize(
            torch.tensor([[("label" in t or "class" in t) * 1.0, 0.1] for t in texts]), dim=-1
        )

    assert pb.apply([{"op": "add", "content": "Reply with the class name."}], embed=embed)[0].startswith(
        "add: duplicate of b1"
    )
    assert pb.apply([{"op": "add", "content": "Numbers grow by seven."}], embed=embed) == ["add: b2"]
    assert len(pb.bullets) == 2 and pb.bullets[0].helpful == 2


def test_save_load_round_trip_is_atomic(tmp_path):
    pb = Playbook()
    pb.apply([{"op": "add", "section": "s", "content": "Ünïcödé rule ✓"}])
    path = tmp_path / "pb.json"
    pb.save(path)
    assert Playbook.load(path) == pb
    assert [p.name for p in tmp_path.iterdir()] == ["pb.json"]  # no temporary file left behind


def test_a_corrupt_playbook_is_a_clear_error_and_is_not_overwritten(tmp_path):
    path = tmp_path / "pb.json"
    path.write_text('{"format": "longserve-playbook/1", "bullets": [{"id": 1}')
    before = path.read_bytes()
    with pytest.raises(PlaybookError, match="corrupt playbook"):
        Playbook.load(path)
    path.write_text(json.dumps({"format": "other", "bullets": []}))
    with pytest.raises(PlaybookError, match="not a longserve-playbook"):
        Playbook.load(path)
    path.write_bytes(before)
    with pytest.raises(PlaybookError):
        Playbook.load(path)
    assert path.read_bytes() == before
    with pytest.raises(PlaybookError, match="not found"):
        Playbook.load(tmp_path / "missing.json")


def test_operations_are_parsed_from_chatty_output():
    text = 'Sure! Here: [{"op": "add", "content": "x"}] hope it helps {"op": "remove"}'
    assert parse_operations(text) == [{"op": "add", "content": "x"}]
    assert parse_operations('{"operations": [{"op": "remove", "id": "b1"}]}') == [
        {"op": "remove", "id": "b1"}
    ]
    assert parse_operations("no json here [1, 2]") is None and parse_operations("[]") == []


class ScriptedCurator(LLM):
    """The tiny model answers the task; the reflector and curator are scripted (a 135M model rarely
    writes valid JSON, and the merge logic is what is under test)."""

    def __init__(self, loaded, replies: list[str]):
        super().__init__(loaded=loaded)
        self.replies, self.prompts = list(replies), []

    def generate(self, prompts, *args, **kwargs):
        if isinstance(prompts, str) and "Reply with" in prompts and "JSON" in prompts:
            self.prompts.append(prompts)

            class Out:
                text = self.replies.pop(0)

            return [Out()]
        return super().generate(prompts, *args, **kwargs)


def test_the_loop_merges_curated_deltas_and_compresses_once_per_version():
    task = make_task("cipher", 30, seed=0)
    replies = [
        '{"lesson": "shift letters", "helpful": [], "harmful": []}',
        '[{"op": "add", "section": "cipher", "content": "Shift each letter forward."}]',
        '{"lesson": "nothing new", "helpful": ["b1"], "harmful": []}',
        "[]",
    ]
    llm = ScriptedCurator(tiny_loaded("llama")[0], replies)
    ace = ACE(llm, task, max_new_tokens=8, structured=False)
    records = ace.adapt(task.examples[:2])
    assert [b.content for b in ace.playbook.bullets] == ["Shift each letter forward."]
    assert ace.playbook.bullets[0].helpful == 1  # tagged by the second reflection
    assert records[0].operations == ["add: b1"] and records[1].operations == ["tag: b1 helpful"]
    assert "Shift each letter forward." in llm.prompts[2]  # the reflector sees the grown playbook
    assert records[1].playbook_tokens > records[0].playbook_tokens - 1
    compressions = ace.compressions
    ace.evaluate(task.examples[2:5])  # no learning: one version, compressed once for all queries
    assert ace.compressions == compressions  # the last version was already compressed by adapt()
    assert not llm.replies


def test_a_wrong_answer_keeps_its_lesson_when_the_curator_proposes_nothing():
    task = make_task("cipher", 10, seed=0)
    llm = ScriptedCurator(tiny_loaded("llama")[0], ['{"lesson": "Shift by the hidden amount."}', "no idea"])
    ace = ACE(llm, task, max_new_tokens=8, structured=False)
    record = ace.step(task.examples[0])
    assert not record.correct  # a random tiny model does not know the cipher
    assert [b.content for b in ace.playbook.bullets] == ["Shift by the hidden amount."]


def test_structured_replies_always_parse_into_valid_operations():
    """With the grammar even a random tiny model writes a reflection with every field and operations that
    name only existing bullets: nothing the curator proposes is skipped as invalid."""
    pytest.importorskip("llguidance")
    task = make_task("cipher", 10, seed=0)
    llm = LLM(loaded=tiny_loaded("llama")[0])
    playbook = Playbook()
    playbook.apply([{"op": "add", "content": "Shift every letter."}, {"op": "add", "content": "Keep case."}])
    ace = ACE(llm, task, playbook, max_new_tokens=1200, structured=True)
    ex = task.examples[0]
    log, reflection, curation = ace.learn(ex, "zzz", "wrong answer: got 'zzz', expected 'abc'", correct=False)
    value = json.loads(reflection)
    assert set(value) == {"expected", "difference", "rule", "helpful", "harmful"}
    assert set(value["helpful"]) | set(value["harmful"]) <= {"b1", "b2"}
    if value["rule"].strip():
        assert isinstance(json.loads(curation)["operations"], list)
    assert not [line for line in log if line.startswith("skipped")], log


def test_a_correct_answer_only_updates_counters():
    """The curator runs on wrong answers only: a correct answer's reflection tags bullets, adds nothing."""
    task = make_task("cipher", 10, seed=0)
    replies = ['{"rule": "Shift letters.", "helpful": ["b1"], "harmful": []}']
    llm = ScriptedCurator(tiny_loaded("llama")[0], replies)
    playbook = Playbook()
    playbook.apply([{"op": "add", "content": "Shift every letter."}])
    ace = ACE(llm, task, playbook, max_new_tokens=8, structured=False)
    log, _, curation = ace.learn(task.examples[0], "x", "correct", correct=True)
    assert log == ["tag: b1 helpful"] and curation == "" and not llm.replies
    assert "answered a task correctly" in llm.prompts[0]
