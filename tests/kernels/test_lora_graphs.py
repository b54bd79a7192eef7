"""Decode CUDA graphs with LoRA adapters (engine/rank/cuda_graph.py `lora`, engine/lora/slots.py `LoRASlots.captured`;
docs/lora.md#how-it-runs) on CPU: the capture replaced by the stand-in (`Replay`, the forward re-run on the graph's
static buffers), the kernels (LoRA's shrink / expand too) in the Triton interpreter.

One pair of engines on the tiny Qwen3-MoE with two LoRA slots: eager, and with decode graphs at 1 / 2 / 4. The oracle
is the eager engine (the same kernels, each step's slots its own inputs): one prompt under two adapters and the base
in one batch (3 rows on the size-4 graph, one padding row, then sizes 2 and 1 as they finish), then a third adapter,
loaded into a slot after the capture, beside the first, then an adapter on the routed experts beside the base (the
experts' LoRA path through kernels/triton_lora_moe.py, replayed too; its eager run equals the plain-torch path's).
Speculative verify steps (1 + k tokens a row, ragged) with
adapters replay the verify graphs the same way. tests/engine/test_gpu_lora_graphs.py captures real graphs."""
from __future__ import annotations

import random

import pytest

from moelink.engine import LLM, LoRARequest, SamplingParams
from moelink.kernels.lora_moe import reference_lora_fused_moe

from tests.helpers.graph_replays import Replay, count_replays
from tests.helpers.lora_peft import random_adapter

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)

ADAPTERS = {"attn": (("q_proj", "k_proj", "v_proj", "o_proj"), 1), "qv": (("q_proj", "v_proj"), 2),
            "o": (("o_proj",), 3),  # "o": the adapter first loaded after the graphs were captured
            "experts": (("q_proj",), 4)}  # and q_proj with the routed experts' gate_up and down: Triton's path replayed


def _llm(path):
    return LLM(path, dtype="float32", device="cpu", kernels="triton", enable_lora=True, max_loras=2, max_lora_rank=4,
               max_num_seqs=4, max_num_batched_tokens=48, num_kv_blocks=24, block_size=16,
               enable_prefix_caching=False, skip_warmup=True)  # warm-up: test_triton_warmup.py


def _run(llm, prompts, loras, max_tokens):
    # The adapters read into host memory first (engine/lora/loader.py: otherwise a request waits for its adapter's
    # read while the base's start), so that every request is scheduled at once and the steps fall on known sizes.
    loader = llm.engine.lora_admission.loader
    for r in loras:
        if r is not None:
            loader.request(r)
    while loader.reading():
        loader.poll(0.05)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, logprobs=2) for m in max_tokens]
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
    return [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in pos.items()} for pos in o.outputs[0].logprobs])
            for o in outs]


@pytest.mark.slow  # over 1 s (interpreter: two engines, about ten steps each)
def test_lora_decode_graphs_give_each_request_the_eager_tokens(tiny_model, tmp_path, kdev):
    """A batch mixing two adapters and the base (the same prompt under each) replayed through graphs of sizes 4, 2
    and 1 gives every request the eager engine's tokens and logprobs (to 1e-5, float32: test_decode_graphs.py's
    rounding of a padded batch); an adapter loaded into a slot after the
    capture (evicting one) is what the next replays read; every size served a step; a step with an adapter on the
    routed experts replays its graph too (the Triton experts' LoRA path: no host loop), and eagerly that adapter's
    tokens and logprobs through the Triton path equal the plain-torch loop's (kernels/lora_moe.py)."""
    if kdev.type != "cpu":
        pytest.skip("CPU stand-in for the capture; with a GPU, tests/engine/test_gpu_lora_graphs.py")
    path = tiny_model("qwen3_e6k3")
    reqs = {name: LoRARequest(name, i + 1, random_adapter(path, str(tmp_path / name), targets, 4, 8, seed,
                                                          experts_down=name == "experts",
                                                          experts_gate_up=name == "experts"))
            for i, (name, (targets, seed)) in enumerate(ADAPTERS.items())}
    prompt = [random.Random(4).randrange(3, 500) for _ in range(7)]
    first = ([prompt] * 3, [reqs["attn"], reqs["qv"], None], [4, 3, 2])
    second = ([prompt] * 2, [reqs["o"], reqs["attn"]], [2, 2])
    third = ([prompt] * 2, [reqs["experts"], None], [2, 2])
    eager = _llm(path)
    try:
        want = [_run(eager, *first), _run(eager, *second)]
        kernels = eager.engine.executor.worker.runner.plugin("lora").slots.kernels
        fused = kernels.lora_fused_moe
        calls = []
        kernels.lora_fused_moe = lambda *a, **k: calls.append(1) or fused(*a, **k)
        want.append(_run(eager, *third))
        assert calls, "the experts' LoRA path did not run the Triton kernels"
        kernels.lora_fused_moe = reference_lora_fused_moe  # the plain-torch loop, the CPU path
        plain = _run(eager, *third)
    finally:
        eager.shutdown()
    for (tok_w, lps_w), (tok_p, lps_p) in zip(want[2], plain):
        assert tok_w == tok_p
        assert max(abs(lw[t] - lp[t]) for lw, lp in zip(lps_w, lps_p) for t in lw) < 1e-5
    tokens = [t for run in want for t, _ in run]
    assert all(tokens[i][:2] != tokens[2] for i in (0, 1, 3, 5)), \
        f"an adapter does not move the greedy tokens from the base's: a weak test ({tokens})"
    llm = _llm(path)
    try:
        runner = llm.engine.executor.worker.runner
        runner.graph_sizes, runner.graph_backend = (1, 2, 4), Replay()
        runner._capture_graphs()
        assert runner.graphs is not None and set(runner.graphs.steps) == {1, 2, 4}
        replays = count_replays(runner.graphs)
        got_first = _run(llm, *first)
        assert replays[4] >= 1 and replays[2] >= 1 and replays[1] >= 1, replays
        before = dict(replays)
        loaded = {s.lora_int_id for s in runner.plugin("lora").slots.slots}
        assert reqs["o"].lora_int_id not in loaded  # loaded only now, into a slot the graphs already read
        got_second = _run(llm, *second)
        assert replays[2] >= before[2] + 1, replays  # its decode step replayed the size-2 graph
        assert reqs["o"].lora_int_id in {s.lora_int_id for s in runner.plugin("lora").slots.slots}
        before = dict(replays)
        got_third = _run(llm, *third)
        assert replays[2] >= before[2] + 1, replays  # a row's adapter targets routed experts: replayed all the same
    finally:
        llm.shutdown()
    for run_w, run_g in zip(want, [got_first, got_second, got_third]):
        for (tok_w, lps_w), (tok_g, lps_g) in zip(run_w, run_g):
            assert tok_g == tok_w
            for lw, lg in zip(lps_w, lps_g):  # float32: the padded batch's kernels round as the decode graphs' do
                assert lw.keys() == lg.keys()
                assert max(abs(lw[t] - lg[t]) for t in lw) < 1e-5


@pytest.mark.slow  # over 1 s (interpreter: one engine, a few steps twice)
def test_gpt_oss_expert_adapter_through_triton_equals_the_plain_loop(tmp_path, kdev):
    """gpt-oss's float experts (biases, the clamped SwiGLU, gate and up interleaved on disk) with an adapter on their
    gate_up_proj and down_proj (and q_proj) beside the base: the engine's Triton experts' LoRA path
    (kernels/triton_lora_moe.py) gives the plain-torch loop's tokens and logprobs (kernels/lora_moe.py); peft's
    tokens for the same adapter: tests/engine/test_lora.py::test_gpt_oss_attention_and_expert_adapters_equal_peft."""
    if kdev.type != "cpu":
        pytest.skip("the Triton interpreter on CPU")
    from tests.helpers.gpt_oss_checkpoints import save_gpt_oss

    path = save_gpt_oss(tmp_path / "base", num_hidden_layers=2)
    req = LoRARequest("experts", 1, random_adapter(path, str(tmp_path / "experts"), ("q_proj",), 4, 8, 5,
                                                   experts_down=True, experts_gate_up=True))
    prompt = [random.Random(5).randrange(3, 200) for _ in range(7)]
    case = ([prompt] * 2, [req, None], [3, 3])
    llm = _llm(path)
    try:
        kernels = llm.engine.executor.worker.runner.plugin("lora").slots.kernels
        fused, calls = kernels.lora_fused_moe, []
        kernels.lora_fused_moe = lambda *a, **k: calls.append(k) or fused(*a, **k)
        triton = _run(llm, *case)
        assert calls and all(k.get("b13_EF") is not None for k in calls), "gpt-oss's experts ran no Triton LoRA path"
        kernels.lora_fused_moe = reference_lora_fused_moe
        plain = _run(llm, *case)
    finally:
        llm.shutdown()
    assert triton[0][0] != triton[1][0], "the adapter does not move the greedy tokens: a weak test"
    for (tok_t, lps_t), (tok_p, lps_p) in zip(triton, plain):
        assert tok_t == tok_p
        assert max(abs(lt[t] - lp[t]) for lt, lp in zip(lps_t, lps_p) for t in lt) < 1e-5


@pytest.mark.slow  # over 1 s (interpreter: two engines, a few steps each)
def test_lora_verify_graphs_give_each_request_the_eager_tokens(tiny_model, tmp_path, kdev):
    """Speculative verify steps (1 + k tokens a row, ragged: the uneven drafter of test_verify_graphs.py) with two
    adapters and the base in one batch replay the verify graphs, each token's slot staged where its token is (a
    ragged row front-padded), and give each request the eager engine's tokens and logprobs without speculation
    (verify rows and decode rows agree to float32 rounding)."""
    if kdev.type != "cpu":
        pytest.skip("CPU stand-in for the capture; with a GPU, tests/engine/test_gpu_lora_graphs.py")
    import functools

    from tests.kernels.test_verify_graphs import K, UnevenDrafter

    path = tiny_model("qwen3_e6k3")
    reqs = {name: LoRARequest(name, i + 1, random_adapter(path, str(tmp_path / name), targets, 4, 8, seed))
            for i, (name, (targets, seed)) in enumerate(list(ADAPTERS.items())[:2])}
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (6, 9, 4)]  # a prompt each: the drafter's key
    loras = [reqs["attn"], None, reqs["qv"]]
    eager = _llm(path)
    try:
        want = _run(eager, prompts, loras, [5, 5, 5])
    finally:
        eager.shutdown()
    ref = {tuple(p): t for p, (t, _) in zip(prompts, want)}
    spec = {"method": "ngram", "num_speculative_tokens": K,
            "drafter_factory": functools.partial(UnevenDrafter, ref, 0.7, vocab=500, seed=5)}
    llm = LLM(path, dtype="float32", device="cpu", kernels="triton", enable_lora=True, max_loras=2, max_lora_rank=4,
              max_num_seqs=4, max_num_batched_tokens=48, num_kv_blocks=24, block_size=16,
              enable_prefix_caching=False, skip_warmup=True, speculative_config=spec)
    try:
        runner = llm.engine.executor.worker.runner
        runner.graph_sizes, runner.graph_backend = (4,), Replay()  # one size: the 3 rows padded to 4, CPU saved
        runner._capture_graphs()
        assert runner.graphs is not None and runner.graphs.verify_len == 1 + K
        verify = count_replays(runner.graphs, verify=True)
        got = _run(llm, prompts, loras, [5, 5, 5])
        sd = llm.engine.stats().spec_decode
    finally:
        llm.shutdown()
    assert sum(verify.values()) > 0, f"no verify step replayed a graph: {verify}"
    assert sd.num_accepted_tokens > 0, sd
    for (tok_w, lps_w), (tok_g, lps_g) in zip(want, got):
        assert tok_g == tok_w
        for lw, lg in zip(lps_w, lps_g):
            assert lw.keys() == lg.keys()
            assert max(abs(lw[t] - lg[t]) for t in lw) < 1e-4
