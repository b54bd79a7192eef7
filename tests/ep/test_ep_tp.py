"""Tensor parallelism on Ray (CPU ranks, gloo): greedy tokens equal one rank's (Qwen3-MoE; Mixtral, whose single kv
head is replicated) or transformers' in float64 (DeepSeek-V3's MLA, gpt-oss's sinks and biases) at
- TP 2 (`-tp 2`, world 2): the experts split by intermediate size over the group (one all-reduce per MoE block);
- TP 2 x EP 2 (`-tp 2 -ep 2`, world 2): experts in EP, each TP rank dispatching its half of the tokens;
- TP 2 with DP attention (`-tp 2 -ep 4`, world 4: two TP groups, two schedulers, EP 4);
and gpt-oss as published (MXFP4 experts, placed whole by EP) at `-tp 2 -ep 2`.
Lean: a few short prompts each (4 of 1-30 tokens under a 24-token budget: a chunked prefill and a ragged batch), 4 new
tokens each (batched decode steps, each sequence crossing a 4-token block boundary while it decodes); and the longest
prompt's prompt logprobs (SamplingParams.prompt_logprobs: the TP group's all-gathered logits) equal one rank's."""
from __future__ import annotations

from pathlib import Path

import pytest

from moelink.engine import LLM, SamplingParams

from tests.helpers import hf_checkpoints
from tests.helpers.fp8_checkpoints import hf_greedy_with
from tests.helpers.gpt_oss_checkpoints import VOCAB as GPT_OSS_VOCAB, save_gpt_oss
from tests.helpers.net import free_port
from tests.helpers.parity import assert_same, engine_greedy, hf_greedy, prompts
from tests.helpers.tiny_configs import TINY_CONFIGS

pytestmark = pytest.mark.slow

KW = dict(dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=4)
NEW = 4  # new tokens per prompt
_ONE_RANK: dict[str, list[list[int]]] = {}  # model path -> one rank's greedy tokens of its prompts
_ONE_RANK_PLP: dict[str, list] = {}  # model path -> one rank's prompt logprobs of its longest prompt
PLP = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=2)


def _prompt_logprobs(llm, prompt):
    """[(token, logprob, rank, top-2 ids)] per prompt position after the first (RequestOutput.prompt_logprobs)."""
    got = llm.generate([prompt], PLP, use_tqdm=False)[0].prompt_logprobs
    return [(t, got[i][t].logprob, got[i][t].rank, sorted(got[i], key=lambda k: got[i][k].rank)[:2])
            for i, t in enumerate(prompt) if i]


def _greedy(llm, ps):
    return engine_greedy(llm, ps, max_new=NEW)


def _hf(path, ps):
    return hf_greedy(path, ps, max_new=NEW)


@pytest.fixture(scope="module")
def gpt_oss_path(tmp_path_factory):
    """One gpt-oss checkpoint for the module (sinks, q/k/v and o biases, sliding layers, expert biases): its
    transformers reference is computed once (tests.helpers.parity caches it per path) for both compositions."""
    return save_gpt_oss(tmp_path_factory.mktemp("gpt_oss_tp"), num_hidden_layers=3)


# Qwen3 (4 q heads, 2 kv heads: one each) in the three compositions; Mixtral's one kv head on both ranks.
@pytest.mark.parametrize("name,tp,ep", [("qwen3_e6k3", 2, 1), ("qwen3_e6k3", 2, 2), ("qwen3_e6k3", 2, 4),
                                        ("mixtral_e5k3", 2, 1)])
def test_tp_matches_single_rank(local_ray, tiny_model, name, tp, ep):
    path = tiny_model(name)
    ps = prompts(TINY_CONFIGS[name]["vocab_size"], seed=len(name), n=4, lo=1, hi=30)
    longest = max(ps, key=len)  # its prompt logprobs over two chunks of the 24-token budget
    if path not in _ONE_RANK:  # one single-rank reference per model, shared by its compositions
        one = LLM(path, **KW)
        _ONE_RANK[path], _ONE_RANK_PLP[path] = _greedy(one, ps), _prompt_logprobs(one, longest)
    want = _ONE_RANK[path]
    llm = LLM(path, tensor_parallel_size=tp, expert_parallel_size=ep, **KW)
    try:
        assert len(llm.engine.schedulers) == max(ep, tp) // tp  # one scheduler per TP group (DP attention)
        assert_same(_greedy(llm, ps), want, ps)
        got_plp, want_plp = _prompt_logprobs(llm, longest), _ONE_RANK_PLP[path]
        assert [(t, r, top) for t, _, r, top in got_plp] == [(t, r, top) for t, _, r, top in want_plp]
        assert [lp for _, lp, _, _ in got_plp] == pytest.approx([lp for _, lp, _, _ in want_plp], abs=1e-6)
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
        # Every routed (token, expert) pair counted once: the TP ranks' slices merged, or (experts split) one
        # rank's count for its group.
        cfg = TINY_CONFIGS[name]
        computed = sum(len(p) + NEW - 1 for p in ps) + len(longest) + 1  # and the prompt logprobs request's
        assert llm.engine.moe_metrics.total_routed() == computed * cfg["top_k"] * cfg["num_layers"]
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_tp_deepseek_v3_matches_transformers(local_ray, hf_tiny_model, ep):
    path = hf_tiny_model("dsv3_lora")  # MLA with q LoRA, interleaved rope, a dense layer, shared experts
    ps = prompts(hf_checkpoints.VOCAB, seed=5, n=4, lo=1, hi=30)
    llm = LLM(path, tensor_parallel_size=2, expert_parallel_size=ep, **KW)
    try:
        assert_same(_greedy(llm, ps), _hf(path, ps), ps)
    finally:
        llm.engine.shutdown()


# GLM-4-MoE: q/k/v biases cut with their rows, per-head q/k norm, shared experts split with the routed ones.
def test_tp_glm_matches_transformers(local_ray, hf_tiny_model):
    path = hf_tiny_model("glm_bias")
    ps = prompts(hf_checkpoints.VOCAB, seed=9, n=3, lo=1, hi=24)
    llm = LLM(path, tensor_parallel_size=2, **KW)
    try:
        assert_same(_greedy(llm, ps), _hf(path, ps), ps)
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("ep", [1, 4])
def test_tp_gpt_oss_matches_transformers(local_ray, gpt_oss_path, ep):
    path = gpt_oss_path
    ps = prompts(GPT_OSS_VOCAB, seed=7, n=4, lo=1, hi=30)
    llm = LLM(path, tensor_parallel_size=2, expert_parallel_size=ep, **KW)
    try:
        assert_same(_greedy(llm, ps), _hf(path, ps), ps)
    finally:
        llm.engine.shutdown()


def test_tp2_ep2_gpt_oss_mxfp4_matches_transformers(local_ray, tmp_path):
    """gpt-oss as OpenAI publishes it (MXFP4 experts, float attention with sinks and biases, sliding layers) at
    `-tp 2 -ep 2`: the attention's heads split over the TP group, each rank's experts read whole (blocks and scales)
    by EP, each TP rank dispatching its half of the tokens; greedy tokens equal transformers' own MXFP4 loader's
    (dequantized, float64)."""
    import torch
    import transformers

    from moelink.engine.tools.mxfp4_checkpoint import quantize_mxfp4_checkpoint

    path = str(quantize_mxfp4_checkpoint(save_gpt_oss(tmp_path / "float", num_hidden_layers=4, intermediate_size=32),
                                         tmp_path / "mxfp4"))
    ps = prompts(GPT_OSS_VOCAB, seed=9, n=4, lo=1, hi=30)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float64, experts_implementation="eager",
        quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()
    want = hf_greedy_with(hf, ps, NEW)
    llm = LLM(path, tensor_parallel_size=2, expert_parallel_size=2, **KW)
    try:
        assert_same(_greedy(llm, ps), want, ps)
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
    finally:
        llm.engine.shutdown()


# FP8 block-scaled linears sharded with their block scales (blocks of 8: every shard falls on a block boundary),
# the FP8 experts in EP 2: one rank's tokens on the same checkpoint.
# (DeepSeek-V3's FP8 shards, q_b / kv_b by head and o_proj by column, are checked by tests/engine/test_tp_shards.py's
# bytes and its float parity above; Qwen3 here, its FP8 experts in EP 2 or split by TP with their block scales.)
@pytest.mark.parametrize("ep", [1, 2])
def test_tp_fp8_matches_single_rank(local_ray, fp8_tiny, ep):
    _, dst, _ = fp8_tiny("qwen3_fp8", block=(8, 8))
    ps = prompts(400, seed=3, n=4, lo=1, hi=30)
    if dst not in _ONE_RANK:
        _ONE_RANK[dst] = _greedy(LLM(dst, **KW), ps)
    want = _ONE_RANK[dst]
    llm = LLM(dst, tensor_parallel_size=2, expert_parallel_size=ep, **KW)
    try:
        assert_same(_greedy(llm, ps), want, ps)
    finally:
        llm.engine.shutdown()


def test_tp_latency_cpu_smoke(local_ray):
    """benchmarks/tp_latency.py end to end on CPU ranks (a multi-GPU node's step; here only that it runs)."""
    from moelink.benchmarks import tp_latency

    rows = tp_latency.main(["--cpu-smoke"])["rows"]
    assert [r["tp"] for r in rows] == [2] and rows[0]["decode_step_ms"] > 0


@pytest.mark.parametrize("tp,ep", [(2, 2), (2, 4)])
def test_tp_with_two_batch_overlap_matches_single_rank(local_ray, tiny_model, tp, ep):
    """Two-batch overlap under TP: every rank of a TP group splits the step into the same two micro-batches (they run
    the same SchedulerOutput), so the TP collectives of one micro-batch and the EP all-to-all of the other pair up in
    the same order on every rank; the tokens are one rank's."""
    name = "qwen3_e6k3"
    path = tiny_model(name)
    ps = prompts(TINY_CONFIGS[name]["vocab_size"], seed=len(name), n=4, lo=1, hi=30)
    if path not in _ONE_RANK:
        _ONE_RANK[path] = _greedy(LLM(path, **KW), ps)
    llm = LLM(path, tensor_parallel_size=tp, expert_parallel_size=ep, enable_two_batch_overlap=True, **KW)
    try:
        assert_same(_greedy(llm, ps), _ONE_RANK[path], ps)
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("tp,ep", [(1, 2), (2, 1)])
def test_routed_experts_equal_one_rank(local_ray, tiny_model, tp, ep):
    """SamplingParams.return_routed_experts (enable_return_routed_experts) at EP 2 (each rank routes its own
    requests' tokens) and TP 2 with the experts split by TP (every rank routes every token): the same ids as one
    rank's, every forwarded position of each request."""
    path = tiny_model("qwen3_e6k3")
    ps = prompts(TINY_CONFIGS["qwen3_e6k3"]["vocab_size"], seed=61, n=4, lo=1, hi=30)
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, return_routed_experts=True)
    want = [o.outputs[0].routed_experts for o in LLM(path, enable_return_routed_experts=True, **KW).generate(
        ps, params, use_tqdm=False)]
    llm = LLM(path, tensor_parallel_size=tp, expert_parallel_size=ep, enable_return_routed_experts=True, **KW)
    try:
        got = [o.outputs[0].routed_experts for o in llm.generate(ps, params, use_tqdm=False)]
        for p, g, w in zip(ps, got, want):
            assert g.shape == (len(p) + NEW - 1, *w.shape[1:]) and (g == w).all()
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("tp,ep", [(1, 2), (2, 1)])
def test_weight_updates_reach_every_rank(local_ray, tiny_model, tmp_path, tp, ep):
    """update_weights_from_disk at EP 2 (each rank its own experts) and TP 2 (each rank its shard): greedy tokens
    equal transformers' on the new checkpoint; then update_weights_from_tensor of two experts (one on each EP rank)
    equals one rank given the same tensors."""
    from safetensors.torch import load_file

    from moelink.engine.tools.tiny_model import make_tiny_model

    a = tiny_model("qwen3_e6k3")
    b = str(make_tiny_model(tmp_path / "b", **{**TINY_CONFIGS["qwen3_e6k3"], "seed": 1}))
    ps = prompts(TINY_CONFIGS["qwen3_e6k3"]["vocab_size"], seed=67, n=4, lo=1, hi=30)
    names = ("model.layers.0.mlp.experts.0.down_proj.weight", "model.layers.1.mlp.experts.5.up_proj.weight")
    back = {k: v for f in sorted(Path(a).glob("*.safetensors")) for k, v in load_file(f).items() if k in names}
    one = LLM(b, enable_weight_updates=True, **KW)
    one.update_weights_from_tensor(list(back.items()))
    want = _greedy(one, ps)
    llm = LLM(a, tensor_parallel_size=tp, expert_parallel_size=ep, enable_weight_updates=True, **KW)
    try:
        llm.update_weights_from_disk(b)
        assert_same(_greedy(llm, ps), _hf(b, ps), ps)
        llm.update_weights_from_tensor(list(back.items()))
        assert_same(_greedy(llm, ps), want, ps)
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("tp,ep", [(1, 2), (2, 1)])
def test_broadcast_update_reaches_both_ranks_experts(local_ray, tiny_model, tmp_path, tp, ep):
    """update_weights_from_distributed at EP 2 and TP 2: the trainer (a thread holding rank 0 of its own gloo group)
    broadcasts two experts (one on each EP rank) and an attention projection (split by TP) whole; both Ray ranks
    (group ranks 1 and 2) receive them and keep their own part: greedy tokens equal one rank given the same tensors;
    and again after sleep(1) / wake_up on both ranks."""
    from safetensors.torch import load_file

    from moelink.engine.rl.trainer import TrainerGroup
    from moelink.engine.tools.tiny_model import make_tiny_model
    from tests.engine.test_weight_updates_distributed import _Trainer

    a = tiny_model("qwen3_e6k3")
    b = str(make_tiny_model(tmp_path / "b", **{**TINY_CONFIGS["qwen3_e6k3"], "seed": 1}))
    ps = prompts(TINY_CONFIGS["qwen3_e6k3"]["vocab_size"], seed=71, n=4, lo=1, hi=30)
    names = ("model.layers.0.mlp.experts.0.down_proj.weight", "model.layers.1.mlp.experts.5.up_proj.weight",
             "model.layers.1.self_attn.q_proj.weight")
    new = [(k, v) for f in sorted(Path(b).glob("*.safetensors")) for k, v in load_file(f).items() if k in names]
    one = LLM(a, enable_weight_updates=True, **KW)
    one.update_weights_from_tensor(new)
    want = _greedy(one, ps)
    llm = LLM(a, tensor_parallel_size=tp, expert_parallel_size=ep, enable_weight_updates=True, **KW)
    trainer = _Trainer(free_port(), new, world_size=3)
    try:
        trainer.start()
        llm.init_weights_update_group("127.0.0.1", trainer.port, 1, 3, "g", "gloo", timeout_s=60.0)
        trainer.go.set()
        llm.update_weights_from_distributed(**TrainerGroup.specs(new), group_name="g")
        assert_same(_greedy(llm, ps), want, ps)
        llm.destroy_weights_update_group("g")
        assert llm.sleep(1)["bytes_freed"] > 0 and llm.wake_up()["bytes"] > 0  # both ranks, each its own part
        assert_same(_greedy(llm, ps), want, ps)
    finally:
        trainer.done.set()
        llm.engine.shutdown()
    trainer.join(30.0)
    assert trainer.error is None
