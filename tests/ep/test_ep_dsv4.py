"""Expert parallelism on Ray (CPU, gloo) for DeepSeek-V4 (issue 45) at EP 2 (6 experts, 3/3): attention is data
parallel, so each rank keeps its own sequences' compressed entries and window / compressor states; the hash-routed
layers dispatch by the token ids each rank was given (no router GEMM picks their experts). Greedy outputs equal
transformers' in float64 (prompts of 1-150 tokens past the compress boundaries and the indexer's top-k), every routed
pair counted once (the hash-routed layers' load equal to their table's, token by token), every block back."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moelink.engine import LLM

from tests.helpers.dsv4_checkpoint import VOCAB, save_dsv4_checkpoint
from tests.helpers.parity import assert_same, engine_greedy, hf_greedy, prompts

pytestmark = pytest.mark.slow

NEW = 6  # new tokens per prompt (decode steps through the window ring and past further compress boundaries)


@pytest.fixture(scope="module")
def dsv4_path(tmp_path_factory) -> str:
    return save_dsv4_checkpoint(tmp_path_factory.mktemp("dsv4_ep"))


@pytest.mark.parametrize("tbo", [False, True])
def test_dsv4_ep2_matches_transformers(local_ray, dsv4_path, tbo):
    """tbo: each step as two micro-batches (engine/rank/step_plan.py), each with its sequences' slots and tables."""
    path = dsv4_path
    ps = prompts(VOCAB, seed=11, n=5, hi=150)
    llm = LLM(path, expert_parallel_size=2, enable_two_batch_overlap=tbo, dtype="float64", max_num_seqs=4,
              max_num_batched_tokens=48, num_kv_blocks=128, block_size=8)
    try:
        got = engine_greedy(llm, ps, max_new=NEW)
        assert_same(got, hf_greedy(path, ps, max_new=NEW), ps)
        computed = sum(len(p) + NEW - 1 for p in ps)
        load_LG = llm.engine.moe_metrics.tokens_per_expert
        assert load_LG.sum() == computed * 2 * 4  # top-2, 4 MoE layers (2 hash-routed)
        # the hash-routed layers' load, counted on both ranks, is their table's: tid2eid of every computed token
        fed = torch.tensor([t for p, out in zip(ps, got) for t in p + out[:-1]])
        tensors = load_file(next(Path(path).glob("*.safetensors")))
        for layer in (0, 1):
            table_VK = tensors[f"model.layers.{layer}.ffn.gate.tid2eid"]
            want_G = torch.bincount(table_VK[fed].reshape(-1), minlength=load_LG.shape[1])
            assert load_LG[layer].tolist() == want_G.tolist()
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
    finally:
        llm.engine.shutdown()


def test_dsv4_published_fp4_checkpoint_ep2_matches_transformers(local_ray, tmp_path_factory):
    """V4 as DeepSeek publishes it (FP8 linears with ue8m0 block scales, FP4 experts; tests/helpers/dsv4_published.py)
    at EP 2: each rank reads its own experts' packed bytes, and the tokens equal transformers' on the dequantized
    weights with the W8A8 rounding of the FP8 linears' inputs (fake_quant_dsv4: moelink runs them FP8)."""
    from tests.helpers.dsv4_published import fake_quant_dsv4, write_published_dsv4
    from tests.helpers.fp8_checkpoints import hf_greedy_with

    d = tmp_path_factory.mktemp("dsv4_fp4_ep")
    float_path = save_dsv4_checkpoint(d / "float", moe_intermediate_size=32)
    path, oracle = write_published_dsv4(float_path, d / "published", d / "oracle")
    ps = prompts(VOCAB, seed=5, n=4, hi=150)
    llm = LLM(path, expert_parallel_size=2, dtype="float64", max_num_seqs=4, max_num_batched_tokens=48,
              num_kv_blocks=128, block_size=8)
    try:
        assert_same(engine_greedy(llm, ps, max_new=NEW), hf_greedy_with(fake_quant_dsv4(oracle, (16, 16)), ps, NEW), ps)
    finally:
        llm.engine.shutdown()
