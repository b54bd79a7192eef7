"""Step plans (engine/rank/step_plan.py): the micro-batch split, the interleaving order, and two-batch overlap giving
the same hidden states, KV cache and greedy tokens as one batch (one rank, in-process: every stage runs, the
all-to-all is the only thing absent; EP 2 on Ray is tests/ep/test_ep_overlap.py)."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from moelink.engine import LLM, EngineArgs, SamplingParams
from moelink.engine.config.parallel import ParallelConfig
from moelink.engine.rank.step_plan import (SingleBatch, TwoBatchOverlap, make_step_plan, run_interleaved,
                                      split_sequences)
from moelink.kernels.attention import AttentionMetadata

from tests.helpers.tiny_configs import TINY_CONFIGS


def _brute_force_split(query_lens):
    """Every cut, scored by token imbalance; ties to the larger first micro-batch."""
    total = sum(query_lens)
    return min(range(len(query_lens) + 1), key=lambda s: (abs(total - 2 * sum(query_lens[:s])), -s))


@pytest.mark.parametrize("query_lens, want", [
    ([], 0), ([7], 1), ([1, 1], 1), ([5, 1], 1), ([1, 5], 1), ([3, 1, 1, 1], 1), ([1, 1, 1, 3], 3),
    ([1, 2, 1], 2),  # 1 | 3 and 3 | 1 tie: the first takes more
    ([100, 1, 1, 1, 1], 1), ([2, 2, 2, 2], 2), ([1] * 7, 4),
])
def test_split_is_balanced_ordered_and_stable(query_lens, want):
    assert split_sequences(query_lens) == want


def test_split_matches_brute_force_on_random_batches():
    rng = random.Random(0)
    for _ in range(300):
        lens = [rng.choice([1, 1, 1, rng.randint(1, 64)]) for _ in range(rng.randint(0, 9))]
        s = split_sequences(lens)
        assert s == _brute_force_split(lens), lens
        assert split_sequences(list(lens)) == s  # stable: same input, same cut


def test_interleaving_advances_each_micro_batch_one_stage_in_turn():
    log = []

    def mb(name, n):
        for i in range(n):
            log.append((name, i))
            yield
        log.append((name, "end"))
        return name

    assert run_interleaved([mb("a", 2), mb("b", 2)]) == ["a", "b"]
    assert log == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", "end"), ("b", "end")]


def test_plan_choice_and_validation():
    assert isinstance(make_step_plan(True, 2), TwoBatchOverlap)
    assert isinstance(make_step_plan(True, 1), SingleBatch)  # nothing to overlap at one rank
    assert isinstance(make_step_plan(False, 4), SingleBatch)
    with pytest.raises(ValueError, match=r"enable_two_batch_overlap='yes' is invalid: must be True or False"):
        ParallelConfig(enable_two_batch_overlap="yes")


def test_flag_reaches_the_workers_only_with_expert_parallelism(tiny_model):
    path = tiny_model("qwen3_e6k3")
    one = EngineArgs(model=path, enable_two_batch_overlap=True, num_kv_blocks=8).create_engine_config()
    assert one.parallel.enable_two_batch_overlap and not one.worker_config().two_batch_overlap
    two = EngineArgs(model=path, enable_two_batch_overlap=True, num_kv_blocks=8, expert_parallel_size=2)
    assert two.create_engine_config().worker_config().two_batch_overlap


def test_cli_flag():
    import argparse

    from moelink.engine.api.cli_args import add_engine_args, engine_args_from

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_args_from(parser.parse_args(["m", "--enable-two-batch-overlap"])).enable_two_batch_overlap
    assert not engine_args_from(parser.parse_args(["m"])).enable_two_batch_overlap


def test_attention_metadata_select():
    qlens, slens = [3, 1, 2], [5, 9, 2]
    meta = AttentionMetadata(
        query_start_loc_S1=torch.tensor([0, 3, 4, 6], dtype=torch.int32), seq_lens_S=torch.tensor(slens),
        block_tables_SM=torch.arange(6).view(3, 2), slot_mapping_T=torch.arange(10, 16),
        query_lens=qlens, seq_lens=slens, max_query_len=3, max_seq_len=9, null_block=99)
    part = meta.select(1, 3)
    assert part.query_start_loc_S1.tolist() == [0, 1, 3] and part.query_start_loc_S1.dtype == torch.int32
    assert part.seq_lens_S.tolist() == [9, 2] and part.block_tables_SM.tolist() == [[2, 3], [4, 5]]
    assert part.slot_mapping_T.tolist() == [13, 14, 15]
    assert (part.query_lens, part.seq_lens, part.max_query_len, part.max_seq_len) == ([1, 2], [9, 2], 2, 9)
    assert part.null_block == 99
    with pytest.raises(ValueError, match="select"):
        meta.select(2, 2)


def _runner(llm):
    return llm.engine.executor.worker.runner


@pytest.fixture(scope="module")
def gpt_oss_paired(tmp_path_factory):
    from tests.helpers.gpt_oss_checkpoints import save_gpt_oss

    return save_gpt_oss(tmp_path_factory.mktemp("gpt_oss_tbo"), num_hidden_layers=2)


def _model(name, tiny_model, hf_tiny_model, gpt_oss_paired):
    if name in TINY_CONFIGS:
        return tiny_model(name), TINY_CONFIGS[name]["vocab_size"]
    if name == "gpt_oss_paired":  # a sliding layer on its own block table (ForwardContext.attn_sliding)
        from tests.helpers.gpt_oss_checkpoints import VOCAB

        return gpt_oss_paired, VOCAB
    from tests.helpers.hf_checkpoints import hf_config

    return hf_tiny_model(name), hf_config(name).vocab_size  # DeepSeek-V3: MLA, shared experts, a dense layer


@pytest.mark.parametrize("name", ["qwen3_e8k2_dense1", "mixtral_e5k3", "dsv3_lora", "gpt_oss_paired"])
def test_two_batch_overlap_same_as_one_batch_in_process(tiny_model, hf_tiny_model, gpt_oss_paired, name):
    """Prefill, chunked prefill (budget 24 < prompt lengths), decode and steps with one sequence (an empty
    micro-batch): greedy tokens, logprobs and the KV cache equal one batch's."""
    path, vocab = _model(name, tiny_model, hf_tiny_model, gpt_oss_paired)
    rng = random.Random(1)
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (1, 40, 7, 19, 3)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, logprobs=2) for m in (3, 9, 5, 6, 12)]
    kw = dict(dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=8)
    results, caches = [], []
    for plan in (SingleBatch(), TwoBatchOverlap()):
        llm = LLM(path, **kw)
        try:
            runner = _runner(llm)
            runner.step_plan = plan
            calls = []
            forward = plan.forward
            plan.forward = lambda *a, _f=forward: calls.append(a[3].attn.num_seqs) or _f(*a)
            outs = llm.generate(prompts, params, use_tqdm=False)
            results.append([(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs])
            caches.append([t.clone() for t in itertools.chain.from_iterable(runner.kv_caches)])
            if isinstance(plan, TwoBatchOverlap):  # the runs covered both kinds of step
                assert 1 in calls and max(calls) >= 3
        finally:
            llm.engine.shutdown()
    assert [toks for toks, _ in results[0]] == [toks for toks, _ in results[1]]
    for (_, lps_a), (_, lps_b) in zip(*results):
        for a, b in zip(lps_a, lps_b):
            # The sampler's logprobs are float32: hidden states that differ in the last float64 bits may round to
            # a neighbouring float32 (the greedy tokens above are exact).
            assert a.keys() == b.keys() and all(a[t].rank == b[t].rank for t in a)
            assert all(abs(a[t].logprob - b[t].logprob) < 1e-5 for t in a)
    # The same slots written with the same values, up to rounding: a matmul over fewer rows may take another BLAS
    # path. float64 throughout, except DeepSeek's router gate, which runs in float32 as transformers runs it: a
    # last-bit change of a float32 gate logit moves the next layers' values by ~1e-7.
    tol = 1e-6 if name.startswith("dsv3") else 1e-12
    for a, b in zip(*caches):
        assert torch.equal(a != 0, b != 0)
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_elastic_ep_flag_is_validated_and_reaches_the_config(tiny_model):
    from moelink.engine.api.cli_args import engine_args_from
    from moelink.engine.api.cli import build_parser

    with pytest.raises(ValueError, match=r"elastic_ep='yes' is invalid: must be True or False"):
        ParallelConfig(elastic_ep="yes")
    path = tiny_model("qwen3_e6k3")
    assert EngineArgs(model=path, num_kv_blocks=8).create_engine_config().parallel.elastic_ep  # on by default
    assert not EngineArgs(model=path, num_kv_blocks=8, elastic_ep=False).create_engine_config().parallel.elastic_ep
    assert engine_args_from(build_parser().parse_args(["generate", path, "--prompt", "hi"])).elastic_ep
    ns = build_parser().parse_args(["generate", path, "--prompt", "hi", "--no-elastic-ep"])
    assert not engine_args_from(ns).elastic_ep
