"""A live uvicorn server (127.0.0.1, ephemeral port, background thread) around a tiny random model."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch

from longserve.llm import LLM
from longserve.server.app import ServerState, create_app
from longserve.server.background import BackgroundServer
from tests.tiny import tiny_loaded


class LiveServer(BackgroundServer):
    def __enter__(self) -> LiveServer:
        super().__enter__()
        self.http = httpx.Client(base_url=self.url, timeout=60)
        return self

    def __exit__(self, *exc) -> None:
        self.http.close()
        super().__exit__(*exc)

    @property
    def state(self) -> ServerState:
        return self.app.state.server

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def wait_idle(self, timeout: float = 20) -> None:
        """Until no request is left anywhere: the async front, the scheduler and the KV pool."""
        engine, spec = self.state.engine, self.state.spec
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pool = engine.engine.pool
            spec_idle = spec is None or (
                not spec._requests and not spec._pending and spec._current is None and spec.num_waiting == 0
            )
            if (
                not engine._requests
                and not engine.engine.sequences
                and not engine.engine.has_unfinished()
                and pool.n_free == pool.n_slots
                and engine.num_waiting == 0
                and spec_idle
            ):
                return
            time.sleep(0.02)
        raise AssertionError(
            f"engine not idle: {len(engine._requests)} requests, "
            f"{len(engine.engine.sequences)} sequences, {engine.engine.pool.n_free} free slots"
        )


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matmuls on a shared 2-core box spend ~10 ms per op syncing OpenMP threads; one thread is
    10x faster here and leaves the other core to the HTTP client threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def loaded():
    return tiny_loaded("llama")[0]


@pytest.fixture(scope="session")
def serve(loaded):
    """`with serve(**create_app_kwargs) as server:` a fresh server; `llm=` swaps the LLM."""

    @contextmanager
    def start(llm: LLM | None = None, **kwargs) -> Iterator[LiveServer]:
        llm = llm or LLM(loaded=loaded, max_batch_size=4, prefill_chunk=64)
        with LiveServer(create_app(llm, **kwargs)) as server:
            yield server

    return start


@pytest.fixture(scope="module")
def server(serve) -> Iterator[LiveServer]:
    """The shared server: full policy, 4 slots, max_model_len 512."""
    with serve(max_model_len=512) as s:
        yield s
