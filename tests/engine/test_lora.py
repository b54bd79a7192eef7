"""LoRA adapters (engine/lora/, docs/lora.md) against transformers + peft in float64: a tiny random Qwen3-MoE
(transformers' save_pretrained, a dense first layer) and adapters made with peft itself (get_peft_model with random,
non-zero A and B: init_lora_weights=False, then save_pretrained). Each adapter alone gives peft's greedy tokens; a
batch mixing three adapters and the base gives every request the tokens it gets alone (same prompts under every
adapter: a prefix-cache hit across adapters would show); fewer slots than adapters still does; bad adapters are
refused naming the field."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.helpers.lora_peft import make_adapter, peft_greedy
from tests.helpers.parity import MAX_NEW, prompts as make_prompts

pytestmark = pytest.mark.slow  # each test builds engines over peft-made adapters (seconds)

ADAPTERS = {  # name -> (peft LoraConfig fields, seed)
    "attn": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), 1),
    "qv_rs": (dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True), 2),
    # A regex over some layers' modules (peft 0.21 turns gate/up/down targets of a Qwen3-MoE into its experts'
    # target_parameters, the dense layer's too: routed-expert LoRA is not served yet, docs/lora.md#limits).
    "layer0": (dict(r=2, lora_alpha=4, target_modules=r"model\.layers\.0\.self_attn\.(k_proj|o_proj)"), 3),
    # Routed experts: peft saves them as target_parameters on the fused expert tensors (gate_up_proj at rank 2r).
    "experts": (dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]), 4),
    "q_down": (dict(r=3, lora_alpha=5, target_modules=["q_proj"], target_parameters=["mlp.experts.down_proj"]), 5),
}


def _make_adapter(base: str, out: str, fields: dict, seed: int) -> None:
    make_adapter(base, out, fields, seed)


def _peft_greedy(base: str, adapter: str | None, prompts: list[list[int]]) -> list[list[int]]:
    return peft_greedy(base, adapter, prompts, MAX_NEW)


@pytest.fixture(scope="module")
def lora_case(tmp_path_factory):
    """(base dir, {adapter name: dir}, prompts, {adapter name or None: peft's greedy tokens per prompt})."""
    from moelink.engine.tools.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("lora")
    base = str(make_tiny_model(root / "base", "qwen3_moe", dtype="float64", num_layers=2, mlp_only_layers=[0]))
    dirs = {}
    for name, (fields, seed) in ADAPTERS.items():
        dirs[name] = str(root / name)
        _make_adapter(base, dirs[name], fields, seed)
    ps = make_prompts(vocab=200, seed=7, n=3, lo=3, hi=21)
    want = {name: _peft_greedy(base, d, ps) for name, d in [(None, None), *dirs.items()]}
    return base, dirs, ps, want


def _llm(base: str, **kw):
    from moelink.engine import LLM

    return LLM(base, **{**dict(dtype="float64", enable_lora=True, max_lora_rank=8, num_kv_blocks=64, block_size=4,
                               max_num_batched_tokens=32), **kw})


def _req(dirs: dict, name: str):
    from moelink.engine import LoRARequest

    return LoRARequest(name, list(ADAPTERS).index(name) + 1, dirs[name])


def _greedy(llm, prompts, loras) -> list[list[int]]:
    from moelink.engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False, lora_request=loras)]


def test_adapter_config_reads_as_peft_reads_it(lora_case):
    from peft import LoraConfig

    from moelink.engine.lora.adapter_config import AdapterConfig

    for name, d in lora_case[1].items():
        want = LoraConfig.from_pretrained(d)
        got = AdapterConfig.from_json(json.loads((__import__("pathlib").Path(d) / "adapter_config.json").read_text()))
        assert (got.r, got.lora_alpha, got.use_rslora) == (want.r, want.lora_alpha, want.use_rslora), name
        targets = want.target_modules
        assert (set(got.target_modules) if isinstance(got.target_modules, tuple) else got.target_modules) == \
            (set(targets) if not isinstance(targets, str) else targets), name


@pytest.mark.slow
def test_each_adapter_alone_equals_peft(lora_case):
    base, dirs, ps, want = lora_case
    llm = _llm(base, max_loras=1)
    try:
        assert _greedy(llm, ps, None) == want[None]
        for name in dirs:
            assert want[name] != want[None], f"adapter {name} does not move the greedy tokens: a weak test"
            assert _greedy(llm, ps, _req(dirs, name)) == want[name], name
    finally:
        llm.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("max_loras", [3, 2])
def test_mixed_batch_gives_each_request_its_own_tokens(lora_case, max_loras):
    """Three adapters and the base over the same prompts in one generate (max_loras=2: the scheduler holds the
    third adapter's requests until a slot frees, and a slot is reused for another adapter)."""
    base, dirs, ps, want = lora_case
    names = [None, *dirs]
    llm = _llm(base, max_loras=max_loras, max_cpu_loras=3)
    try:
        prompts = [p for _ in names for p in ps]
        loras = [None if n is None else _req(dirs, n) for n in names for _ in ps]
        got = _greedy(llm, prompts, loras)
        assert got == [w for n in names for w in want[n]]
    finally:
        llm.shutdown()


def test_adapter_weights_are_read_off_the_step_loop(lora_case, monkeypatch):
    """A request naming an adapter not yet in host memory is held back while a worker thread reads it (made slow
    here): the base model's requests behind it keep stepping meanwhile (counted), no rank reads the files on its step
    loop, and then it gives peft's tokens. A read that fails ends its request with an error naming the adapter, and
    leaves nothing held."""
    import time

    from moelink.engine import LoRARequest, SamplingParams
    from moelink.engine.lora import loader, slots

    base, dirs, ps, want = lora_case
    llm = _llm(base, max_loras=1)
    real, window, rank_reads = loader.read_adapter, {}, []

    def slow_read(req, *args, **kw):
        if req.lora_name == "broken":
            raise OSError("the disk is gone")
        window["start"] = llm.engine.loop_stats.steps
        time.sleep(0.5)
        window["steps"] = llm.engine.loop_stats.steps - window["start"]
        return real(req, *args, **kw)

    def rank_read(req, *args, **kw):  # a rank's own read: it would run between two steps
        rank_reads.append(req.lora_name)
        return slow_read(req, *args, **kw)

    monkeypatch.setattr(loader, "read_adapter", slow_read)
    monkeypatch.setattr(slots, "read_adapter", rank_read)
    try:
        # The adapter's request first: held apart, it keeps no place in the waiting queue before the others.
        got = _greedy(llm, [ps[0], ps[1], ps[2]], [_req(dirs, "attn"), None, None])
        assert got == [want["attn"][0], want[None][1], want[None][2]]
        assert window["steps"] >= 3, f"the base requests did not step while the adapter was read: {window}"
        assert rank_reads == [], "a rank read the adapter's files on its step loop"
        broken = LoRARequest("broken", 9, dirs["attn"])  # its files check out; its read fails
        params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
        outs = llm.generate([ps[0], ps[1]], params, use_tqdm=False, lora_request=[broken, None])
        failed = outs[0].outputs[0]
        assert failed.finish_reason == "error" and failed.token_ids == []
        assert "LoRA adapter 'broken'" in str(failed.stop_reason) and "the disk is gone" in str(failed.stop_reason)
        assert outs[1].outputs[0].token_ids == want[None][1]
        assert not llm.engine.has_requests() and not llm.engine.lora_admission.waiting
        assert llm.engine.lora_admission.loader.reading() == 0
    finally:
        llm.shutdown()


def test_refusals_name_the_field(lora_case, tmp_path):
    from moelink.engine import LLM, LoRARequest, SamplingParams

    base, dirs, ps, _ = lora_case
    plain = LLM(base, dtype="float64", num_kv_blocks=16, block_size=4)
    try:
        with pytest.raises(ValueError, match="enable_lora"):
            plain.generate(ps[:1], SamplingParams(max_tokens=2), use_tqdm=False, lora_request=_req(dirs, "attn"))
    finally:
        plain.shutdown()
    llm = _llm(base, max_loras=1)
    bad_rank = LoRARequest("qv_rs", 2, dirs["qv_rs"])
    llm4 = None
    try:
        missing = tmp_path / "missing"
        shutil.copytree(dirs["attn"], missing)
        (missing / "adapter_model.safetensors").unlink()
        with pytest.raises(ValueError, match="adapter_model.safetensors"):
            llm.generate(ps[:1], use_tqdm=False, lora_request=LoRARequest("m", 9, str(missing)))
        unknown = tmp_path / "unknown"
        shutil.copytree(dirs["attn"], unknown)
        cfg = json.loads((unknown / "adapter_config.json").read_text())
        cfg["target_modules"] = ["q_proj", "w_fancy"]
        (unknown / "adapter_config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match="target_modules lists 'w_fancy'"):
            llm.generate(ps[:1], use_tqdm=False, lora_request=LoRARequest("u", 10, str(unknown)))
        with pytest.raises(ValueError, match="lora_int_id=1 is invalid"):  # one id, two adapters
            llm.generate(ps[:1], use_tqdm=False, lora_request=[_req(dirs, "attn")])
            llm.generate(ps[:1], use_tqdm=False, lora_request=LoRARequest("other", 1, dirs["qv_rs"]))
        assert not llm.engine.has_requests()  # nothing refused was left behind
    finally:
        llm.shutdown()
    llm4 = LLM(base, dtype="float64", enable_lora=True, max_lora_rank=4, num_kv_blocks=16, block_size=4)
    try:
        with pytest.raises(ValueError, match="r=8 is over max_lora_rank=4"):
            llm4.generate(ps[:1], use_tqdm=False, lora_request=bad_rank)
        # r=4 in the config, but peft's gate_up_proj (gate + up fused) is rank 8: its rank_pattern says so
        with pytest.raises(ValueError, match="experts.gate_up_proj' has rank 8 .* over max_lora_rank=4"):
            llm4.generate(ps[:1], use_tqdm=False, lora_request=_req(dirs, "experts"))
        assert not llm4.engine.has_requests()
    finally:
        llm4.shutdown()
    with pytest.raises(ValueError, match="max_loras=0 is invalid"):
        LLM(base, enable_lora=True, max_loras=0)
    with pytest.raises(ValueError, match="enable_lora is not supported with quantization"):
        LLM(base, enable_lora=True, quantization="fp8")


MLA_ADAPTERS = {  # DeepSeek-V3: MLA's projections (q_b_proj and kv_a_proj_with_mqa rows de-interleaved at load),
    # its shared experts, its routed experts
    "mla": (dict(r=4, lora_alpha=8, target_modules=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"]), 11),
    "shared": (dict(r=2, lora_alpha=3, target_modules=["shared_experts.gate_proj", "shared_experts.up_proj",
                                                       "shared_experts.down_proj"]), 12),
    "routed": (dict(r=2, lora_alpha=2, target_modules=["q_b_proj"], target_parameters=["gate_up_proj", "down_proj"]),
               13),
}


def test_deepseek_v3_mla_adapters_equal_peft(tmp_path_factory):
    """Each adapter alone and all three with the base in one batch, against transformers + peft in float64."""
    from moelink.engine import LoRARequest
    from moelink.engine.tools.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("lora_mla")
    base = str(make_tiny_model(root / "base", "deepseek_v3", dtype="float64"))
    reqs = {}
    for i, (name, (fields, seed)) in enumerate(MLA_ADAPTERS.items()):
        _make_adapter(base, str(root / name), fields, seed)
        reqs[name] = LoRARequest(name, i + 1, str(root / name))
    ps = make_prompts(vocab=200, seed=8, n=2, lo=3, hi=17)
    want = {name: _peft_greedy(base, None if name is None else reqs[name].lora_path, ps)
            for name in [None, *MLA_ADAPTERS]}
    llm = _llm(base, max_loras=3)
    try:
        for name in MLA_ADAPTERS:
            assert want[name] != want[None], f"adapter {name} does not move the greedy tokens: a weak test"
            assert _greedy(llm, ps, reqs[name]) == want[name], name
        names = [None, *MLA_ADAPTERS]
        got = _greedy(llm, [p for _ in names for p in ps], [None if n is None else reqs[n] for n in names for _ in ps])
        assert got == [w for n in names for w in want[n]]
    finally:
        llm.shutdown()


def test_async_engine_streams_under_an_adapter(lora_case):
    """AsyncEngine.generate(..., lora_request=) (the serving API) gives the adapter's tokens, beside a request of the
    base model streamed at the same time."""
    import asyncio

    from moelink.engine import AsyncEngine, EngineArgs, SamplingParams

    base, dirs, ps, want = lora_case
    engine = AsyncEngine.from_engine_args(EngineArgs(model=base, dtype="float64", enable_lora=True, max_lora_rank=8,
                                                     num_kv_blocks=64, block_size=4))
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)

    async def run(rid, lora):
        last = None
        async for out in engine.generate(rid, ps[0], params, lora_request=lora):
            last = out
        return last.outputs[0].token_ids

    async def both():
        return await asyncio.gather(run("a", _req(dirs, "attn")), run("b", None))

    try:
        assert asyncio.run(both()) == [want["attn"][0], want[None][0]]
    finally:
        engine.shutdown()


def test_routed_expert_adapters_are_refused_where_not_served():
    """Experts held as gate / up / down are served at one rank, under EP and under TP; TP and EP together, online
    EPLB, elastic EP and MiniMax-M2's w1 / w3 / w2 (not tested against peft) are refused, naming why (the driver's
    check reads this: engine/lora/checker.py)."""
    from types import SimpleNamespace

    from moelink.engine.config.lora import routed_lora_refusal

    def par(tp=1, world=1, ep=None, eplb=0, elastic=False):
        ep = world if ep is None and tp == 1 else (ep or 1)
        return SimpleNamespace(tensor_parallel_size=tp, world_size=world, expert_parallel_size=ep,
                               experts_split_by_tp=tp > 1 and ep == 1, eplb_interval=eplb, elastic_ep=elastic)

    assert routed_lora_refusal(par(), "Qwen3MoeForCausalLM") is None
    assert routed_lora_refusal(par(), "DeepseekV3ForCausalLM") is None
    assert routed_lora_refusal(par(), "GptOssForCausalLM") is None  # float experts: test_gpt_oss_..._equal_peft
    assert routed_lora_refusal(par(), "MixtralForCausalLM") is None  # w1 / w3 / w2: test_mixtral_expert_...
    assert routed_lora_refusal(par(), "MiniMaxM2ForCausalLM") == "MiniMaxM2ForCausalLM's expert layout"
    assert routed_lora_refusal(par(world=2), "Qwen3MoeForCausalLM") is None  # EP: tests/ep/test_ep_lora.py
    assert routed_lora_refusal(par(tp=2, world=2), "Qwen3MoeForCausalLM") is None  # TP splits every expert
    assert routed_lora_refusal(par(tp=2, world=4, ep=4), "Qwen3MoeForCausalLM") == \
        "tensor_parallel_size=2 with expert_parallel_size=4"
    assert routed_lora_refusal(par(world=2, eplb=8), "Qwen3MoeForCausalLM") == "eplb_interval=8"
    assert routed_lora_refusal(par(world=2, elastic=True), "Qwen3MoeForCausalLM") is None  # no recovery at 2
    assert routed_lora_refusal(par(world=3, elastic=True), "Qwen3MoeForCausalLM") == \
        "elastic_ep=True at expert_parallel_size=3 (pass elastic_ep=False)"


def test_gpt_oss_attention_and_expert_adapters_equal_peft(tmp_path):
    """gpt-oss: GQA with sinks, q/k/v and o biases, sliding layers, experts with biases and a clamped SwiGLU whose
    gate and up are interleaved on disk: an adapter on the routed experts' gate_up_proj and down_proj (peft's
    target_parameters, with q_proj) alone, then beside an adapter on q/k/v/o and the base in one batch, each equal
    to transformers + peft (float64; the experts' gate_up B rows read in the load's de-interleaving order)."""
    from moelink.engine import LoRARequest
    from tests.helpers.gpt_oss_checkpoints import VOCAB, save_gpt_oss

    base = save_gpt_oss(tmp_path / "base", num_hidden_layers=2)
    _make_adapter(base, str(tmp_path / "attn"), dict(r=4, lora_alpha=8,
                                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), 21)
    _make_adapter(base, str(tmp_path / "experts"), dict(
        r=4, lora_alpha=8, target_modules=["q_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]), 22)
    attn, experts = LoRARequest("attn", 1, str(tmp_path / "attn")), LoRARequest("experts", 2, str(tmp_path / "experts"))
    ps = make_prompts(vocab=VOCAB, seed=9, n=2, lo=3, hi=17)
    want = {None: _peft_greedy(base, None, ps), "attn": _peft_greedy(base, attn.lora_path, ps),
            "experts": _peft_greedy(base, experts.lora_path, ps)}
    assert want["attn"] != want[None] and want["experts"] != want[None], "an adapter does not move the tokens"
    llm = _llm(base, max_loras=2)
    try:
        assert _greedy(llm, ps, [experts] * len(ps)) == want["experts"]
        assert _greedy(llm, ps * 3, [experts] * len(ps) + [attn] * len(ps) + [None] * len(ps)) == \
            want["experts"] + want["attn"] + want[None]
    finally:
        llm.shutdown()


def test_mixtral_expert_adapter_equals_peft(tmp_path):
    """Mixtral: experts as w1 / w3 / w2 per expert under block_sparse_moe on disk, one `mlp.experts` module with
    Qwen's fused layout in transformers 5 (what peft wraps): an adapter on its gate_up_proj and down_proj (and
    q_proj) alone and beside the base in one batch equals transformers + peft (float64)."""
    from moelink.engine import LoRARequest
    from moelink.engine.tools.tiny_model import make_tiny_model

    base = str(make_tiny_model(tmp_path / "base", "mixtral", dtype="float64", num_layers=2))
    _make_adapter(base, str(tmp_path / "experts"), dict(
        r=4, lora_alpha=8, target_modules=["q_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]), 23)
    req = LoRARequest("experts", 1, str(tmp_path / "experts"))
    ps = make_prompts(vocab=200, seed=9, n=2, lo=3, hi=17)
    want = {None: _peft_greedy(base, None, ps), "experts": _peft_greedy(base, req.lora_path, ps)}
    assert want["experts"] != want[None], "the adapter does not move the greedy tokens: a weak test"
    llm = _llm(base, max_loras=1)
    try:
        assert _greedy(llm, ps * 2, [req] * len(ps) + [None] * len(ps)) == want["experts"] + want[None]
        assert llm.engine.executor.worker.runner.plugin("lora").slots.experts, "Mixtral's experts are no LoRA target"
    finally:
        llm.shutdown()


def test_fp8_base_with_an_adapter_equals_peft_on_the_dequantized_base(lora_case, tmp_path):
    """An FP8 block-scaled checkpoint (`moelink quantize-fp8` of the float base) with the q/k/v/o adapter: the delta
    runs in float on each linear's input, the base in W8A8; transformers + peft on the dequantized weights, with the
    W8A8 activation rounding on the base linears' inputs only (peft's LoRA branch reads the unrounded input, as the
    engine's hook does), gives the same greedy tokens, alone and beside the base."""
    from peft import PeftModel

    from moelink.engine.tools.quantize_fp8 import quantize_checkpoint
    from tests.helpers.fp8_checkpoints import BLOCK, dequantized_copy, fake_quant_hf_model, hf_greedy_with

    base, dirs, ps, _ = lora_case
    fp8 = str(quantize_checkpoint(base, tmp_path / "fp8", BLOCK))
    deq = dequantized_copy(fp8, tmp_path / "deq")
    want_base = hf_greedy_with(fake_quant_hf_model(deq, BLOCK), ps, MAX_NEW)
    oracle = PeftModel.from_pretrained(fake_quant_hf_model(deq, BLOCK), dirs["attn"]).eval()
    want = hf_greedy_with(oracle, ps, MAX_NEW)
    assert want != want_base, "the adapter does not move the greedy tokens: a weak test"
    llm = _llm(fp8, max_loras=1)
    try:
        layer = llm.engine.executor.worker.runner.model.layers[1]
        assert layer.self_attn.qkv_proj.method.name == "fp8" and layer.self_attn.qkv_proj.lora is not None
        assert _greedy(llm, ps + ps, [_req(dirs, "attn")] * len(ps) + [None] * len(ps)) == want + want_base
    finally:
        llm.shutdown()


def test_mxfp4_base_with_an_adapter_equals_peft_on_the_dequantized_base(tmp_path):
    """gpt-oss with MXFP4 experts (`moelink quantize-mxfp4` of a float gpt-oss saved by transformers) and an adapter
    on q/k/v/o made with peft on the float base: alone and beside the base, the greedy tokens of transformers + peft
    on transformers' own dequantization of the same MXFP4 file (Mxfp4Config(dequantize=True), float64). The experts
    run the MXFP4 path; an adapter on them is refused (docs/lora.md#limits)."""
    import transformers
    from peft import PeftModel

    from moelink.engine import LoRARequest
    from moelink.engine.tools.mxfp4_checkpoint import quantize_mxfp4_checkpoint
    from tests.helpers.fp8_checkpoints import hf_greedy_with
    from tests.helpers.gpt_oss_checkpoints import VOCAB, save_gpt_oss

    src = save_gpt_oss(tmp_path / "float", num_hidden_layers=2, intermediate_size=32)
    mx = str(quantize_mxfp4_checkpoint(src, tmp_path / "mxfp4"))
    _make_adapter(src, str(tmp_path / "attn"), dict(r=4, lora_alpha=8,
                                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), 22)
    req = LoRARequest("attn", 1, str(tmp_path / "attn"))

    def deq():
        return transformers.AutoModelForCausalLM.from_pretrained(
            mx, dtype=torch.float64, experts_implementation="eager",
            quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()

    ps = make_prompts(vocab=VOCAB, seed=10, n=2, lo=3, hi=17)
    want_base = hf_greedy_with(deq(), ps, MAX_NEW)
    want = hf_greedy_with(PeftModel.from_pretrained(deq(), req.lora_path).eval(), ps, MAX_NEW)
    assert want != want_base, "the adapter does not move the greedy tokens: a weak test"
    llm = _llm(mx, max_loras=1)
    try:
        moe = llm.engine.executor.worker.runner.model.layers[0].ffn.moe
        assert moe.expert_format.name == "mxfp4" and moe.lora_experts is None
        assert _greedy(llm, ps + ps, [req] * len(ps) + [None] * len(ps)) == want + want_base
    finally:
        llm.shutdown()


def test_pd_transfer_and_the_host_tier_key_kv_by_adapter(lora_case):
    """KV beyond the device pool is keyed by the adapter (its cache salt): a prefill engine's save under adapter A,
    loaded by a decode engine, gives peft's tokens for A; a decode request under B or the base naming A's save finds
    no KV (engine/kv_transfer/auth.salted_key) and is recomputed (its own tokens). The host tier: A's blocks evicted
    there are found by A's prompt again and missed by the same prompt under B. Every block free after. A connector
    that keys by anything else (the in-host reference: request ids) is refused naming the flag."""
    from moelink.engine import SamplingParams
    from moelink.engine.contract.kv_transfer_params import KVTransferParams
    from moelink.engine.kv_transfer.inhost import InHostKVConnector, InHostKVStore
    from moelink.engine.kv_transfer.offload import OffloadConfig, OffloadKVConnector
    from moelink.engine.kv_transfer.remote import RemoteKVConfig, RemoteKVConnector
    from tests.helpers.net import free_port

    base, dirs, ps, want = lora_case
    i = max(range(len(ps)), key=lambda k: len(ps[k]))
    p, a, b = ps[i], _req(dirs, "attn"), _req(dirs, "qv_rs")
    with pytest.raises(ValueError, match="kv_connector=InHostKVConnector"):
        _llm(base, kv_connector=InHostKVConnector(InHostKVStore()))

    def run(llm, lora, **kw):
        params = SamplingParams(temperature=0.0, ignore_eos=True, **{"max_tokens": MAX_NEW, **kw})
        [out] = llm.generate([p], params, use_tqdm=False, lora_request=lora)
        return out

    secret = b"lora-pd-test-secret-0123456789ab"
    pre = _llm(base, kv_connector=RemoteKVConnector(RemoteKVConfig(port=free_port(), transport="tcp", secret=secret)))
    dec = None
    try:
        saved = run(pre, a, max_tokens=1, kv_transfer_params=KVTransferParams(do_remote_decode=True))
        assert saved.outputs[0].token_ids == want["attn"][i][:1]
        dec = _llm(base, kv_connector=RemoteKVConnector(RemoteKVConfig(transport="tcp", secret=secret)))
        stats = dec.engine.executor.runner.plugin("kv_transfer").connector.stats
        for lora, name in ((b, "qv_rs"), (None, None)):  # A's save named under B / the base: nothing under its key
            wrong = run(dec, lora, kv_transfer_params=saved.kv_transfer_params)
            assert wrong.outputs[0].token_ids == want[name][i] and wrong.num_cached_tokens == 0
        assert stats.num_loaded == 0
        got = run(dec, a, kv_transfer_params=saved.kv_transfer_params)
        assert got.outputs[0].token_ids == want["attn"][i] and got.num_cached_tokens == len(p) - 1
        assert stats.num_loaded == 1
        for llm in (pre, dec):
            s = llm.engine.stats()
            assert s.num_free_blocks == s.num_total_blocks
    finally:
        for llm in (dec, pre):
            if llm is not None:
                llm.shutdown()

    conn = OffloadKVConnector(OffloadConfig(host_bytes=1 << 30))
    llm = _llm(base, kv_connector=conn, **{"num_kv_blocks": 16})
    try:
        out = run(llm, a)
        assert out.outputs[0].token_ids == want["attn"][i] and out.num_cached_tokens == 0
        for q in make_prompts(vocab=200, seed=61, n=3, lo=40, hi=41):  # each fills the pool: A's blocks go to host
            llm.generate([q], SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True), use_tqdm=False)
        host = conn.offload_tier_stats()["host"]
        assert host.stored > 0 and host.hits == 0
        out = run(llm, b)  # the same prompt under B: missed in the tier
        assert out.outputs[0].token_ids == want["qv_rs"][i] and out.num_cached_tokens == 0
        assert conn.offload_tier_stats()["host"].hits == 0
        out = run(llm, a)  # A again: loaded back from the tier
        assert out.outputs[0].token_ids == want["attn"][i] and out.num_cached_tokens > 0
        assert conn.offload_tier_stats()["host"].hits > 0
        s = llm.engine.stats()
        assert s.num_free_blocks == s.num_total_blocks
    finally:
        llm.shutdown()
