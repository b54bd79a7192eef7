"""Tensor parallelism for the families that need more than heads cut by rows (issue 46, docs/tensor-parallelism.md):
at `-tp 2` (Ray, CPU ranks, gloo, float64) greedy tokens equal one rank's on the same tiny checkpoint, saved by
transformers itself:
- Qwen3-Next: gated attention output (each head's gate rows read with its query rows) and gated DeltaNet layers
  (q/k head groups and their value heads split, conv channels and states per rank);
- Qwen3.5-MoE: the same layers from split projections (in_proj_qkv / z / b / a) in a multimodal checkpoint;
- MiniMax-M2: the q/k RMSNorm over all heads (each rank's mean square all-reduced), at -tp 4 too (kv heads
  replicated);
- DeepSeek-V2-Lite: MLA without q LoRA (q_proj by head, stacked with the whole kv_a_proj_with_mqa);
- DeepSeek-V3.2 and GLM-5: DeepSeek Sparse Attention (the lightning indexer whole on every rank, MLA heads split),
  prompts past index_topk so prefill and decode run sparse;
- LongCat-Flash: the shortcut-connected MoE over sublayer pairs, MLA heads split, the zero-computation experts'
  identity added once over the experts' channel all-reduce; and at EP 2 against transformers (zero picks routed
  nowhere, or to an expert with weight 0 where the all-to-all looks every id up);
- Kimi Linear: Kimi Delta Attention's heads split (their q/k/v rows, conv channels, decay and gate rows, states),
  the low-rank gates' middles whole on every rank, MLA without rotary; and at EP 2 against transformers;
- Ling's hybrid: the same with full-rank KDA gates, and MLA's per-head output gate split by heads;
- Hunyuan Hy4: DSA with sinks and the element-wise output gate (this rank's heads' sinks and gate rows), the
  indexer whole on every rank, independent hyper-connections whole on every rank; and its experts at EP 2 against
  transformers' forward without a cache;
- EXAONE-MoE: sliding layers with rotary and a full layer without (NoPE), per-head q/k norms, heads split; and its
  experts at EP 2 against transformers (DeepSeek-V3 routing in groups, a shared expert on every rank);
- GLM-5.3-Flash: hyper-connection streams whole on every rank, KDA heads split, NoPE MLA heads split (each rank its
  heads' q_b_proj rows into the nope part of its zero-padded heads) beside the pooled indexer whole on every rank;
  and at EP 2 against transformers' forward without a cache (clamped SwiGLU experts 4 / 4, the shared one on both).
- MiniMax-M3: block-sparse attention (the block indexer whole on every rank, each rank its query heads' selections
  and kv heads), the clamped SwiGLU of the dense and shared MLPs split by channels; and at EP 2 against transformers
  on its multimodal checkpoint.
- Qwen3.8-Flash-Next: QSA's gated attention heads split (its indexer and index-key cache whole on every rank), gated
  DeltaNet's heads split, the PLE's n-gram tables split by columns (rows all-gathered), the hyper-connections and the
  PLE's other weights and states whole on every rank; and at EP 2 against transformers.
What each rank reads is checked by tests/engine/test_tp_shards.py. Lean: 3 prompts, 4 new tokens each."""
from __future__ import annotations

import pytest

from moelink.engine import LLM

from moelink.engine.models.bailing_hybrid.tiny import BAILING
from moelink.engine.models.exaone_moe.tiny import EXAONE
from moelink.engine.models.glm5_next.tiny import write as write_glm5_next
from moelink.engine.models.hy_v4.tiny import tiny_config as hy4_config, tiny_model as hy4_model
from moelink.engine.models.kimi_linear.tiny import KIMI_LINEAR
from moelink.engine.models.minimax_m3.tiny import MINIMAX_M3

from tests.helpers import hf_checkpoints, longcat_checkpoints, m2_checkpoints, qwen4_exp_checkpoints
from tests.helpers.drawn_presets import VOCAB, save_preset
from tests.helpers.parity import assert_same, engine_greedy, hf_greedy, hf_greedy_nocache, prompts

pytestmark = pytest.mark.slow

KW = dict(dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=4)
NEW = 4


def _tp_equals_one_rank(path: str, vocab: int, seed: int, lo: int = 1, hi: int = 30, tp: int = 2) -> None:
    ps = prompts(vocab, seed=seed, n=3, lo=lo, hi=hi)
    want = engine_greedy(LLM(path, **KW), ps, max_new=NEW)
    llm = LLM(path, tensor_parallel_size=tp, **KW)
    try:
        assert_same(engine_greedy(llm, ps, max_new=NEW), want, ps)
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("name", ["qwen3_next", "qwen3_5_moe"])
def test_tp_hybrid_gated_attention_matches_one_rank(local_ray, hf_tiny_model, name):
    # Chunked prefill over state slots and decode steps: both gated DeltaNet forms, each rank its heads' states.
    _tp_equals_one_rank(hf_tiny_model(name), hf_checkpoints.VOCAB, seed=11)


# -tp 4: one q head per rank, and the 2 kv heads replicated (each counted twice in the all-reduced k mean square).
@pytest.mark.parametrize("tp", [2, 4])
def test_tp_minimax_all_heads_norm_matches_one_rank(local_ray, tmp_path, tp):
    path = m2_checkpoints.save_m2_checkpoint(tmp_path, "minimax", num_hidden_layers=2)
    _tp_equals_one_rank(path, m2_checkpoints.VOCAB, seed=13, tp=tp)


def test_tp_mla_without_q_lora_matches_one_rank(local_ray, hf_tiny_model):
    _tp_equals_one_rank(hf_tiny_model("dsv2_lite"), hf_checkpoints.VOCAB, seed=17)


# GLM-5 too: a layer attending to the previous indexer's selection, interleaved indexer rope, MLA biases.
@pytest.mark.parametrize("name", ["dsv32", "glm5"])
def test_tp_sparse_attention_matches_one_rank(local_ray, hf_tiny_model, name):
    # index_topk 8 / 12: prompts of 14..30 tokens select that many of their positions at every step.
    _tp_equals_one_rank(hf_tiny_model(name), hf_checkpoints.VOCAB, seed=19, lo=14, hi=30)


def test_tp_exaone_nope_and_sliding_matches_one_rank(local_ray, tmp_path):
    # Prompts of 8..40 tokens: past the 6-token window, so the sliding layers drop keys the NoPE layer still reads.
    path = save_preset(tmp_path, EXAONE, num_hidden_layers=4)
    _tp_equals_one_rank(path, VOCAB, seed=23, lo=8, hi=40)


def test_tp_longcat_matches_one_rank(local_ray, tmp_path):
    path = longcat_checkpoints.save_longcat_checkpoint(tmp_path)
    _tp_equals_one_rank(path, longcat_checkpoints.VOCAB, seed=41, hi=40)


def test_tp_minimax_m3_block_sparse_matches_one_rank(local_ray, tmp_path):
    # Prompts of 18..40 tokens: past 4 blocks of 4, so prefill and decode drop blocks on the sparse layers.
    _tp_equals_one_rank(save_preset(tmp_path, MINIMAX_M3), VOCAB, seed=71, lo=18, hi=40)


@pytest.mark.parametrize("name", ["kimi_linear", "bailing_hybrid"])
def test_tp_kda_families_match_one_rank(local_ray, tmp_path, name):
    # Chunked prefill over the KDA states (prompts past the 24-token budget), then decodes: each rank its heads'
    # (Ling's: its full-rank gates' rows, and MLA's per-head output gate).
    _tp_equals_one_rank(save_preset(tmp_path, KIMI_LINEAR if name == "kimi_linear" else BAILING), VOCAB, seed=53,
                        hi=40)


def test_tp_qwen4_exp_matches_one_rank(local_ray, tmp_path):
    # Prompts past the 24-token budget and QSA's 8-token budget: chunked prefill over the states, sparse selections.
    path = qwen4_exp_checkpoints.save_qwen4_exp_checkpoint(tmp_path)
    _tp_equals_one_rank(path, qwen4_exp_checkpoints.VOCAB, seed=61, lo=10, hi=40)


# EXAONE-MoE: 8 routed experts 4 / 4, the shared expert on both ranks. LongCat-Flash: 6 routed experts 3 / 3 beside 2
# zero-computation ones (this all-to-all looks every id up, so their picks travel to expert 0 with weight 0). Kimi
# Linear and Ling's hybrid: 8 experts 4 / 4 beside KDA's states. MiniMax-M3: 6 experts 3 / 3, the shared expert on
# both ranks, block-sparse attention whole on each. Qwen3.8-Flash-Next: 6 experts 3 / 3, a gated shared expert on
# both ranks.
def _glm5_next(out) -> str:
    import torch

    return write_glm5_next(out, seed=0, dtype=torch.float64, fmt="float", overrides={})


def _save_hy4(out) -> str:
    from moelink.engine.tools.tiny_families import save_model

    cfg = hy4_config()
    return save_model(hy4_model(cfg), out, cfg)


# GLM-5.3-Flash: clamped SwiGLU experts 4 / 4, the shared one on both; Hy4: 10 routed experts 5 / 5, the clamped
# SwiGLU on each rank's. Both against transformers' forward without a cache (DSA's oracle: hf_greedy_nocache).
EP_CASES = {"exaone": (lambda out: save_preset(out, EXAONE, num_hidden_layers=4), 29, hf_greedy),
            "longcat": (longcat_checkpoints.save_longcat_checkpoint, 43, hf_greedy),
            "kimi_linear": (lambda out: save_preset(out, KIMI_LINEAR), 59, hf_greedy),
            "bailing_hybrid": (lambda out: save_preset(out, BAILING), 67, hf_greedy),
            "minimax_m3": (lambda out: save_preset(out, MINIMAX_M3), 73, hf_greedy),
            "qwen4_exp": (qwen4_exp_checkpoints.save_qwen4_exp_checkpoint, 71, hf_greedy),
            "glm5_next": (_glm5_next, 73, hf_greedy_nocache),
            "hy4": (_save_hy4, 73, hf_greedy_nocache)}


@pytest.mark.parametrize("name", list(EP_CASES))
def test_ep_2_matches_transformers(local_ray, tmp_path, name):
    save, seed, oracle = EP_CASES[name]
    path = save(tmp_path)
    ps = prompts(VOCAB, seed=seed, n=4, lo=1, hi=60)  # every preset's vocabulary (tiny_families)
    llm = LLM(path, expert_parallel_size=2, **KW)
    try:
        assert_same(engine_greedy(llm, ps, max_new=NEW), oracle(path, ps, max_new=NEW), ps)
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
    finally:
        llm.engine.shutdown()


def test_tp_glm5_next_matches_one_rank(local_ray, tmp_path):
    # Prompts of 14..40 tokens: past index_topk 8 + the 3-token tail, so prefill and decode select pools.
    _tp_equals_one_rank(_glm5_next(tmp_path), VOCAB, seed=71, lo=14, hi=40)


def test_tp_hy4_matches_one_rank(local_ray, tmp_path):
    # index_topk 12: prompts of 14..30 tokens attend sparsely at every step; two shared layers reuse a selection.
    _tp_equals_one_rank(_save_hy4(tmp_path), VOCAB, seed=71, lo=14, hi=30)


# Issue 96's families: Qwen2-MoE (q/k/v biases, a gated shared expert split by channels), OLMoE (all-heads q/k norm
# and the q/k/v clamp), ERNIE-4.5-MoE (each rank's heads' q/k rows de-interleaved in place), Granite-MoE with its
# shared MLP (one input_linear read into both halves of each rank's gate/up rows; the muP multipliers folded into
# each rank's shards) at TP 2 against one rank; DBRX's fused experts (each rank its experts' w1 / v1 / w2 rows) and
# ERNIE's correction-biased routing at EP 2 against transformers.
def _issue96(name: str):
    from moelink.engine.models.dbrx.tiny import save_dbrx
    from moelink.engine.models.ernie4_5_moe.tiny import ERNIE
    from moelink.engine.models.granitemoe.tiny import GRANITE_SHARED
    from moelink.engine.models.olmoe.tiny import OLMOE
    from moelink.engine.models.qwen2_moe.tiny import QWEN2_MOE

    presets = {"qwen2_moe": QWEN2_MOE, "olmoe": OLMOE, "ernie4_5_moe": ERNIE, "granitemoeshared": GRANITE_SHARED}
    return save_dbrx if name == "dbrx" else (lambda out: save_preset(out, presets[name]))


@pytest.mark.parametrize("name", ["qwen2_moe", "olmoe", "ernie4_5_moe", "granitemoeshared"])
def test_tp_issue96_families_match_one_rank(local_ray, tmp_path, name):
    _tp_equals_one_rank(_issue96(name)(tmp_path), VOCAB, seed=79)


@pytest.mark.parametrize("name", ["dbrx", "ernie4_5_moe"])
def test_ep_2_issue96_families_match_transformers(local_ray, tmp_path, name):
    path = _issue96(name)(tmp_path)
    ps = prompts(VOCAB, seed=83, n=4, lo=1, hi=60)
    llm = LLM(path, expert_parallel_size=2, **KW)
    try:
        assert_same(engine_greedy(llm, ps, max_new=NEW), hf_greedy(path, ps, max_new=NEW), ps)
    finally:
        llm.engine.shutdown()
