"""`CoE([...], max_weight_memory="4GiB").generate(prompt)`: several models behind one call, routed."""

from __future__ import annotations

import time

from longserve.coe.experts import Expert
from longserve.coe.router import HiddenStateEmbedder, Route, Router
from longserve.coe.tiers import ModelTiers, default_load
from longserve.errors import InvalidParameterError
from longserve.server.kv_plan import parse_byte_size


class CoE:
    """A composition of experts. `experts`: `Expert`s or model names; `router`: the expert whose hidden
    states embed prompts for routing (default: the first; it is pinned so it stays resident)."""

    def __init__(
        self,
        experts: list[Expert | str],
        max_weight_memory: str | int = "4GiB",
        router: str | None = None,
        margin: float = 0.02,
        load=default_load,
    ):
        self.experts = [e if isinstance(e, Expert) else Expert(e, e) for e in experts]
        if not self.experts:
            raise InvalidParameterError("a composition needs at least one expert")
        router_name = router or self.experts[0].name
        for e in self.experts:
            e.pinned = e.pinned or e.name == router_name
        self.tiers = ModelTiers(self.experts, parse_byte_size(max_weight_memory, "max_weight_memory"), load)
        self.margin, self._router, self.router_name = margin, None, router_name

    @property
    def router(self) -> Router:
        if self._router is None:
            embed = HiddenStateEmbedder(lambda: self.tiers.get(self.router_name))
            self._router = Router(self.experts, embed, self.margin)
        return self._router

    def route(self, prompt: str | list[dict]) -> Route:
        text = prompt if isinstance(prompt, str) else "\n".join(str(m.get("content", "")) for m in prompt)
        if len(self.experts) == 1:
            return Route(self.experts[0].name, "only expert", {})
        return self.router.route(text, resident=self.tiers.resident)

    def generate(self, prompt, model: str = "auto", **options):
        """One completion from the chosen (or routed) expert; its stats name the expert, the routing
        reason and the seconds spent making it resident."""
        route = (
            self.route(prompt) if model == "auto" else Route(self.tiers.expert(model).name, "requested", {})
        )
        before, start = len(self.tiers.switches), time.perf_counter()
        llm = self.tiers.get(route.expert)
        switch_s = time.perf_counter() - start if len(self.tiers.switches) > before else 0.0
        out = llm.generate(prompt, **options)[0]
        out.stats.update(expert=route.expert, route=route.reason, switch_s=switch_s)
        return out
