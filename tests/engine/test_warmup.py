"""Start-up warm-up (engine/rank/warmup.py, engine/rank/warmup_plan.py, kernels/moe_variants.py).

What it must leave as it found it, on CPU: the KV caches bit for bit (it writes slot -1 only and reads the null
block), the expert-load counters (zero), the request states, and the default random generators, so that an
engine that warmed up generates the tokens of one that did not (greedy, seeded and unseeded alike). The full
plan (what the Triton kernels get) runs here on the reference kernels, in the middle of a generation.

What it plans, without a device: the fused-MoE variants for every token count up to the bound are exactly the
ones the kernels' own selector picks (checked at every token count), and the synthetic steps fit the limits
and reach each class of shape the kernels specialise on.
"""
from __future__ import annotations

import argparse
import logging

import pytest
import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.api.cli_args import add_engine_args, engine_args_from
from moelink.engine.rank.warmup import WarmupConfig, warm_up
from moelink.engine.rank.warmup_plan import (CHUNKED, DECODE, MIXED, PREFILL, StepLimits, minimal_plan, plan_steps,
                                        token_sweep)

from tests.helpers.gpt_oss_checkpoints import save_gpt_oss

KW = dict(dtype="float32", device="cpu", max_num_seqs=4, max_num_batched_tokens=32, num_kv_blocks=96, block_size=16)
PARAMS = [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
          SamplingParams(temperature=0.9, top_k=20, seed=7, max_tokens=6, ignore_eos=True),
          SamplingParams(temperature=1.1, top_p=0.9, max_tokens=6, ignore_eos=True)]  # unseeded: the default RNG
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42], list(range(100, 140))]  # the last one spans two chunks of 32


@pytest.fixture(scope="module")
def models(tiny_model, hf_tiny_model, tmp_path_factory):
    """GQA (one table), MLA (latent cache) and gpt-oss (a sliding layer paired with a full one, sinks)."""
    gpt_oss = save_gpt_oss(tmp_path_factory.mktemp("warmup_gpt_oss"), num_hidden_layers=2)
    # Qwen3's context holds a 1024-token prefix and a chunk: the chunked-prefill steps run too.
    return {"qwen3": tiny_model("qwen3_e6k3", max_position_embeddings=2048), "dsv3": hf_tiny_model("dsv3_neox"),
            "gpt_oss": gpt_oss}


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def _generate(path: str, **kw) -> list[list[int]]:
    torch.manual_seed(1234)  # the unseeded request draws from here: both engines start from the same state
    with LLM(path, **KW, **kw) as llm:
        return _tokens(llm.generate(PROMPTS, PARAMS, use_tqdm=False))


@pytest.mark.parametrize("name", ["qwen3", "dsv3"])
def test_an_engine_that_warmed_up_generates_what_one_that_skipped_it_does(models, name, caplog):
    with caplog.at_level(logging.INFO, logger="moelink.engine"):
        warmed = _generate(models[name])
    assert any(r.getMessage().startswith("warm-up: 1 kernel variants in") for r in caplog.records)
    assert warmed == _generate(models[name], skip_warmup=True)


def _cache_bytes(runner) -> list[torch.Tensor]:
    return [t.view(torch.uint8).clone() for layer in runner.kv_caches for t in layer]


@pytest.mark.parametrize("name", ["qwen3", "dsv3", "gpt_oss"])
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_the_full_warm_up_mid_generation_touches_no_kv_counter_request_or_generator(models, name):
    """The full plan (every phase) on the reference kernels, between two steps of three running requests: the
    caches stay bit-identical (their null block zero), the counters zero, the request states as they were,
    and the rest of the generation is what it is without the warm-up."""
    want = _generate(models[name], skip_warmup=True)
    torch.manual_seed(1234)
    with LLM(models[name], **KW, skip_warmup=True) as llm:
        eng, runner = llm.engine, llm.engine.executor.runner
        for i, (prompt, params) in enumerate(zip(PROMPTS, PARAMS)):
            eng.add_request(str(i), prompt, params)
        outs = {}
        for _ in range(3):
            outs.update({o.request_id: o for o in eng.step() if o.finished})
        # Between two steps with nothing in flight (warm-up runs at start-up, before any step): the overlapped
        # loop's step in flight is collected first, or its KV writes would land during the comparison.
        outs.update({o.request_id: o for o in eng._drain() if o.finished})
        before = _cache_bytes(runner)
        states = {rid: (st.all_token_ids[:], st.num_computed_tokens, st.block_ids[:]) for rid, st in runner.requests.items()}
        assert states and any(b.any() for b in before), "the requests are running and hold KV"
        rng = torch.get_rng_state()
        report = warm_up(runner, WarmupConfig(32, 4, plan="full"))
        chunked = {CHUNKED} if runner.cfg.max_model_len >= 1024 + 16 else set()
        assert {name for name, _, _ in report.phases} == {"moe", PREFILL, DECODE, MIXED, "sampler"} | chunked
        after = _cache_bytes(runner)
        assert all(torch.equal(a, b) for a, b in zip(before, after)), "warm-up wrote into the KV cache"
        assert all(not t[runner.null_block].view(torch.uint8).any() for layer in runner.kv_caches for t in layer)
        assert not runner.model.moe_stats.counts_LG.any() and not runner.model.moe_stats.xfer_LC.any()
        assert states == {rid: (st.all_token_ids, st.num_computed_tokens, st.block_ids)
                          for rid, st in runner.requests.items()}
        assert torch.equal(rng, torch.get_rng_state())
        while eng.has_unfinished_requests():
            outs.update({o.request_id: o for o in eng.step() if o.finished})
    assert [outs[str(i)].outputs[0].token_ids for i in range(len(PROMPTS))] == want


def test_skip_warmup_is_a_flag_of_both_commands():
    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_args_from(p.parse_args(["m", "--skip-warmup"])).skip_warmup is True
    assert engine_args_from(p.parse_args(["m"])).skip_warmup is False


# -- the plan, without a device -------------------------------------------------------------------------------------
H100 = "NVIDIA_H100_80GB_HBM3"


def _check_against_selector(shape, max_tokens: int):
    """Exhaustive: the plan holds exactly the variants the selector gives over [1, max_tokens], each with the
    first token count that reaches it."""
    from moelink.kernels.moe_variants import moe_variant, plan_moe_variants

    plan = plan_moe_variants(shape, max_tokens)
    first: dict = {}
    for t in range(1, max_tokens + 1):
        first.setdefault(moe_variant(shape, t), t)
    assert dict((v, t) for t, v in plan) == first
    assert [t for t, _ in plan] == sorted(first.values())
    return plan


def test_qwen3_30b_a3b_plans_the_tuned_json_buckets_up_to_8192_tokens():
    """Qwen3-30B-A3B (E 128, I 768, D 2048, top-8) on an H100, max_num_batched_tokens 8192: the tuned file's
    buckets are 1, 16, 64, 256, 1024, 4096 and 16384; the nearest one wins, so tokens 1..8192 reach all but
    16384 (nearer from 10241 on). Each is compiled once, whatever the alignment sizes around it."""
    from moelink.kernels.moe_config import config_table
    from moelink.kernels.moe_variants import MoEShape, launch_configs

    shape = MoEShape("float", 128, 768, 2048, 8, H100, 132)
    plan = _check_against_selector(shape, 8192)
    _, buckets = config_table(128, 768, H100)
    assert launch_configs(plan) == [cfg for b, cfg in buckets if b <= 4096]
    # The first token count of each bucket: 1, then one past each midpoint (8.5, 40, 160, 640, 2560).
    firsts = {}
    for t, v in plan:
        firsts.setdefault(v.config, t)
    assert sorted(firsts.values()) == [1, 9, 41, 161, 641, 2561]


@pytest.mark.parametrize("fmt, E, I, D, K, name, max_tokens", [
    ("float", 8, 14336, 4096, 2, H100, 8192),     # Mixtral's tuned file
    ("float", 32, 2048, 7168, 8, H100, 16384),    # DeepSeek-V3, one rank's share at EP 8: default.json, rows/expert
    ("fp8", 256, 2048, 7168, 8, H100, 8192),      # the FP8 defaults, adapted to 128 x 128 weight blocks
    ("mxfp4", 32, 2880, 2880, 4, H100, 4096),     # gpt-oss
    ("nvfp4", 128, 768, 2048, 8, H100, 8192),     # Qwen3-30B-A3B-FP4 (ModelOpt's NVFP4 experts)
    ("nvfp4", 6, 32, 48, 2, "cpu", 64),           # the interpreter's configs (BLOCK_K raised to 32)
    ("fp8", 6, 32, 64, 3, "cpu", 64),             # the interpreter's configs
])
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_the_moe_plan_is_every_variant_the_selector_picks(fmt, E, I, D, K, name, max_tokens):
    from moelink.kernels.moe_variants import MoEShape

    block = {"fp8_block_k": 16} if name == "cpu" and fmt == "fp8" else {}
    _check_against_selector(MoEShape(fmt, E, I, D, K, name, 132 if name != "cpu" else 4, **block), max_tokens)


def test_the_moe_plan_follows_the_tiny_path_and_its_narrowed_down_gemv(tmp_path):
    """A tuned file with TINY entries (none ships yet): tiny batches take the two-GEMV path (its down BLOCK_N
    narrowed by the token count), larger ones the sorted path of the same bucket."""
    from moelink.kernels.moe_config import MoELaunchConfig, TinyConfig, write_config_file
    from moelink.kernels.moe_variants import MoEShape

    base = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=64, BLOCK_SIZE_K=64, GROUP_SIZE_M=1, num_warps=4, num_stages=3)
    tiny = dict(max_pairs=64, BLOCK_SIZE_N=16, BLOCK_SIZE_K=256, num_warps=4, num_stages=2,
                down=dict(BLOCK_SIZE_N=64, BLOCK_SIZE_K=128, num_warps=4, num_stages=2))
    write_config_file(tmp_path / f"E=128,N=768,device_name={H100}.json", {
        1: MoELaunchConfig.from_dict(dict(base, TINY=tiny)), 64: MoELaunchConfig.from_dict(dict(base, TINY=dict(tiny, max_pairs=128))),
        1024: MoELaunchConfig.from_dict(dict(base, BLOCK_SIZE_M=64))})
    plan = _check_against_selector(MoEShape("float", 128, 768, 2048, 8, H100, 132, config_dir=str(tmp_path)), 4096)
    assert {v.path for _, v in plan} == {"tiny", "sorted"}
    assert len({v.down_block_n for _, v in plan if v.path == "tiny"}) > 1
    assert any(isinstance(v.config, TinyConfig) for _, v in plan)


def test_the_mxfp4_plan_holds_its_three_paths():
    """gpt-oss-120b (E 128, top-4) on an H100 from mxfp4_moe_default.json: the two GEMVs below 2 rows per
    expert (63 tokens; the down GEMV's BLOCK_N narrowed at 1 token), the per-tile sorted path, and from 81 rows per expert
    (2,592 tokens: the plan's first size past it is 4096) the dequantize-once path, whose GEMMs take the float table's
    config (default.json here)."""
    from moelink.kernels.moe_config import lookup_moe_config
    from moelink.kernels.moe_variants import MoEShape

    plan = _check_against_selector(MoEShape("mxfp4", 128, 2880, 2880, 4, H100, 132), 16384)
    first = {}
    for t, v in plan:
        first.setdefault(v.path, t)
    assert first == {"tiny": 1, "sorted": 64, "dequant": 4096}
    assert {v.down_block_n for _, v in plan if v.path == "tiny"} == {8, 16}
    for t, v in plan:
        if v.path == "dequant":
            assert v.config == lookup_moe_config(128, 2880, t, 4, H100)


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


@pytest.mark.parametrize("B, S, L, graph_max", [(8192, 256, 32768, 256), (8192, 512, 4096, 128), (100, 16, 64, 8),
                                                (32, 4, 1024, 0), (16384, 1024, 131072, 0)])
def test_the_steps_fit_the_limits_and_reach_every_class_of_shape(B, S, L, graph_max):
    bs = 16
    steps = plan_steps(StepLimits(B, S, L, bs, graph_max=graph_max))
    for step in steps:
        assert step.num_tokens <= B and step.num_seqs <= S
        assert all(s.cached + s.new <= L and s.new >= 1 for s in step.seqs)
    # Every prefill token count shares next_power_of_2 and "% 16 == 0" with a planned prefill.
    swept = {(_pow2(t), t % 16 == 0) for t in token_sweep(B)}
    assert all((_pow2(t), t % 16 == 0) in swept for t in range(2, B + 1))
    prefills = {st.num_tokens for st in steps if st.phase == PREFILL}
    assert set(token_sweep(B)) <= prefills
    # Decode: the sizes no graph covers (capture ran the others), the largest and the first of them among them.
    decodes = {st.num_seqs for st in steps if st.phase == DECODE}
    eager = [n for n in range(1, min(S, B) + 1) if n > graph_max]
    assert decodes <= set(eager) and (not eager or {eager[0], eager[-1]} <= decodes)
    assert {st.phase for st in steps} >= {PREFILL, MIXED}
    assert any(st.phase == CHUNKED for st in steps) == (L >= 1024 + 16)
    prefill_seqs = {st.num_seqs for st in steps if st.phase == PREFILL}
    assert {1, 3, 16} & set(range(1, S + 1)) <= prefill_seqs
    # Every attention path meets block tables 1, 3 and 16 blocks wide (as many as the context allows).
    widths = {w for w in (1, 3, 16) if (w - 1) * bs < L}
    for phase in (PREFILL, DECODE, MIXED):
        seen = {max(-(-(s.cached + s.new) // bs) for s in st.seqs) for st in steps if st.phase == phase}
        assert not seen or widths <= seen, phase


def test_the_minimal_plan_is_one_small_step_within_any_limits():
    for B, S, L in [(8192, 256, 4096), (1, 1, 1), (2, 1, 8), (5, 2, 2)]:
        (step,) = minimal_plan(StepLimits(B, S, L))
        assert step.num_tokens <= B and step.num_seqs <= S and all(s.cached + s.new <= L for s in step.seqs)
    assert minimal_plan(StepLimits(8192, 256, 4096))[0].phase == MIXED
