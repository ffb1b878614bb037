"""KVzip: the reconstruction pass's scores against a brute-force reference, what the engine keeps
with them, compress-once-ask-many through `LLM.compress`, and its errors."""

import pytest
import torch
import torch.nn.functional as F

from longserve.context import CompressedContext
from longserve.engine.sampler import SamplingParams
from longserve.errors import InvalidParameterError
from longserve.kv.attention import PrefillBackend
from longserve.kv.cache import KVPool
from longserve.kv.policies import AdaKVPolicy, FullPolicy, ScoreInputs, make_policy
from longserve.kv.policies.kvzip import FIRST_PROMPT, LATER_PROMPT, KVzipPolicy
from longserve.kv.scoring_pass import run_scoring_pass
from longserve.llm import LLM
from tests.kv.test_policies import MaskedReference, prompt, run
from tests.tiny import tiny_loaded


@pytest.fixture(scope="module")
def llm():
    loaded, _ = tiny_loaded("llama", num_hidden_layers=2)
    return LLM(loaded=loaded)


class Recorder:
    """Full causal attention over everything, recording each layer's post-RoPE queries and keys."""

    def __init__(self):
        self.q, self.k = {}, {}

    def attend(self, layer, q, k, v):
        self.q[layer], self.k[layer] = q[0], k[0]
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)


def reference_scores(model, context, chunks, n_layers):
    """Scores by definition: for each chunk, run context + chunk tokens with full attention; the chunk
    tokens' softmax over (sinks, the chunk's entries, the chunk tokens), max over group and queries."""
    n_ctx = len(context)
    out = [torch.zeros(2, n_ctx) for _ in range(n_layers)]
    for layer in range(n_layers):
        out[layer][:, : chunks[0].n_sink] = 1.0
    for chunk in chunks:
        rec = Recorder()
        ids = context + chunk.ids
        with torch.no_grad():
            model(torch.tensor([ids]), torch.arange(len(ids))[None], rec)
        n_sink = min(chunk.n_sink, chunk.start)
        cols = [*range(n_sink), *range(chunk.start, chunk.end), *range(n_ctx, len(ids))]
        for layer in range(n_layers):
            q, k = rec.q[layer][:, n_ctx:], rec.k[layer].repeat_interleave(2, 0)[:, cols]
            logits = (q @ k.transpose(1, 2)) * 0.25
            own = torch.ones(len(chunk.ids), len(chunk.ids)).tril().bool()
            mask = torch.cat([torch.ones(len(chunk.ids), len(cols) - len(chunk.ids)).bool(), own], 1)
            probs = logits.masked_fill(~mask, float("-inf")).softmax(-1)
            part = probs[..., n_sink : n_sink + chunk.end - chunk.start].view(2, 2, len(chunk.ids), -1)
            best = part.amax(dim=(1, 2))
            out[layer][:, chunk.start : chunk.end] = torch.maximum(
                out[layer][:, chunk.start : chunk.end], best
            )
    return out


def staged(llm, ids):
    pool = KVPool(llm.loaded.args, 1, len(ids))
    slot = pool.allocate(FullPolicy())
    backend = PrefillBackend(pool, slot, torch.arange(len(ids)), final=False)
    with torch.no_grad():
        llm.loaded.model(torch.tensor([ids]), torch.arange(len(ids))[None], backend)
    backend.finish()
    return pool, slot


@pytest.mark.parametrize("chunk_size, query_block", [(2048, 512), (23, 7)])
def test_scoring_pass_matches_the_definition(llm, chunk_size, query_block):
    context = prompt(5, 61)
    policy = KVzipPolicy(ratio=0.5, chunk_size=chunk_size, overlap=3)
    chunks = policy.scoring_pass(context, llm.tokenizer)
    assert len(chunks) == -(-61 // chunk_size)
    src = staged(llm, context)
    got = run_scoring_pass(llm.loaded.model, src, src, chunks, len(context), query_block)
    want = reference_scores(llm.loaded.model, context, chunks, 2)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    assert (got[0][:, :4] == 1).all() and (got[0][:, 4:] < 1).all()


def test_reconstruction_prompt():
    class Chat:
        chat_template = "x"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return f"<s>SYS<u>{messages[0]['content']}</u><a>"

        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    tok = Chat()
    opening = tok.encode("<s>SYS<u>")
    ids = opening + list(range(1000, 1030))
    chunks = KVzipPolicy(ratio=0.5, chunk_size=12, overlap=4).scoring_pass(ids, tok)
    n = len(opening)
    assert [(c.start, c.end) for c in chunks] == [(n, n + 12), (n + 12, n + 24), (n + 24, n + 30)]
    suffix = tok.encode("</u><a>")
    assert chunks[0].ids == tok.encode(FIRST_PROMPT) + suffix + ids[n : n + 12]  # the opening is not repeated
    assert chunks[1].ids == tok.encode(LATER_PROMPT) + ids[n + 8 : n + 12] + suffix + ids[n + 12 : n + 24]


def test_engine_keeps_the_top_scored_entries_at_their_positions(llm):
    """generate(kv_policy="kvzip") keeps, per head, the sinks, the last token and the best-scored
    entries of the pass; decoding then equals a full cache masked to exactly those entries."""
    ids = prompt(6, 90)
    policy = make_policy("kvzip", budget=30)
    engine = llm.engine(1, policy.capacity(90, 4))
    seq = engine.add_request(ids, SamplingParams(max_new_tokens=4, ignore_eos=True), policy)
    engine.step()
    kept = [engine.pool.pos[layer][seq.slot, :, :30].clone() for layer in range(2)]
    chunks = policy.scoring_pass(ids[:-1], llm.tokenizer)
    scores = reference_scores(llm.loaded.model, ids[:-1], chunks, 2)
    for layer in range(2):
        s = scores[layer].clone()
        s[:, :4] = float("inf")
        want = torch.cat([s.topk(29, dim=-1).indices.sort(-1).values, torch.full((2, 1), 89)], 1)
        assert torch.equal(kept[layer], want)
    assert seq.scoring_pass_tokens == sum(len(c.ids) for c in chunks) > 89
    while engine.has_unfinished():
        engine.step()
    ref = MaskedReference(kept, 90).logits(llm.loaded.model, ids + seq.output_ids[:-1])[89:]
    assert ref.argmax(-1).tolist() == seq.output_ids
    assert seq.stats()["scoring_pass_s"] > 0


def test_budget_at_least_prompt_equals_full_and_runs_no_pass(llm):
    ids = prompt(7, 50)
    full = run(llm, ids, make_policy("full"))
    for policy in (make_policy("kvzip", budget=50), make_policy("kvzip", ratio=1.0)):
        seq = run(llm, ids, policy)
        assert seq.output_ids == full.output_ids and seq.scoring_pass_tokens == 0


def test_compress_once_ask_many_holds_the_budget(llm, tmp_path):
    ids = prompt(8, 160)
    ctx = llm.compress(ids, kv_policy="kvzip", kv_ratio=0.25)
    per_token = llm.loaded.args.kv_bytes_per_token()
    assert ctx.fill == 40 and ctx.nbytes == 40 * per_token  # physically the budget
    assert ctx.policy["name"] == "kvzip"
    ctx.save(tmp_path / "c.safetensors")
    loaded = CompressedContext.load(tmp_path / "c.safetensors", llm.fingerprint)
    answers = [llm.ask(loaded, q, max_new_tokens=5).token_ids for q in ("ab", "xyz")]
    assert answers == [llm.ask(ctx, q, max_new_tokens=5).token_ids for q in ("ab", "xyz")]
    assert [len(a) for a in answers] == [5, 5]  # the stored context is reusable: two questions
    head_level = llm.compress(ids, kv_policy="kvzip", kv_ratio=0.25, head_adaptive=True, head_floor=0.0)
    assert head_level.heads is not None and head_level.nbytes == 40 * per_token
    counts = [torch.bincount(h.flatten(), minlength=2) for h in head_level.heads]
    assert all(int(c.sum()) == 80 for c in counts)


def test_sliding_window_models(llm):
    loaded, _ = tiny_loaded("gemma3")
    gemma = LLM(loaded=loaded)
    ids = prompt(9, 70)
    full = run(gemma, ids, make_policy("full"))
    assert run(gemma, ids, make_policy("kvzip", budget=80)).output_ids == full.output_ids
    seq = run(gemma, ids, make_policy("kvzip", budget=20))
    assert seq.kv_tokens_per_layer == [24, 24, 24, 20 + 11]  # rings hold their window; global: budget


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ratio": 1.5}, r"ratio must be in \(0, 1\]"),
        ({"ratio": 0.0}, r"ratio must be in \(0, 1\]"),
        ({"budget": 4}, "exceed the kv budget"),
        ({"budget": 64, "chunk_size": 0}, "chunk_size >= 1"),
        ({}, "exactly one of budget= or ratio="),
        ({"budget": 64, "kernel": 3}, "bad parameter for kv policy 'kvzip'"),
    ],
)
def test_bad_parameters(kwargs, message):
    with pytest.raises(InvalidParameterError, match=message):
        make_policy("kvzip", **kwargs)


def test_scores_only_from_the_pass(llm):
    inputs = ScoreInputs(
        0, torch.zeros(4, 1, 16), torch.zeros(2, 8, 16), torch.zeros(2, 8, 16), torch.arange(8), 0.25
    )
    with pytest.raises(InvalidParameterError, match="reconstruction pass"):
        KVzipPolicy(budget=6).score(inputs)
    with pytest.raises(InvalidParameterError, match="tokenizer"):
        KVzipPolicy(budget=6).scoring_pass([1, 2, 3], None)
    assert isinstance(make_policy("kvzip", budget=8, head_adaptive=True), AdaKVPolicy)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_scoring_backend_in_the_model_dtype(llm, dtype, tol):
    """One layer of the pass on random peaky q/k/v in fp32 and bf16: the output is attention over
    (prompt + the pass tokens, causal), the scores the definition computed in fp64 from the same
    values. bf16 finds each entry's best query with a bf16 matmul, then rescores it in fp32: the
    scores stay within a small relative error (the first version's bf16 logits were ~6% off)."""
    from longserve.kv.policies import ScoringChunk
    from longserve.kv.scoring_pass import ScoringBackend

    args = llm.loaded.args
    hkv, hq, d, n, t = args.n_kv_heads, args.n_heads, args.head_dim, 70, 40
    gen = torch.Generator().manual_seed(3)
    rand = lambda *shape: (torch.randn(*shape, generator=gen) * 2.5).to(dtype)  # noqa: E731
    pool = KVPool(args, 1, n, dtype=dtype)
    slot = pool.allocate(FullPolicy())
    backend = PrefillBackend(pool, slot, torch.arange(n), final=False)
    for layer in range(args.n_layers):
        backend.attend(layer, rand(1, hq, n, d), rand(1, hkv, n, d), rand(1, hkv, n, d))
    backend.finish()
    chunk = ScoringChunk(list(range(t)), 10, 60, n_sink=4)
    scores = [torch.zeros(hkv, n) for _ in range(args.n_layers)]
    q, k, v = rand(1, hq, t, d), rand(1, hkv, t, d), rand(1, hkv, t, d)
    positions = torch.arange(n, n + t)
    out = ScoringBackend((pool, slot), (pool, slot), chunk, positions, scores, query_block=16).attend(
        0, q, k, v
    )
    pk, pv, _ = pool.layer_entries(0, slot)
    keys = torch.cat([pk, k[0]], 1).double().repeat_interleave(hq // hkv, 0)
    values = torch.cat([pv, v[0]], 1).double().repeat_interleave(hq // hkv, 0)
    logits = q[0].double() @ keys.transpose(1, 2) * args.scaling  # [Hq, T, n + T]
    causal = torch.cat([torch.ones(t, n), torch.ones(t, t).tril()], 1).bool()
    logits = logits.masked_fill(~causal, float("-inf"))
    torch.testing.assert_close(out[0].double(), logits.softmax(-1) @ values, atol=tol, rtol=tol)
    cols = [*range(4), *range(10, 60), *range(n, n + t)]
    probs = logits[..., cols].softmax(-1)[..., 4:54].reshape(hkv, -1, 50)
    want = probs.amax(1).float()
    torch.testing.assert_close(scores[0][:, 10:60], want, atol=1e-6, rtol=tol)
    assert (scores[0][:, :10] == 0).all() and (scores[0][:, 60:] == 0).all()


@pytest.mark.parametrize("causal", [True, False])
def test_attention_lse_math_path_matches_the_fused_kernel(causal):
    """The blocked fp32 path other devices take (the flash-for-CPU kernel is CPU-only) gives the
    fused kernel's output and log-sum-exp."""
    from longserve.kv.scoring_pass import attention_lse

    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, 30, 16, generator=gen) * 2 for h in (4, 2, 2))
    fused = attention_lse(q, k, v, causal, 0.25, 7, fused=True)
    math = attention_lse(q, k, v, causal, 0.25, 7, fused=False)
    for got, want in zip(math, fused, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
