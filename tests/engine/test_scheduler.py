"""The scheduler on its own: FIFO admission by free slots, chunked prefill, prefill/decode alternation."""

from __future__ import annotations

import pytest

from longserve.engine.sampler import SamplingParams
from longserve.engine.scheduler import Scheduler
from longserve.engine.sequence import Sequence, Status
from longserve.errors import InvalidParameterError
from longserve.kv.policies import make_policy


class SlotCounter:
    """The part of `KVPool` the scheduler uses: a number of free slots."""

    def __init__(self, n_slots: int):
        self.free_slots = list(range(n_slots))

    @property
    def n_free(self) -> int:
        return len(self.free_slots)

    def allocate(self, policy) -> int:
        return self.free_slots.pop(0)


def chunk_of(sched: Scheduler, step) -> int:
    """The chunk the engine runs for a prefill step's first sequence (its budget bounds it)."""
    return sched.chunk(step.seqs[0], step.n_tokens)


def seq(prompt_len: int, policy: str = "full", **kwargs) -> Sequence:
    return Sequence(list(range(prompt_len)), SamplingParams(max_new_tokens=4), make_policy(policy, **kwargs))


def test_admits_in_arrival_order_while_slots_are_free():
    sched = Scheduler(SlotCounter(2))
    a, b, c = seq(5), seq(5), seq(5)
    admitted = []
    sched.on_admit = admitted.append
    for s in (a, b, c):
        sched.add(s)
    sched.admit()
    assert admitted == [a, b] and sched.running == [a, b] and list(sched.waiting) == [c]
    assert (a.slot, b.slot, c.slot) == (0, 1, None)
    assert a.status == b.status == Status.RUNNING and c.status == Status.WAITING


def test_prefill_and_decode_alternate_so_a_long_prompt_does_not_stall_the_batch():
    sched = Scheduler(SlotCounter(2), prefill_chunk=8)
    running = seq(4)
    sched.add(running)
    step = sched.schedule()
    assert (step.kind, step.seqs, chunk_of(sched, step)) == ("prefill", [running], 4)
    running.prefilled = 4
    long = seq(40)
    sched.add(long)
    kinds = []
    for _ in range(6):
        step = sched.schedule()
        kinds.append(step.kind)
        if step.kind == "prefill":
            assert step.seqs == [long]
            long.prefilled += chunk_of(sched, step)
        else:
            assert step.seqs == [running, long][: len(step.seqs)]
    assert kinds == ["decode", "prefill", "decode", "prefill", "decode", "prefill"]


def test_only_prefills_when_nothing_decodes():
    sched = Scheduler(SlotCounter(1), prefill_chunk=8)
    s = seq(20, "full", window=0)
    sched.add(s)
    chunks = []
    while s.prefilled < s.prompt_len:
        step = sched.schedule()
        assert step.kind == "prefill"
        chunks.append(chunk_of(sched, step))
        s.prefilled += chunk_of(sched, step)
    assert chunks == [8, 8, 4]
    assert sched.schedule().kind == "decode"


def test_final_chunk_holds_the_observation_window():
    """SnapKV's window of the last prompt queries votes at the final chunk: it must not be split."""
    sched = Scheduler(SlotCounter(1), prefill_chunk=64)
    s = seq(100, "snapkv", budget=48, window=32)
    sched.add(s)
    chunks = []
    while s.prefilled < s.prompt_len:
        n = chunk_of(sched, sched.schedule())
        chunks.append(n)
        s.prefilled += n
    assert sum(chunks) == 100 and chunks[-1] >= 32
    assert chunks == [64, 36]
    s2 = seq(70, "snapkv", budget=48, window=32)
    assert sched.chunk(s2) == 38  # 70 - 32: a 64-token chunk would leave only 6 for the window


def test_window_longer_than_a_chunk_never_schedules_an_empty_chunk():
    sched = Scheduler(SlotCounter(1), prefill_chunk=16)
    s = seq(40, "snapkv", budget=36, window=32)
    sched.add(s)
    chunks = []
    while s.prefilled < s.prompt_len and len(chunks) < 10:
        n = chunk_of(sched, sched.schedule())
        chunks.append(n)
        s.prefilled += n
    assert chunks == [8, 32]  # the whole window in the final chunk


def test_finish_frees_the_queue_position():
    sched = Scheduler(SlotCounter(1))
    a, b = seq(3), seq(3)
    sched.add(a)
    sched.add(b)
    sched.admit()
    sched.finish(b)  # cancelled while waiting
    sched.finish(a)
    assert not sched.has_work() and a.is_finished and b.is_finished
    assert sched.schedule() is None


def test_step_token_budget_bounds_prefill_while_others_decode():
    """A long prompt arriving while 3 streams decode runs in chunks of (budget - 3) tokens; alone it
    takes whole `prefill_chunk`s again."""
    sched = Scheduler(SlotCounter(4), prefill_chunk=64, max_step_tokens=19)
    decoding = [seq(2) for _ in range(3)]
    for s in decoding:
        sched.add(s)
    sched.admit()
    for s in decoding:
        s.prefilled = 2
    long = seq(100)
    sched.add(long)
    sizes = []
    for _ in range(4):
        step = sched.schedule()
        if step.kind == "prefill":
            sizes.append(chunk_of(sched, step))
            long.prefilled += chunk_of(sched, step)
    assert sizes == [16, 16]
    for s in decoding:
        sched.finish(s)
    assert chunk_of(sched, sched.schedule()) == 64
    with pytest.raises(InvalidParameterError):
        Scheduler(SlotCounter(1), max_step_tokens=0)


def test_a_prefill_step_offers_every_prefilling_sequence_the_shared_budget():
    sched = Scheduler(SlotCounter(4), prefill_chunk=64, max_step_tokens=19)
    a, b, c = seq(10), seq(10), seq(10)
    for s in (a, b, c):
        sched.add(s)
    step = sched.schedule()
    assert (step.kind, step.seqs, step.n_tokens) == ("prefill", [a, b, c], 64)
    a.prefilled = 10  # a decodes now: the next prefill step shares budget - 1 tokens
    assert sched.schedule().kind == "decode"
    step = sched.schedule()
    assert (step.kind, step.seqs, step.n_tokens) == ("prefill", [b, c], 18)
