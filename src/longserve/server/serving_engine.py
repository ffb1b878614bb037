"""What every endpoint shares (vLLM's `serving_engine`): the server state that checks the model name,
resolves KV policies, tokenizes prompts, applies speculative prefill and submits to the right engine.
"""

from __future__ import annotations

import asyncio
import dataclasses

import jinja2

from longserve.engine.grammar import json_grammar
from longserve.engine.prefix_cache import CachePrefix
from longserve.engine.sampler import Grammar
from longserve.errors import ContextLengthError, InvalidParameterError
from longserve.kv.policies import FullPolicy, Policy, make_policy
from longserve.llm import LLM
from longserve.server.async_engine import AsyncEngine, RequestStream
from longserve.server.errors import APIError
from longserve.server.kv_plan import KVPlan
from longserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    KVPolicySpec,
)
from longserve.server.speculative import SpeculativeEngine
from longserve.server.tools import WRAP, call_schema, fallback_messages, template_knows_tools
from longserve.specprefill.compress import CompressedPrompt
from longserve.specprefill.serving import ServerPrefill, parse_option


@dataclasses.dataclass
class PreparedPrompt:
    """The ids the target runs; with speculative prefill, their original positions and the compression."""

    ids: list[int]
    positions: list[int] | None = None
    compressed: CompressedPrompt | None = None
    grammar: Grammar | None = None  # the request's response_format, compiled

    @property
    def original_tokens(self) -> int:
        return self.compressed.original_tokens if self.compressed is not None else len(self.ids)


@dataclasses.dataclass
class ServerState:
    llm: LLM
    engine: AsyncEngine
    plan: KVPlan
    default_policy: Policy
    model_id: str
    aliases: frozenset[str]
    default_max_tokens: int | None
    prefill: ServerPrefill = dataclasses.field(default_factory=lambda: ServerPrefill(None))
    spec: SpeculativeEngine | None = None  # speculative decoding (batch 1), when started with a draft

    @property
    def max_model_len(self) -> int:
        return self.plan.max_model_len

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.aliases:
            raise APIError(
                f"the model '{name}' does not exist; this server serves '{self.model_id}'",
                status_code=404,
                param="model",
                code="model_not_found",
            )

    def policy(self, spec: KVPolicySpec | None) -> Policy:
        """The server's default policy, adjusted (same name) or replaced (another name) by the request."""
        if spec is None:
            return self.default_policy
        try:
            if spec.name in (None, self.default_policy.name):
                changes = dict(spec.options)
                if spec.budget is not None or spec.ratio is not None:
                    changes.update(budget=spec.budget, ratio=spec.ratio)
                return self.default_policy.replace(**changes) if changes else self.default_policy
            return make_policy(spec.name, budget=spec.budget, ratio=spec.ratio, **spec.options)
        except TypeError as exc:
            raise APIError(f"bad kv_policy parameter: {exc}", param="kv_policy") from None
        except InvalidParameterError as exc:
            raise APIError(str(exc), param="kv_policy") from None

    @staticmethod
    def uses_tools(request: GenerationRequest) -> bool:
        """Whether the prompt renders tools or a tool loop (then the template gets more than role/content)."""
        return isinstance(request, ChatCompletionRequest) and (
            request.tool_mode != "none" or any(m.tool_calls or m.role == "tool" for m in request.messages)
        )

    def native_tools(self) -> bool:
        return bool(getattr(self.llm.tokenizer, "chat_template", None)) and template_knows_tools(
            self.llm.tokenizer
        )

    def messages(self, request: ChatCompletionRequest) -> list[dict]:
        """The messages the template renders: with a tool loop and a template that cannot render one,
        rewritten by `tools.fallback_messages` (tools listed in the system message)."""
        messages = [m.render() for m in request.messages]
        if self.uses_tools(request) and not self.native_tools():
            tools = request.tools if request.tool_mode != "none" else None
            return fallback_messages(messages, tools)
        return messages

    def chat_prompt_ids(self, request: ChatCompletionRequest) -> list[int]:
        messages = self.messages(request)
        tokenizer = self.llm.tokenizer
        if getattr(tokenizer, "chat_template", None):
            tools = [t.render() for t in request.tools or []] if request.tool_mode != "none" else None
            try:
                if tools and self.native_tools():
                    out = tokenizer.apply_chat_template(
                        messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=True
                    )
                    return list(out["input_ids"])
                return self.llm.encode(messages)
            except (jinja2.TemplateError, ValueError, TypeError, KeyError) as exc:
                raise APIError(
                    f"the chat template rejected these messages: {exc}", param="messages"
                ) from None
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return list(tokenizer.encode(text, add_special_tokens=True))

    def completion_prompt_ids(self, request: CompletionRequest) -> list[int]:
        if isinstance(request.prompt, str):
            return list(self.llm.tokenizer.encode(request.prompt, add_special_tokens=True))
        vocab = self.llm.loaded.args.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt):
            raise APIError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        return list(request.prompt)

    def speculative(self, request: GenerationRequest) -> bool:
        """Whether this request goes through the speculative decoder: not when it needs penalties or a
        grammar, which only the batched engine's sampler applies."""
        if request.speculative and self.spec is None:
            raise APIError(
                "speculative decoding was requested but this server has no draft model "
                "(start it with --draft MODEL)",
                param="speculative",
            )
        if request.speculative and request.needs_sampler:
            raise APIError(
                "speculative decoding does not apply response_format, presence_penalty, "
                'frequency_penalty or cache_prefix; send "speculative": false (or omit it)',
                param="speculative",
            )
        return self.spec is not None and request.speculative is not False and not request.needs_sampler

    def grammar(self, request: GenerationRequest) -> Grammar | None:
        """The request's `response_format` compiled for our tokenizer (400 on a schema it cannot follow).
        Blocking (the first call builds the tokenizer's trie, ~0.5 s): called off the event loop."""
        if not request.constrained:
            return None
        forced = getattr(request, "forced_tools", None)
        try:
            if forced:  # tool_choice "required" or a named function: one call, as the template writes it
                return json_grammar(call_schema(forced), self.llm.loaded, wrap=WRAP)
            return json_grammar(request.response_format.target_schema, self.llm.loaded)
        except InvalidParameterError as exc:
            raise APIError(str(exc), param="tools" if forced else "response_format") from None

    def max_new_tokens(self, request: GenerationRequest, n: int) -> int:
        """max_tokens for a prompt of `n` tokens (its original length when pruned: positions go on from
        there), or `ContextLengthError`."""
        for field, value in request.given_max_tokens.items():
            if value >= self.max_model_len:
                raise ContextLengthError(
                    f"{field} ({value}) must be below this server's maximum context length of "
                    f"{self.max_model_len} tokens (the prompt takes at least one)"
                )
        max_new = request.requested_max_tokens
        if max_new is None:
            max_new = self.max_model_len - n
            if self.default_max_tokens is not None:
                max_new = min(max_new, self.default_max_tokens)
        if n + max_new > self.max_model_len or max_new < 1:
            raise ContextLengthError(
                f"this server's maximum context length is {self.max_model_len} tokens; the prompt has {n} "
                f"tokens and max_tokens is {max_new}; shorten the prompt or lower max_tokens"
            )
        return max_new

    async def prepare(self, request: GenerationRequest, ids: list[int], prompt) -> PreparedPrompt:
        """`ids` as they are, or pruned by the prefill draft (which reads `prompt`: text, messages or ids)
        when the server has one and the request's `spec_prefill` does not turn it off."""
        self.speculative(request)  # fail fast, before any draft runs
        try:
            enabled, _ = parse_option(request.spec_prefill, self.prefill.draft_name)
        except InvalidParameterError as exc:
            raise APIError(str(exc), param="spec_prefill") from None
        grammar = await asyncio.to_thread(self.grammar, request) if request.constrained else None
        if not enabled:
            return PreparedPrompt(ids, grammar=grammar)
        if self.uses_tools(request):  # the draft must see the tools too: it gets the rendered ids
            prompt = ids
        self.max_new_tokens(request, len(ids))  # a prompt that cannot fit is refused before the draft runs
        cp = await self.prefill.compress(self.llm, prompt, request.spec_prefill)
        if cp is None:
            return PreparedPrompt(ids, grammar=grammar)
        m = self.engine.metrics
        m.spec_prefill_requests.inc()
        m.spec_prefill_original_tokens.inc(cp.original_tokens)
        m.spec_prefill_kept_tokens.inc(len(cp.ids))
        return PreparedPrompt(list(cp.ids), cp.positions, cp, grammar)

    def submit(
        self,
        request: GenerationRequest,
        prompt: PreparedPrompt | list[int],
        request_id: str,
        arrival: float | None = None,
    ) -> RequestStream:
        """Validate everything that can be a 400 now, before any response byte is sent, then queue."""
        if not isinstance(prompt, PreparedPrompt):
            prompt = PreparedPrompt(list(prompt), grammar=self.grammar(request))
        max_new = self.max_new_tokens(request, prompt.original_tokens)
        params = request.sampling_params(max_new, prompt.grammar)
        cache_prefix = self.cache_prefix(request, prompt)
        policy = FullPolicy() if cache_prefix is not None else self.policy(request.kv_policy)
        # reads fixed sizes only: safe off the engine thread; bounds a speculative request's slot too
        if cache_prefix is not None:
            self.engine.engine.check_cache_prefix(len(prompt.ids), params, policy, cache_prefix)
        else:
            self.engine.engine.check(len(prompt.ids), params, policy, positions=prompt.positions)
        if self.speculative(request):
            if prompt.positions is not None:  # create_app refuses the combination; never run it wrongly
                raise APIError(
                    'speculative decoding cannot run a pruned prompt; send "spec_prefill": false',
                    param="spec_prefill",
                )
            self.spec.check(len(prompt.ids), params)
            return self.spec.submit(prompt.ids, params, policy, request_id, arrival=arrival)
        return self.engine.submit(
            prompt.ids,
            params,
            policy,
            request_id,
            positions=prompt.positions,
            arrival=arrival,
            cache_prefix=cache_prefix,
        )

    def cache_prefix(self, request: GenerationRequest, prompt: PreparedPrompt) -> CachePrefix | None:
        """The request's `cache_prefix` as the engine takes it (400s for what cannot work)."""
        spec = request.cache_prefix
        if spec is None:
            return None
        if self.llm.prefix_cache is None:
            raise APIError(
                "cache_prefix needs a prefix cache: start the server with --prefix-cache-memory",
                param="cache_prefix",
            )
        if request.kv_policy is not None or prompt.positions is not None:
            raise APIError(
                "cache_prefix sets the policy of the prompt's start and runs the rest under 'full': "
                "send it without kv_policy and spec_prefill",
                param="cache_prefix",
            )
        messages = getattr(request, "messages", None)
        split = None
        if messages is not None and spec.tokens is None and self.llm.tokenizer.chat_template:
            split = self.llm.chat_prefix_len(self.messages(request), prompt.ids)
        try:
            return CachePrefix.from_spec(spec.as_dict(), split)
        except InvalidParameterError as exc:
            raise APIError(str(exc), param="cache_prefix") from None
