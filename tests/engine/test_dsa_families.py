"""DeepSeek Sparse Attention (issue 43): DeepSeek-V3.2 and GLM-5 checkpoints saved by transformers. The engine's greedy
outputs equal transformers' forward without a cache (recomputed over the whole sequence for every new token:
tests.helpers.parity.hf_greedy_nocache), token for token in float64, with index_topk 8 / 12 so prompts of 1-150 tokens
attend sparsely: chunked and batched, with prefix caching (the indexer keys sit in the cached blocks), under
preemption, and prefilled on one engine and decoded on another (the keys travel with the latents). The config reading
and the cache layout are checked without a model run."""
from __future__ import annotations

import pytest
import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.kv_transfer.inhost import InHostKVConnector, InHostKVStore
from moelink.engine.config.kv_sizing import kv_cache_bytes_per_token
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.dsa import LightningIndexer

from tests.helpers.hf_checkpoints import HF_DSA, VOCAB
from tests.helpers.parity import assert_pool_free, assert_same, engine_greedy, hf_greedy_nocache, prompts

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


def _prompts(name: str, n: int = 8) -> list[list[int]]:
    """n prompts of 1-150 tokens, the first 6 tokens long (the second's start: within index_topk, its prefill alone
    takes the dense path); the parity tests share them, and so transformers' greedy outputs (cached in
    tests.helpers.parity)."""
    ps = prompts(VOCAB, seed=len(name) + sum(map(ord, name)), n=n, hi=150)
    ps[0] = ps[1][:6]
    return ps


def test_reads_indexers_shared_layers_and_the_key_cache(hf_tiny_model):
    v32 = ModelConfig.from_pretrained(hf_tiny_model("dsv32"), dtype="float64")
    ix = v32.attention.indexer
    assert (ix.num_heads, ix.head_dim, ix.topk, ix.rope_dim, ix.rope_style, ix.shared) == (16, 16, 8, 8, "neox", False)
    assert v32.attention.rope.style == "interleaved" and v32.sparse_layers == (1, 2) and not v32.layer_attention
    # latent 32 + rope 8, and the indexer key's 16 values, float64, per layer.
    assert v32.attention.cache_shapes(10, 16, v32.cache_dtype) == ((11, 16, 40), (11, 16, 16))
    assert v32.attention.cache_dtypes(v32.cache_dtype) == (torch.float64, torch.float64)
    assert kv_cache_bytes_per_token(v32) == 3 * (40 + 16) * 8
    glm = ModelConfig.from_pretrained(hf_tiny_model("glm5"), dtype="float64", kv_cache_dtype="fp8")
    assert [a.indexer.shared for a in glm.layer_attention] == [False, True, False]
    assert glm.attention.indexer.rope_style == "interleaved"
    assert [len(glm.attention_for(i).cache_shapes(4, 8)) for i in range(3)] == [2, 1, 2]  # shared: no key cache
    # fp8 KV: a byte per latent value; the 12-value key by default in fp8 with its scale, as bytes: 12 e4m3 bytes
    # (already a multiple of 4) + one float32 scale (12 < 128 values: one group) = 16 bytes.
    assert glm.attention.cache_shapes(4, 8, glm.cache_dtype)[1] == (5, 8, 16)
    assert glm.attention.cache_dtypes(glm.cache_dtype) == (torch.float8_e4m3fn, torch.uint8)
    assert kv_cache_bytes_per_token(glm) == 3 * 24 + 2 * 16
    # Selectable: float keys beside the fp8 latent ("model": the model's float64, 8 bytes a value), or fp8 keys
    # beside a float latent; anything else is refused naming the flag.
    glm_f = ModelConfig.from_pretrained(hf_tiny_model("glm5"), dtype="float64", kv_cache_dtype="fp8",
                                        index_cache_dtype="model")
    assert glm_f.attention.cache_dtypes(glm_f.cache_dtype) == (torch.float8_e4m3fn, torch.float64)
    assert kv_cache_bytes_per_token(glm_f) == 3 * 24 + 2 * 12 * 8
    v32_8 = ModelConfig.from_pretrained(hf_tiny_model("dsv32"), dtype="float64", index_cache_dtype="fp8")
    assert kv_cache_bytes_per_token(v32_8) == 3 * (40 * 8 + 16 + 4)
    with pytest.raises(ValueError, match="index_cache_dtype='bf16' is invalid"):
        ModelConfig.from_pretrained(hf_tiny_model("dsv32"), index_cache_dtype="bf16")
    from moelink.engine.config.engine_args import EngineArgs

    with pytest.raises(ValueError, match="index_cache_dtype='e5m2' is invalid: choose from 'auto', 'fp8', 'model'"):
        EngineArgs(model="org/name", index_cache_dtype="e5m2")


def test_refuses_what_transformers_would_not_run(tmp_path, hf_tiny_model):
    import json
    import shutil

    src = hf_tiny_model("glm5")
    for field, value, match in (("indexer_types", ["shared", "full", "full"], "indexer_types"),
                                ("mlp_layer_types", ["dense", "moe", "sparse"], "mlp_layer_types")):
        d = tmp_path / field
        shutil.copytree(src, d)
        raw = json.loads((d / "config.json").read_text())
        raw[field] = value
        (d / "config.json").write_text(json.dumps(raw))
        with pytest.raises(ValueError, match=match):
            ModelConfig.from_pretrained(str(d))


@pytest.mark.parametrize("name", list(HF_DSA))
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_greedy_parity_chunked_batched_and_prefix_cached(hf_tiny_model, name, monkeypatch):
    """8 prompts of 1-150 tokens in chunks of a 48-token budget, batched; then again on the same engine, where every
    full block comes from the prefix cache (the indexer keys with the latents), and both runs equal transformers."""
    path = hf_tiny_model(name)
    ps = _prompts(name)  # ps[0] within index_topk: its prefill, run alone first, takes the dense path
    sparse_steps = []
    real = LightningIndexer.forward
    monkeypatch.setattr(LightningIndexer, "forward", lambda self, *a: (
        lambda out: (sparse_steps.append(out is not None), out)[1])(real(self, *a)))
    want = hf_greedy_nocache(path, ps)
    llm = LLM(path, dtype="float64", max_num_seqs=8, max_num_batched_tokens=48, num_kv_blocks=256, block_size=16,
              skip_warmup=True)
    got = engine_greedy(llm, ps[:1])
    assert sparse_steps[0] is False  # the prefill's selection would be every position: dense
    got += engine_greedy(llm, ps[1:])
    assert len({t for out in got for t in out}) > 10, "degenerate model: greedy outputs barely vary"
    assert any(sparse_steps)
    assert_same(got, want, ps)
    hits_before = llm.engine.stats().prefix_cache_hits
    again = engine_greedy(llm, ps)
    hits = llm.engine.stats().prefix_cache_hits - hits_before
    full_blocks = sum((len(p) - 1) // 16 * 16 for p in ps)
    assert hits >= full_blocks > 0, f"expected >= {full_blocks} prefix-cache hit tokens, got {hits}"
    assert_same(again, want, ps)
    assert_pool_free(llm)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(HF_DSA))
def test_greedy_parity_under_preemption(hf_tiny_model, name):
    path = hf_tiny_model(name)
    ps = _prompts(name)  # the prompts (and so transformers' outputs) of the test above
    # 24 blocks of 8 tokens hold one 150-token prompt and a little more: eight running sequences must preempt.
    llm = LLM(path, dtype="float64", max_num_seqs=8, max_num_batched_tokens=64, num_kv_blocks=24, block_size=8)
    got = engine_greedy(llm, ps)
    assert llm.engine.stats().num_preemptions_total > 0
    assert_same(got, hf_greedy_nocache(path, ps), ps)
    assert_pool_free(llm)


def _generate(path, ps, connector=None, max_tokens=6, index_cache_dtype="auto"):
    with LLM(path, dtype="float64", num_kv_blocks=96, block_size=8, max_num_batched_tokens=32, max_model_len=256,
             skip_warmup=True, kv_connector=connector, index_cache_dtype=index_cache_dtype) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        outs = [o.outputs[0].token_ids for o in llm.generate(ps, params, use_tqdm=False)]
        stats = llm.engine.stats()
        assert stats.num_free_blocks == stats.num_total_blocks
    return outs


@pytest.mark.parametrize("name,index", [(n, "auto") for n in HF_DSA] + [("dsv32", "fp8")])
def test_prefill_on_one_engine_decode_on_another(hf_tiny_model, name, index, monkeypatch):
    """Engine A prefills and saves, engine B loads every layer's cache tensors (latent and indexer keys: float, or fp8
    rows with their scales) and decodes sparsely from them: B equals transformers (with fp8 keys, transformers whose
    indexer keys are rounded as the cache rounds them). A load without the keys would select from zeros."""
    from moelink.engine.contract.kv_blocks import PagedKVBlocks
    from tests.helpers.parity import hf_greedy_nocache_with

    path = hf_tiny_model(name)
    ps = prompts(VOCAB, seed=11, n=3, lo=20, hi=60)  # past index_topk: B's first token already attends sparsely
    saved = []
    real_read = PagedKVBlocks.read
    monkeypatch.setattr(PagedKVBlocks, "read", lambda self, t: (lambda s: (saved.append(s), s)[1])(real_read(self, t)))
    store = InHostKVStore()
    _generate(path, ps, InHostKVConnector(store, load=False), max_tokens=1, index_cache_dtype=index)
    cfg = ModelConfig.from_pretrained(path)
    # Per layer its tensors' rows: two (latent, keys) where the layer has an indexer, one for GLM-5's shared layer.
    assert [len(ts) for _, ts in saved[0].groups] == [len(cfg.attention_for(i).cache_shapes(1, 1)) for i in range(3)]
    if index == "fp8":  # the keys travel as their 20-byte rows (16 e4m3 bytes + a float32 scale)
        assert saved[0].groups[0][1][1].shape[-1] == 20
    got = _generate(path, ps, InHostKVConnector(store, save=False), index_cache_dtype=index)
    assert store.num_loaded == len(ps) and store.num_failed == 0
    want = (hf_greedy_nocache_with(_hf_with_fp8_keys(path), ps, 6) if index == "fp8"
            else hf_greedy_nocache(path, ps, max_new=6))
    assert_same(got, want, ps)


def test_fp8_checkpoint_equals_transformers_on_its_dequantized_weights(hf_tiny_model, tmp_path):
    """DeepSeek-V3.2 in FP8 as published (16 x 16 blocks here): the indexer's wq_b and wk FP8 with their scales,
    weights_proj float; greedy equals transformers' forward without a cache on the dequantized weights, with the
    W8A8 activation rounding where the engine quantizes (tests/helpers/fp8_checkpoints.fake_quant_hf_model)."""
    from safetensors import safe_open

    from moelink.engine.tools.quantize_fp8 import quantize_checkpoint
    from moelink.kernels.fp8 import FP8_DTYPE
    from tests.helpers.fp8_checkpoints import BLOCK, dequantized_copy, fake_quant_hf_model
    from tests.helpers.parity import hf_greedy_nocache_with

    dst = quantize_checkpoint(hf_tiny_model("dsv32_fp8"), tmp_path / "fp8", BLOCK)
    with safe_open(str(dst / "model.safetensors"), framework="pt") as st:
        p = "model.layers.1.self_attn.indexer."
        assert st.get_tensor(p + "wq_b.weight").dtype == FP8_DTYPE and p + "wk.weight_scale_inv" in st.keys()
        assert st.get_tensor(p + "weights_proj.weight").dtype == torch.float64
    deq = dequantized_copy(str(dst), tmp_path / "deq")
    ps = prompts(VOCAB, seed=21, n=4, lo=3, hi=90)
    got = engine_greedy(LLM(str(dst), dtype="float64", max_num_seqs=4, max_num_batched_tokens=40, num_kv_blocks=64,
                            block_size=8, skip_warmup=True), ps, max_new=6)
    assert len({t for g in got for t in g}) > 5, "degenerate model"
    assert_same(got, hf_greedy_nocache_with(fake_quant_hf_model(deq, BLOCK), ps, 6), ps)


@pytest.mark.parametrize("name", list(HF_DSA))
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_mtp_drafts_with_an_indexer_of_their_own(hf_tiny_model, name, tmp_path):
    """The MTP layer of a DSA checkpoint is a DSA layer too (its own indexer and key cache on the main block ids):
    with method "mtp" (k = 2) on a checkpoint whose MTP layer guesses the main model's next token
    (tests.helpers.mtp_checkpoints.bigram_mtp), drafts are accepted and verify steps attend sparsely; the greedy
    outputs equal transformers' forward without a cache."""
    import shutil

    from moelink.engine.tools.tiny_hf_model import add_mtp_layers
    from tests.helpers.mtp_checkpoints import bigram_mtp

    src = tmp_path / "src"
    shutil.copytree(hf_tiny_model(name), src)
    add_mtp_layers(src)
    path = str(bigram_mtp(src, tmp_path / "bigram", mtp_scale=0.1))
    ps = prompts(VOCAB, seed=31, n=6, lo=5, hi=120)
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=48, num_kv_blocks=256, block_size=16,
              skip_warmup=True, speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    got = engine_greedy(llm, ps)
    spec = llm.engine.stats().spec_decode
    assert spec.num_accepted_tokens > 0 and spec.num_draft_tokens > spec.num_accepted_tokens
    assert_same(got, hf_greedy_nocache(path, ps), ps)
    assert_pool_free(llm)


@pytest.fixture(scope="module")
def fp8_index_runs(hf_tiny_model):
    """DeepSeek-V3.2's tiny checkpoint served with float keys and with fp8 keys (per-128 scales) beside the same
    float64 latents, every indexer call's selection recorded; and the fp8 run's greedy tokens."""
    path = hf_tiny_model("dsv32")
    ps = prompts(VOCAB, seed=41, n=6, lo=30, hi=150)
    out = {}
    for choice in ("model", "fp8"):
        picks = []
        real = LightningIndexer.forward

        def record(self, *a):
            sel = real(self, *a)
            picks.append(None if sel is None else sel.clone())
            return sel

        LightningIndexer.forward = record
        try:
            llm = LLM(path, dtype="float64", max_num_seqs=6, max_num_batched_tokens=64, num_kv_blocks=128,
                      block_size=16, skip_warmup=True, index_cache_dtype=choice)
            first = engine_greedy(llm, ps, max_new=1)  # prefill steps only: both runs see the same inputs
            n_prefill = len(picks)
            tokens = engine_greedy(llm, ps)
        finally:
            LightningIndexer.forward = real
        out[choice] = dict(picks=picks[:n_prefill], first=first, tokens=tokens)
    out["want"] = hf_greedy_nocache(path, ps)
    out["prompts"], out["path"] = ps, path
    return out


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_fp8_index_cache_selects_mostly_the_float_keys_positions(fp8_index_runs):
    """The prefill steps of both runs (the same scheduling, the same prompt tokens): per query row, the share of the
    float-key selection the fp8 keys select too, per layer. Layer 0's keys differ by the fp8 rounding alone; a later
    layer's inputs differ too, by what the earlier layers' selections changed (this random tiny model amplifies it).
    Measured on this checkpoint (3352 selected positions a layer, top-8 among up to 150): 0.979, 0.863, 0.703."""
    a, b = fp8_index_runs["model"]["picks"], fp8_index_runs["fp8"]["picks"]
    assert len(a) == len(b) and sum(x is not None for x in a) >= 4
    layers = 3  # every layer of the DeepSeek-V3.2 checkpoint has an indexer: calls cycle through them
    same, total = [0] * layers, [0] * layers
    for i, (x, y) in enumerate(zip(a, b)):
        assert (x is None) == (y is None)
        if x is None:
            continue
        for rx, ry in zip(x.tolist(), y.tolist()):
            sx, sy = {p for p in rx if p >= 0}, {p for p in ry if p >= 0}
            assert len(sx) == len(sy)
            same[i % layers] += len(sx & sy)
            total[i % layers] += len(sx)
    share = [s / t for s, t in zip(same, total)]
    print(f"fp8 index keys: share of the float keys' selected positions per layer {share} of {total}")
    assert share[0] >= 0.95 and min(share) >= 0.5
    assert same[0] < total[0], "fp8 keys changed no selection: the test would not see a float cache under the fp8 name"


class _Fp8KeyRoundTrip:
    """Stands in for transformers' cache in its indexer's forward (whose only use of it is `update_indexer`): the
    keys as an fp8 key cache holds them, e4m3 with a float32 scale amax / 448 per 128 values, dequantized."""

    def update_indexer(self, k, layer_idx):
        out = torch.empty_like(k)
        for g0 in range(0, k.shape[-1], 128):
            part = k[..., g0: g0 + 128].float()
            s = part.abs().amax(-1, keepdim=True) / 448.0
            e4m3 = (part / torch.where(s > 0, s, 1.0)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
            out[..., g0: g0 + 128] = (e4m3.float() * s).to(k.dtype)
        return out


def _hf_with_fp8_keys(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, experts_implementation="eager").eval()
    for layer in model.model.layers:
        ix = layer.self_attn.indexer
        ix.forward = (lambda real: lambda *a, cache=None, **kw: real(*a, cache=_Fp8KeyRoundTrip(), **kw))(ix.forward)
    return model


def test_fp8_index_cache_greedy_tokens_against_transformers(fp8_index_runs):
    """Greedy tokens with fp8 keys equal transformers' forward without a cache whose indexer keys are rounded as the
    fp8 key cache rounds them (_Fp8KeyRoundTrip), token for token; the float-key run equals plain transformers. Against
    plain transformers the fp8 run differs once a changed selection flips a token of this random tiny model
    (measured: 4 of 6 first tokens equal, 7 of 60 tokens at the same places: greedy continuations part at the first
    flip), which is why the oracle rounds its keys as the cache does."""
    from tests.helpers.parity import hf_greedy_nocache_with

    want, ps = fp8_index_runs["want"], fp8_index_runs["prompts"]
    assert_same(fp8_index_runs["model"]["tokens"], want, ps)
    got = fp8_index_runs["fp8"]["tokens"]
    equal = sum(g == w for gs, ws in zip(got, want) for g, w in zip(gs, ws))
    print(f"fp8 index keys: {equal}/{sum(map(len, want))} greedy tokens equal to float-key transformers'")
    assert_same(got, hf_greedy_nocache_with(_hf_with_fp8_keys(fp8_index_runs["path"]), ps), ps)
