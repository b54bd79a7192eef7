"""DeepSeek-V4 under tensor parallelism (docs/tensor-parallelism.md): each rank holds half the heads (their wq_b rows
and sinks) and half the output groups (wo_a's rows, wo_b's columns: one all-reduce per layer); the shared KV head,
the compressors, the indexer and the window ring whole on each rank; the hyper-connections replicated; the embedding
and head vocab-parallel; the MoE block with every expert's channels split (`-tp 2`) or in EP on token slices
(`-tp 2 -ep 2`, the hash-routed layers routing their slice's token ids).

On Ray (CPU ranks, gloo, float64), greedy tokens equal transformers' V4 on the tiny checkpoint it saved (which one
rank's equal too: tests/engine/test_dsv4.py), for the float checkpoint at -tp 2 and -tp 2 -ep 2 (with two-batch
overlap; every routed pair counted once in both), and for DeepSeek's
published format (tests/helpers/dsv4_published.py: FP8 linears held FP8 and run W8A8, against transformers on the
dequantized weights with the activation rounding) with FP8 experts split at -tp 2 and FP4 experts in EP at -tp 2 -ep 2.
Blocks of 16 x 8: wo_a's groups of 8 rows start mid-block on rank 1 (its scale rows held finer), wo_b's 8 columns per
rank a whole block. In one process: each rank reads exactly its shard of every split tensor, and the refusals.
MTP drafting (DeepSeek-V4's own MTP module) at -tp 2 -ep 2 equals transformers' tokens with drafts accepted and
rejected. One engine start per configuration; prompts of up to 60 tokens pass the compress boundaries and the
indexer's top-k.
"""
from __future__ import annotations

import pytest
import torch

from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig
from moelink.engine.config.tensor_parallel import check_tensor_parallel
from moelink.engine.models.registry import MoEDecoderForCausalLM, arch_spec
from moelink.engine.rank.loader import load_plan, open_checkpoint
from moelink.kernels.ops import ReferenceKernels

from tests.helpers.dsv4_checkpoint import VOCAB, save_dsv4_checkpoint
from tests.helpers.dsv4_mtp_checkpoint import bigram_dsv4_mtp, save_dsv4_with_mtp
from tests.helpers.dsv4_published import fake_quant_dsv4, write_published_dsv4
from tests.helpers.fp8_checkpoints import hf_greedy_with
from tests.helpers.parity import assert_same, engine_greedy, hf_greedy, prompts
from tests.helpers.tp_load import LoadOnlyTP, file_bytes

CPU = torch.device("cpu")
NEW = 4
BLOCK = (16, 8)
KW = dict(dtype="float64", max_num_seqs=4, max_num_batched_tokens=32, num_kv_blocks=96, block_size=8)


@pytest.fixture(scope="module")
def float_path(tmp_path_factory) -> str:
    # moe_intermediate_size 32: FP4 experts need K a multiple of 32, and a rank's 16 channels are whole FP8 blocks.
    return save_dsv4_checkpoint(tmp_path_factory.mktemp("dsv4_tp"), moe_intermediate_size=32)


def _published(float_path: str, d, expert_dtype: str) -> tuple[str, str]:
    return write_published_dsv4(float_path, d / "published", d / "oracle", block=BLOCK, expert_dtype=expert_dtype)


def _run(path: str, ps, tp: int, ep: int, new: int = NEW, check=None, **kw) -> list[list[int]]:
    """One engine start: greedy tokens of `ps`, every block back after; `check(llm)` before it stops."""
    llm = LLM(path, tensor_parallel_size=tp, expert_parallel_size=ep, **KW, **kw)
    try:
        got = engine_greedy(llm, ps, max_new=new)
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
        if check is not None:
            check(llm)
        return got
    finally:
        llm.engine.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("ep", [1, 2])
def test_dsv4_tp_matches_transformers(local_ray, float_path, ep):
    """At -tp 2 -ep 2 with two-batch overlap too: each micro-batch's token slices (and their ids) through the EP
    all-to-all, in the same order on both ranks (the published run below is -tp 2 -ep 2 without it)."""
    ps = prompts(VOCAB, seed=3, n=3, lo=1, hi=60)

    def counted_once(llm) -> None:  # every routed (token, expert) pair once: top-2 in 4 MoE layers (2 hash-routed)
        assert llm.engine.moe_metrics.total_routed() == sum(len(p) + NEW - 1 for p in ps) * 2 * 4

    got = _run(float_path, ps, 2, ep, check=counted_once, enable_two_batch_overlap=ep > 1)
    assert_same(got, hf_greedy(float_path, ps, max_new=NEW), ps)


@pytest.mark.slow
def test_dsv4_mtp_drafts_under_tp_equal_transformers(local_ray, tmp_path):
    """At -tp 2 -ep 2: the MTP block's heads split like a main layer's, its experts in EP on token slices, its window
    cache whole, its draft logits all-gathered: drafts accepted and rejected, tokens transformers'. (Its split-experts
    way is the main layers' code: the runs above.)"""
    path = bigram_dsv4_mtp(save_dsv4_with_mtp(tmp_path / "random", moe_intermediate_size=32), tmp_path / "bigram")[0]
    ps = prompts(VOCAB, seed=13, n=3, lo=1, hi=60)

    def accepted_some(llm) -> None:
        sd = llm.engine.stats().spec_decode
        assert 0.2 < sd.acceptance_rate < 1.0, sd

    got = _run(path, ps, 2, 2, new=6, check=accepted_some,
               speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    assert_same(got, hf_greedy(path, ps, max_new=6), ps)


@pytest.mark.slow
@pytest.mark.parametrize("expert_dtype,ep", [("fp8", 1), ("fp4", 2)])
def test_dsv4_published_tp_matches_transformers(local_ray, float_path, tmp_path, expert_dtype, ep):
    """FP8 experts split by channel (their slices and scale blocks dequantized at load) at -tp 2; FP4 experts,
    packed, placed whole by EP at -tp 2 -ep 2."""
    path, oracle = _published(float_path, tmp_path, expert_dtype)
    ps = prompts(VOCAB, seed=7, n=3, lo=1, hi=60)
    assert_same(_run(path, ps, 2, ep), hf_greedy_with(fake_quant_dsv4(oracle, BLOCK), ps, NEW), ps)


def _rank_reads(path: str, rank: int, ep=None) -> dict[str, int]:
    cfg = ModelConfig.from_pretrained(path, "float64")
    checkpoint = open_checkpoint(cfg, "auto", CPU)
    names = frozenset(checkpoint.keys())
    model = MoEDecoderForCausalLM(cfg, arch_spec(cfg.architecture), ReferenceKernels(), CPU, ep, names,
                                  tp=LoadOnlyTP(rank, 2))
    got: dict[str, int] = {}
    load_plan(checkpoint, model.weight_plan(names), CPU, read_bytes=got)
    return got


# Whole on every rank: the shared KV head (wkv, its norm), the q LoRA's first half (wq_a, q_norm), the compressors,
# the indexer, the hyper-connections, the norms, the router (its gate, hash table and correction bias).
WHOLE = (".wq_a.", ".q_norm.", ".wkv.", ".attn.norm.", ".compressor.", ".indexer.", ".hc_", "norm.weight", "hc_head",
         ".gate.")


@pytest.mark.parametrize("fmt", ["float", "fp8"])
def test_each_rank_reads_its_shard(float_path, tmp_path, fmt):
    """Split tensors (wq_b, wo_a, wo_b, the sinks, the experts' and shared expert's channels, embedding, head; FP8
    ones with their scale blocks) are read half by each rank, the rest whole by both; wo_a's scales by both whole
    here (its 2 groups of 8 rows share one file block row of 16)."""
    path = float_path if fmt == "float" else _published(float_path, tmp_path, "fp8")[0]
    full = file_bytes(path)
    reads = [_rank_reads(path, rank) for rank in range(2)]
    assert set(reads[0]) == set(reads[1]) == set(full)
    for name, size in full.items():
        whole = any(w in name for w in WHOLE) or name.endswith("wo_a.scale")
        want = (size, size) if whole else (size // 2, size // 2)
        assert (reads[0][name], reads[1][name]) == want, name


def test_refusals(float_path):
    cfg = ModelConfig.from_pretrained(float_path, "float64")
    with pytest.raises(ValueError, match="num_attention_heads=4 is not a multiple of 8"):
        check_tensor_parallel(cfg, 8)
    with pytest.raises(ValueError, match="o_groups=2 is not a multiple of 4"):
        check_tensor_parallel(cfg, 4)
    check_tensor_parallel(cfg, 2, experts_split=True)


def test_published_refusals(float_path, tmp_path):
    fp4 = ModelConfig.from_pretrained(_published(float_path, tmp_path / "fp4", "fp4")[0], "float64")
    with pytest.raises(ValueError, match="expert_dtype='fp4' experts split.*--expert-parallel-size 2"):
        check_tensor_parallel(fp4, 2, experts_split=True)
    check_tensor_parallel(fp4, 2)  # FP4 experts placed whole by EP
    d = tmp_path / "fp8"
    wide = write_published_dsv4(float_path, d / "published", d / "oracle", block=(16, 16), expert_dtype="fp8")[0]
    with pytest.raises(ValueError, match=r"wo_b columns per rank \(8.*weight_block_size"):
        check_tensor_parallel(ModelConfig.from_pretrained(wide, "float64"), 2)
