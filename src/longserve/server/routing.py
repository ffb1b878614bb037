"""Which expert a request goes to, and what it holds while it runs there.

`PromptRouter.pick` turns a request's `model` into an expert: a name or alias as it is (404 when
unknown), `auto` through the `coe.Router` (rules first, then the nearest expert profile embedded with
the router model's mean-pooled hidden states; a resident expert wins a near-tie). Embedding is a
forward pass: it runs in a worker thread, one at a time, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import Callable

from longserve.coe.router import Router
from longserve.server.errors import APIError
from longserve.server.resident import Resident
from longserve.server.serving_engine import ServerState


@dataclasses.dataclass
class Lease:
    """A request's hold on a resident expert: the expert is not parked until `release()`."""

    resident: Resident
    expert: str
    reason: str  # "requested", "rule", "nearest", "resident within margin", ...
    switch_s: float  # seconds this request waited for the expert to be made resident
    released: bool = False

    @property
    def state(self) -> ServerState:
        return self.resident.state

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.resident.release()


async def _disconnected(request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def wait_or_disconnect(task: asyncio.Future, request) -> bool:
    """Wait for `task` (its error is raised); False if the client went away first. The task itself is
    never cancelled: other requests may wait for the same switch."""
    if request is None:
        await asyncio.shield(task)
        return True
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await gone
    if task in done:
        task.result()
        return True
    return False


class PromptRouter:
    def __init__(self, registry, name: str | None, router: Router | None):
        self.registry, self.name, self.router = registry, name, router
        self._lock = threading.Lock()

    @staticmethod
    def embedder(llm) -> Callable[[list[str]], object]:
        from longserve.icl.embed import Embedder

        return Embedder(llm)

    async def pick(self, model: str, text: Callable[[], str | None]) -> tuple[str, str]:
        if model != "auto":
            return self.registry.resolve(model), "requested"
        experts = self.registry.experts
        if len(experts) == 1:
            return next(iter(experts)), "only expert"
        prompt = text()
        if prompt is None:
            raise APIError(
                "model 'auto' routes by the prompt's text; a prompt of token ids must name a model",
                param="model",
            )
        if self.router is None:
            ruled = next((e.name for e in experts.values() if e.matches(prompt)), None)
            if ruled is not None:
                return ruled, "rule"
            fallback = self.registry.default_model
            return (fallback if fallback != "auto" else next(iter(experts))), "default (no router)"
        route = await asyncio.to_thread(self._route, prompt, list(self.registry.residents))
        return route.expert, route.reason

    def _route(self, prompt: str, resident: list[str]):
        with self._lock:  # one embedding forward at a time, beside the router model's engine thread
            return self.router.route(prompt, resident=resident)
