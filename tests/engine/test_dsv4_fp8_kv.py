"""DeepSeek-V4 with an fp8 KV cache (issue 45: --kv-cache-dtype fp8): the compressed entries and CSA's index keys
paged as fp8 rows (kernels/compressed_attention.FP8Rows), each sequence's window ring in fp8 rows too (ModelConfig resolves every V4
layer's cache dtype: engine/models/compressed_attention_config.resolve_compressed_cache), the compressor rows float32.

The oracle is transformers' own V4 (float64, no cache: its forward over the whole sequence for every new token) with
what the engine caches rounded the same way: its rope call rounds every window kv and every compressor's entry (e4m3
with a float32 scale per 64 values, the rope dims bfloat16) and a pre-hook every index key the indexer scores (e4m3, a
scale per 128), through FP8Rows.round_trip, the format's definition. The engine's greedy tokens, over chunked prefill, several sequences per
step, decode and prefix-cache hits, must equal it token for token.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from moelink.engine import LLM
from moelink.engine.config import kv_sizing
from moelink.engine.models.compressed_attention_config import (ENTRY_SCALE_GROUP, INDEX_SCALE_GROUP,
                                                               CompressedAttentionConfig, fp8_row_bytes)
from moelink.engine.models.rope_config import RopeConfig
from moelink.engine.config.model import ModelConfig
from moelink.kernels.compressed_attention import entry_rows, index_key_rows

from tests.helpers.dsv4_checkpoint import VOCAB, save_dsv4_checkpoint
from tests.helpers.parity import MAX_NEW, assert_pool_free, assert_same, engine_greedy, prompts
from tests.helpers import zygote


@pytest.fixture(scope="module")
def dsv4_path(tmp_path_factory) -> str:
    return save_dsv4_checkpoint(tmp_path_factory.mktemp("dsv4_fp8"))


# _fake_quantized_greedy's answers by (path, prompts, max_new, window): two tests ask for the same oracle run.
_FAKE_QUANTIZED: dict[tuple, list[list[int]]] = {}


def _fake_quantized_greedy(path: str, ps: list[list[int]], max_new: int = MAX_NEW, window: bool = False,
                           monkeypatch=None) -> list[list[int]]:
    """transformers' greedy tokens, no cache, with the cached tensors fake-quantized (module docstring). `window`:
    the window's raw kv too, which transformers computes inline: its rope call (`apply_rotary_pos_emb`, patched
    through `monkeypatch`) returns it as [B, 1, S, H], as it does the compressors' entries, and nothing else of that
    shape (queries have N heads there, the output's inverse rope S >= 2 rows: prompts of 2 tokens or more).
    Computed once per module for the same question (_FAKE_QUANTIZED)."""
    key = (path, tuple(map(tuple, ps)), max_new, window)
    if key not in _FAKE_QUANTIZED:
        _FAKE_QUANTIZED[key] = _fake_quantized_greedy_run(path, ps, max_new, window, monkeypatch)
    return [list(out) for out in _FAKE_QUANTIZED[key]]


def _fake_quantized_greedy_run(path: str, ps: list[list[int]], max_new: int, window: bool,
                               monkeypatch) -> list[list[int]]:
    from transformers import AutoModelForCausalLM
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_v4

    cfg = ModelConfig.from_pretrained(path, dtype="float64")
    csa = next(cfg.attention_for(i) for i in range(cfg.num_layers) if cfg.attention_for(i).layer_kind == "csa")
    H = csa.head_dim
    entries, keys = entry_rows(H, csa.rope.rotary_dim), index_key_rows(csa.index_head_dim)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, experts_implementation="eager").eval()
    n_hooks = 0
    for mod in model.modules():
        if isinstance(mod, (hf_v4.DeepseekV4HCACompressor, hf_v4.DeepseekV4CSACompressor)) and not window:
            mod.register_forward_hook(lambda _m, _a, out: (entries.round_trip(out[0]), out[1]))
            n_hooks += 1
        elif isinstance(mod, hf_v4.DeepseekV4IndexerScorer):
            mod.register_forward_pre_hook(lambda _m, a: (a[0], keys.round_trip(a[1]), *a[2:]))
            n_hooks += 1
    assert n_hooks == (2 if window else 5)  # 2 CSA + 1 HCA compressors, 2 indexers
    if window:
        rope = hf_v4.apply_rotary_pos_emb

        def rounded(x, cos, sin, *a, **kw):
            out = rope(x, cos, sin, *a, **kw)
            return entries.round_trip(out) if out.dim() == 4 and out.shape[1] == 1 and out.shape[-1] == H else out

        monkeypatch.setattr(hf_v4, "apply_rotary_pos_emb", rounded)
    outs = []
    with torch.no_grad():
        for p in ps:
            seq = list(p)
            for _ in range(max_new):
                logits = model(torch.tensor([seq]), use_cache=False).logits[0, -1]
                seq.append(int(logits.argmax()))
            outs.append(seq[len(p):])
    return outs


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_fp8_rounding_is_what_moves_the_tokens(dsv4_path, monkeypatch):
    """The oracle is not vacuous: rounding what the engine caches changes transformers' greedy tokens for some prompt
    of this set (else equality below would not show that the engine rounds at all); the index keys' and entries'
    rounding alone moves them too, and differently from the window's."""
    from tests.helpers.parity import hf_greedy_nocache

    ps = prompts(VOCAB, seed=11, n=6, lo=2, hi=150)  # 2 tokens at least: the window's rounding (_fake_quantized_greedy)
    entries_only = _fake_quantized_greedy(dsv4_path, ps)
    assert entries_only != hf_greedy_nocache(dsv4_path, ps)
    assert _fake_quantized_greedy(dsv4_path, ps, window=True, monkeypatch=monkeypatch) != entries_only


def test_kv_sizing_bytes_per_token_fp8_beside_bf16(dsv4_path):
    """kv_sizing counts the fp8 rows: the tiny model (H 16 with 8 rope dims, I 8) and V4-Flash's CSA / HCA layers
    (H 512 with 64 rope dims, I 128, rates 4 / 128), printed."""
    bf16 = ModelConfig.from_pretrained(dsv4_path, dtype="bfloat16")
    fp8 = ModelConfig.from_pretrained(dsv4_path, dtype="bfloat16", kv_cache_dtype="fp8")
    tiny = kv_sizing.kv_cache_bytes_per_token(bf16), kv_sizing.kv_cache_bytes_per_token(fp8)
    # bf16: CSA (16 + 8) / 2 values x 2 layers + HCA 16 / 8 = 26 values, 52 bytes. fp8: a CSA entry row is 8 e4m3 +
    # one scale + 8 bf16 = 28 bytes, an index key 8 + 4 = 12: (28 + 12) / 2 = 20 a layer; HCA 28 / 8 -> 4.
    assert tiny == (52, 44)
    rope = RopeConfig(64, 10000.0, "default", style="interleaved")
    flash_csa = CompressedAttentionConfig("csa", 64, 512, 1024, 8, 1024, 128, rope, compress_rate=4, index_n_heads=64,
                                          index_head_dim=128, index_topk=512)
    flash_hca = CompressedAttentionConfig("hca", 64, 512, 1024, 8, 1024, 128, rope, compress_rate=128)
    flash = [(a.kv_bytes_per_token(torch.bfloat16), a.kv_bytes_per_token(torch.float8_e4m3fn))
             for a in (flash_csa, flash_hca)]
    # CSA: (1024 + 256) / 4 = 320 bf16, (604 + 132) / 4 = 184 fp8; HCA: 1024 / 128 = 8, 604 / 128 -> 5
    assert flash == [(320, 184), (8, 5)]
    # the config's row bytes (it imports no kernel) are the codec's rows
    cases = [(512, 64, ENTRY_SCALE_GROUP, entry_rows(512, 64)), (16, 8, ENTRY_SCALE_GROUP, entry_rows(16, 8)),
             (128, 0, INDEX_SCALE_GROUP, index_key_rows(128)), (24, 0, INDEX_SCALE_GROUP, index_key_rows(24))]
    for dim, rope, group, rows in cases:
        assert fp8_row_bytes(dim, rope, group) == rows.row_bytes == rows.encode(torch.ones(1, dim)).shape[-1]
    print(f"kv bytes per token of context: tiny V4 bf16 {tiny[0]} fp8 {tiny[1]} ({tiny[1] / tiny[0]:.2f}x); "
          f"V4-Flash CSA layer bf16 {flash[0][0]} fp8 {flash[0][1]} ({flash[0][1] / flash[0][0]:.2f}x), HCA layer "
          f"bf16 {flash[1][0]} fp8 {flash[1][1]}")
    # the state slot: the window ring in fp8 rows (resolve_compressed_cache sets cache_dtype), the compressor rows float32
    state = [(a.state_bytes_per_sequence(torch.bfloat16),
              dataclasses.replace(a, cache_dtype=torch.float8_e4m3fn).state_bytes_per_sequence(torch.bfloat16))
             for a in (flash_csa, flash_hca)]
    # CSA: window 128 x 1024 -> 128 x 604, rows 8 x 2048 x 4 + 8 x 512 x 4; HCA: rows 128 x 1024 x 4
    assert state == [(131072 + 65536 + 16384, 77312 + 65536 + 16384), (131072 + 524288, 77312 + 524288)]
    print(f"V4-Flash state bytes per sequence and layer: CSA bf16 window {state[0][0]} fp8 window {state[0][1]}, HCA "
          f"{state[1][0]} / {state[1][1]} (the float32 compressor rows dominate HCA's)")
    assert fp8.attention_for(1).cache_dtypes(fp8.cache_dtype) == (torch.uint8, torch.uint8)
    with pytest.raises(ValueError, match="kv_cache_dtype=torch.float8_e5m2 is not supported for DeepSeek-V4"):
        flash_csa.cache_shapes(4, 8, torch.float8_e5m2)


@pytest.mark.slow  # a fresh process, and the interpreter runs every kernel of each step
def test_fp8_triton_kernels_equal_reference_kernels_greedy(dsv4_path):
    """The same fp8 engine on the Triton kernels (the decode steps' paged ops dequantizing the fp8 pages, and the
    fp8 window rows, inside the kernels: kernels/triton_compressed_attention_paged.py), in the interpreter on CPU, against the
    reference kernels, float32, token for token (test_dsv4_triton's run, with kv_cache_dtype fp8)."""
    import json
    import os
    import sys

    from tests.engine.test_dsv4_triton import _TRITON_RUN, ENGINE
    from tests.helpers.fast_interpreter import interpreter_env

    engine = {**ENGINE, "kv_cache_dtype": "fp8"}
    ps = prompts(VOCAB, seed=7, n=2, lo=11, hi=21)
    env = interpreter_env() if not torch.cuda.is_available() else dict(os.environ)
    script = _TRITON_RUN
    # Forked by the test zygote (torch, transformers imported once), TRITON_INTERPRET and the fast interpreter's
    # sitecustomize taking effect as at an exec'd start (tests/helpers/zygote.py).
    proc = zygote.run([sys.executable, "-c", script, dsv4_path, json.dumps(ps), json.dumps(engine)], env=env,
                      capture_output=True, text=True, timeout=600, cwd=os.getcwd(), fork_code=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.split("TOKENS", 1)[1])
    calls = json.loads(proc.stdout.split("CALLS", 1)[1].split("TOKENS")[0])
    assert calls.get("triton_paged_sink_attention", 0) >= 4 and calls.get("triton_paged_compressed_indexer_topk", 0) >= 2
    ref = LLM(dsv4_path, kernels="reference", **engine)
    assert ref.engine.executor.runner.state_caches.layers[0][0].dtype == torch.uint8  # the window in fp8 rows
    assert_same(got, engine_greedy(ref, ps, max_new=4), ps)


@pytest.mark.slow
def test_fp8_greedy_with_mtp_drafts_equals_without(tmp_path_factory):
    """MTP drafts (bigram module, k = 2: accepted and rejected) over the fp8 cache: entries a rejected draft closed
    are written again by the real tokens, and the ring rows it overwrote (fp8 window rows too) are restored
    (engine/models/deepseek_v4/rollback.py copies them as they are), so the tokens equal the fp8 engine's without drafts.
    The drafter's own window cache (engine/models/deepseek_v4/mtp.py WindowCache) stays in the model dtype."""
    from tests.helpers.dsv4_mtp_checkpoint import bigram_dsv4_mtp, save_dsv4_with_mtp

    d = tmp_path_factory.mktemp("dsv4_fp8_mtp")
    path = bigram_dsv4_mtp(save_dsv4_with_mtp(d / "random", moe_intermediate_size=32), d / "bigram")[0]
    ps = prompts(VOCAB, seed=21, n=4, lo=1, hi=100)
    kw = dict(dtype="float64", kv_cache_dtype="fp8", max_num_seqs=4, max_num_batched_tokens=48, num_kv_blocks=64,
              block_size=8)
    want = engine_greedy(LLM(path, **kw), ps)
    llm = LLM(path, speculative_config={"method": "mtp", "num_speculative_tokens": 2}, **kw)
    assert llm.engine.executor.runner.state_caches.layers[0][0].dtype == torch.uint8
    assert_same(engine_greedy(llm, ps), want, ps)
    sd = llm.engine.stats().spec_decode
    assert 0.0 < sd.acceptance_rate < 1.0, sd
    assert_pool_free(llm)


@pytest.mark.slow
def test_fp8_pd_transfer_moves_the_rows_as_they_are(dsv4_path):
    """Prefill on one fp8 engine, decode on another over TCP (engine/kv_transfer: the paged uint8 rows travel as bytes,
    the window (fp8 rows too) and compressor rows as the state groups): the decode engine computes only
    each prompt's last token and its greedy tokens equal one fp8 engine's."""
    from moelink.engine import SamplingParams
    from moelink.engine.contract.kv_transfer_params import KVTransferParams
    from moelink.engine.kv_transfer.remote import RemoteKVConfig, RemoteKVConnector

    from tests.helpers.kv_disagg import KW, Decoder
    from tests.helpers.net import free_port

    kw = {**KW, "block_size": 8, "kv_cache_dtype": "fp8"}
    ps = prompts(VOCAB, seed=29, n=3, lo=1, hi=60)
    want = engine_greedy(LLM(dsv4_path, **kw), ps, max_new=6)
    save = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True,
                          kv_transfer_params=KVTransferParams(do_remote_decode=True))
    pre = LLM(dsv4_path, kv_connector=RemoteKVConnector(RemoteKVConfig(port=free_port(), transport="tcp")), **kw)
    dec = None
    try:
        outs = pre.generate(ps, save, use_tqdm=False)
        dec = Decoder(dsv4_path, RemoteKVConfig(transport="tcp"), block_size=8, kv_cache_dtype="fp8")
        dec.add(ps, [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                    kv_transfer_params=o.kv_transfer_params) for o in outs])
        got = {}
        while dec.llm.engine.has_requests():
            for o in dec.llm.engine.step():
                if o.finished:
                    got[o.request_id] = o.outputs[0].token_ids
        assert [got[f"d{i}"] for i in range(len(ps))] == want
        assert dec.computed == len(ps) * 6
    finally:
        if dec is not None:
            dec.close()
        pre.engine.shutdown()


@pytest.mark.slow
def test_fp8_greedy_equals_transformers_with_the_cache_rounded_alike(dsv4_path, monkeypatch):
    """With the window ring in fp8 rows as well (each token's kv rounded as the entries are, a prefill chunk's own
    keys included), greedy tokens equal transformers' with the window kv, the entries and the index keys rounded
    alike; the state slot's window bytes shrink to the fp8 rows'."""
    cfg = ModelConfig.from_pretrained(dsv4_path, dtype="float64", kv_cache_dtype="fp8")
    csa = cfg.attention_for(1)
    assert csa.window_fp8 and csa.state_dtypes(torch.float64)[0] == torch.uint8
    # window 6 rows of 28 bytes (float64: 6 x 16 x 8) beside the float64 compressor rows
    assert csa.state_bytes_per_sequence(torch.float64) == 6 * 28 + (4 * 64 + 4 * 32) * 8
    ps = prompts(VOCAB, seed=11, n=6, lo=2, hi=150)
    want = _fake_quantized_greedy(dsv4_path, ps, window=True, monkeypatch=monkeypatch)
    llm = LLM(dsv4_path, dtype="float64", kv_cache_dtype="fp8", max_num_seqs=4, max_num_batched_tokens=48,
              num_kv_blocks=128, block_size=8, num_state_checkpoints=16)
    windows = [pools[0] for pools in llm.engine.executor.runner.state_caches.layers]
    assert all(w.dtype == torch.uint8 and w.shape[-1] == 28 for w in windows)
    assert_same(engine_greedy(llm, ps), want, ps)
    hits_before = llm.engine.stats().prefix_cache_hits
    assert_same(engine_greedy(llm, ps), want, ps)
    assert llm.engine.stats().prefix_cache_hits > hits_before
    assert_pool_free(llm)
    assert len({t for out in want for t in out}) > 10, "degenerate model: greedy outputs barely vary"
