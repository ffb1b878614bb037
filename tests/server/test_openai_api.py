"""The endpoints as the official `openai` client sees them: chat and completions, streaming and not."""

from __future__ import annotations

import dataclasses

from longserve.llm import LLM
from tests.tiny import ByteTokenizer

GREEDY = {"temperature": 0, "max_tokens": 12}


def test_chat_non_streaming_has_usage_and_stats(server):
    r = server.client().chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "hi"}], **GREEDY
    )
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny-llama"
    assert choice.message.role == "assistant" and choice.finish_reason in ("length", "stop")
    # no chat template: "role: content" lines + "assistant: ", byte-tokenized
    assert r.usage.prompt_tokens == len(b"user: hi\nassistant: ")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    stats = r.model_extra["longserve"]
    assert stats["kv_policy"] == "full" and stats["ttft_s"] > 0 and stats["kv_bytes_final"] > 0
    assert stats["completion_tokens"] == r.usage.completion_tokens


def test_chat_streaming_matches_non_streaming(server):
    client = server.client()
    kwargs = dict(model="tiny-llama", messages=[{"role": "user", "content": "stream me"}], **GREEDY)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_text_and_token_prompts(server):
    client = server.client()
    by_text = client.completions.create(model="tiny-llama", prompt="abc", **GREEDY)
    by_ids = client.completions.create(model="tiny-llama", prompt=list(b"abc"), **GREEDY)
    streamed = list(client.completions.create(model="tiny-llama", prompt="abc", stream=True, **GREEDY))
    assert by_text.object == "text_completion" and by_text.usage.prompt_tokens == 3
    assert by_text.choices[0].text == by_ids.choices[0].text == "".join(c.choices[0].text for c in streamed)
    assert streamed[-1].choices[0].finish_reason == by_text.choices[0].finish_reason


def test_stop_string_seed_and_model_alias(server):
    client = server.client()
    base = client.completions.create(
        model="tiny-llama", prompt="xyz", temperature=0, max_tokens=30, extra_body={"ignore_eos": True}
    )
    text = base.choices[0].text
    stop = text[3:5]
    if stop and "\ufffd" not in stop:  # a stop string must cut the text where it first appears
        cut = client.completions.create(
            model="tiny-llama", prompt="xyz", temperature=0, max_tokens=30, stop=stop
        )
        assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = [
        client.completions.create(
            prompt="xyz", model="tiny-llama", temperature=1.0, seed=7, max_tokens=8, extra_body={"top_k": 20}
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]  # same seed, same sample


def test_models_and_health_expose_kv_plan(server):
    models = server.client().models.list().data
    assert [m.id for m in models] == ["tiny-llama"]
    kv = models[0].model_extra["longserve"]["kv"]
    assert kv["n_slots"] == 4 and kv["slot_capacity"] == 512 and kv["capacity_ratio_vs_full"] == 1.0
    health = server.http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["free_slots"] == 4


class TemplateTokenizer(ByteTokenizer):
    """A byte tokenizer with a fake chat template: '<|role|>content' per message, then '<|assistant|>'."""

    chat_template = "fake"

    def __init__(self):
        self.seen: list[list[dict]] = []

    def apply_chat_template(
        self, messages, add_generation_prompt=True, tokenize=True, return_dict=True, **kw
    ):
        self.seen.append(messages)
        text = "".join(f"<|{m['role']}|>{m['content']}" for m in messages) + "<|assistant|>"
        return {"input_ids": self.encode(text)}


def test_chat_uses_the_tokenizer_chat_template(serve, loaded):
    tokenizer = TemplateTokenizer()
    llm = LLM(loaded=dataclasses.replace(loaded, tokenizer=tokenizer), max_batch_size=2)
    with serve(llm=llm, max_model_len=256) as s:
        messages = [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ]
        r = s.client().chat.completions.create(
            model="tiny-llama", messages=messages, temperature=0, max_tokens=4
        )
    assert tokenizer.seen == [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]]
    assert r.usage.prompt_tokens == len(b"<|system|>be brief<|user|>ab<|assistant|>")
