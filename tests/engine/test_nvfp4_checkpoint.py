"""NVFP4 experts as NVIDIA's ModelOpt publishes them (FP4 DeepSeek-R1 / Qwen3: per-expert uint8 e2m1 pairs,
float8_e4m3fn scales per 16 values, float32 weight_scale_2 and input_scale), end to end on CPU: tiny Qwen3-MoE and
DeepSeek-V3 models saved by transformers, their experts rewritten in the published layout
(tests/helpers/nvfp4_checkpoints.py), loaded and served by moelink's LLM in float64.

Oracle: transformers' own float64 model holding the dequantized weights (e2m1 x weight_scale x weight_scale_2):
the greedy tokens must be identical and the logits equal to float64 summation order. Also: the config readers
(config.json's `ignore`, hf_quant_config.json's `exclude_modules`, refusals naming the field), the loaded bytes
(gate's and up's different global scales each in their column), and the Triton NVFP4 MoE in an engine run under
the interpreter."""
from __future__ import annotations

import json
import random

import pytest
import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.config.model import ModelConfig
from moelink.engine.config.quantization import Nvfp4Config, read_quantization
from moelink.engine.rank.loader import load_model
from moelink.kernels.ops import ReferenceKernels

from tests.helpers.fp8_checkpoints import hf_greedy_with
from tests.helpers.nvfp4_checkpoints import VOCAB, dequantized_copy, nvfp4_checkpoint, save_tiny
from tests.helpers.fast_interpreter import interpreter_env
from tests.helpers import zygote

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)

CPU = torch.device("cpu")
MAX_NEW = 6
ENGINE_KW = dict(max_num_seqs=4, max_num_batched_tokens=40, num_kv_blocks=64, block_size=8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny(name, hf_quant_file=False, scope="experts") -> (NVFP4 checkpoint, its dequantized float64 copy)."""
    built: dict = {}

    def get(name: str, hf_quant_file: bool = False, scope: str = "experts"):
        key = (name, hf_quant_file, scope)
        if key not in built:
            root = tmp_path_factory.mktemp(f"{name}_nvfp4_{scope}")
            src = save_tiny(root / "float", name)
            dst = nvfp4_checkpoint(src, root / "nvfp4", hf_quant_file, scope)
            built[key] = (dst, dequantized_copy(dst, root / "dequantized"))
        return built[key]

    return get


def _prompts(seed: int, n: int = 4) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(L)] for L in [1, 29] + [rng.randint(2, 20) for _ in range(n - 2)]]


@pytest.mark.parametrize("name,hf_quant_file,scope", [("qwen3", False, "experts"), ("qwen3", True, "experts"),
                                                      ("dsv3", False, "experts"), ("qwen3", False, "all"),
                                                      ("dsv3", True, "all")])
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_greedy_equals_transformers_on_dequantized_weights(tiny, name, hf_quant_file, scope):
    """scope "all": attention, dense and shared MLPs in NVFP4 too (ModelOpt's default recipe), which moelink
    dequantizes at load (engine/rank/nvfp4_linears.py) while the routed experts stay NVFP4."""
    from transformers import AutoModelForCausalLM

    dst, deq = tiny(name, hf_quant_file, scope)
    if scope == "all":  # the attention really is NVFP4 in the file (MLA's q_b_proj is read in its rope row order)
        from moelink.engine.rank.loader import checkpoint_index

        attn = "model.layers.0.self_attn." + ("q_proj" if name == "qwen3" else "q_b_proj")
        assert attn + ".weight_scale_2" in checkpoint_index(dst)
    cfg = ModelConfig.from_pretrained(dst, dtype="float64")
    assert isinstance(cfg.quantization, Nvfp4Config)
    prompts = _prompts(len(name) + hf_quant_file)
    llm = LLM(dst, dtype="float64", **ENGINE_KW)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=5)
    outs = llm.generate(prompts, params, use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outs]
    assert len({t for g in got for t in g}) > 4, "degenerate model"
    hf = AutoModelForCausalLM.from_pretrained(deq, dtype=torch.float64, experts_implementation="eager").eval()
    assert got == hf_greedy_with(hf, prompts, MAX_NEW)
    # and the logits: every reported logprob equals transformers' on the dequantized weights (logprobs are reported
    # in float32: 1e-5)
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([p + list(o.outputs[0].token_ids)])).logits[0], dim=-1)
        for step, lps in enumerate(o.outputs[0].logprobs):
            for tok, lp in lps.items():
                assert abs(lp.logprob - logp[len(p) - 1 + step, tok].item()) < 1e-5


def test_loaded_bytes_and_global_scales(tiny):
    """Each expert's gate and up weight_scale_2 land in column 0 / 1 of w13_scale2_E2 (they differ: quantized
    apart), the bytes and e4m3 scales in w13's two halves, and input_scale is recorded."""
    from safetensors.torch import load_file
    from pathlib import Path

    dst, _ = tiny("qwen3")
    t = {}
    for f in Path(dst).glob("*.safetensors"):
        t.update(load_file(str(f)))
    model = load_model(ModelConfig.from_pretrained(dst, dtype="float64"), ReferenceKernels(), CPU)
    layer = next(m for m in model.modules() if hasattr(m, "w13_q_EFB"))  # layer 0 (layer 1 is dense)
    I = layer.w13_q_EFB.shape[1] // 2
    p = "model.layers.0.mlp.experts.3."
    assert torch.equal(layer.w13_q_EFB[3, :I], t[p + "gate_proj.weight"])
    assert torch.equal(layer.w13_q_EFB[3, I:], t[p + "up_proj.weight"])
    assert torch.equal(layer.w13_scale_EFS[3, I:].view(torch.uint8), t[p + "up_proj.weight_scale"].view(torch.uint8))
    assert torch.equal(layer.w2_q_EDB[3], t[p + "down_proj.weight"])
    g = layer.w13_scale2_E2[3]
    assert g[0] == t[p + "gate_proj.weight_scale_2"] and g[1] == t[p + "up_proj.weight_scale_2"] and g[0] != g[1]
    assert layer.w2_scale2_E[3] == t[p + "down_proj.weight_scale_2"]
    assert (layer.w13_input_scale_E2 == 0.5).all() and (layer.w2_input_scale_E == 0.5).all()


def test_config_readers():
    flat = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16,
            "ignore": ["lm_head", "model.layers.*.self_attn*", "model.layers.2.mlp.experts"]}
    q = read_quantization(flat)
    assert isinstance(q, Nvfp4Config) and q.method == "nvfp4"
    assert q.is_quantized("model.layers.0.mlp.experts") and not q.is_quantized("model.layers.2.mlp.experts")
    assert q.is_quantized("model.layers.12.mlp.experts")  # "layers.2" is not a prefix of "layers.12"
    assert not q.is_quantized("model.layers.0.self_attn.q_proj") and not q.is_quantized("lm_head")
    # group_size under config_groups (compressed-tensors style), quant_algo in lower case
    q = read_quantization({"quant_method": "modelopt", "quant_algo": "nvfp4",
                           "config_groups": {"group_0": {"weights": {"group_size": 16}}}})
    assert q.group_size == 16
    assert read_quantization({**flat, "quant_method": "modelopt_fp4"}) == read_quantization(flat)  # vLLM's name
    nested = {"quant_method": "modelopt", "quantization": {"quant_algo": "NVFP4", "group_size": 16,
                                                           "exclude_modules": ["model.layers.*.mlp.experts*"]}}
    assert not read_quantization(nested).is_quantized("model.layers.5.mlp.experts")
    with pytest.raises(ValueError, match=r"quantization_config.group_size=32 .*allowed: 16"):
        read_quantization({**flat, "group_size": 32})
    with pytest.raises(ValueError, match=r"quantization_config.quant_algo='FP8' .*'NVFP4'"):
        read_quantization({**flat, "quant_algo": "FP8"})
    with pytest.raises(ValueError, match=r"hf_quant_config.json quantization.quant_algo='W4A8_AWQ'"):
        read_quantization({"quant_method": "modelopt", "quantization": {"quant_algo": "W4A8_AWQ"}})
    with pytest.raises(ValueError, match=r"ignore"):
        read_quantization({**flat, "ignore": [3]})


def test_nvfp4_refusals(tiny, tmp_path):
    """Sizes off the 16-value group, a fused expert layout, packed weights without an NVFP4 quantization and an
    hf_quant_config.json without its section are refused naming the field or the tensor."""
    from moelink.engine.config.checkpoint_headers import check_checkpoint
    from moelink.engine.config.quantization import read_hf_quant_config
    from moelink.moe.expert_weights import Nvfp4Experts

    with pytest.raises(ValueError, match="moe_intermediate_size=40 .*multiple of 16"):
        Nvfp4Experts().create(torch.nn.Module(), 2, 48, 40, torch.float32, "meta")
    with pytest.raises(ValueError, match="per expert"):
        Nvfp4Experts().weight_plan(None, "model.layers.0.mlp.", True, [0], (), ("gate_proj", "up_proj", "down_proj"))
    dst, _ = tiny("qwen3")
    check_checkpoint(ModelConfig.from_pretrained(dst))  # its U8 expert weights pass the header check ...
    cfg = json.loads(open(f"{dst}/config.json").read())
    cfg.pop("quantization_config")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in __import__("pathlib").Path(dst).iterdir():
        if f.name != "config.json":
            (bad / f.name).symlink_to(f)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"experts.\d+.\w+_proj.weight' has dtype 'U8'"):  # ... only when NVFP4
        check_checkpoint(ModelConfig.from_pretrained(str(bad)))
    (tmp_path / "hf_quant_config.json").write_text(json.dumps({"producer": {}}))
    with pytest.raises(ValueError, match="no 'quantization' section"):
        read_hf_quant_config(tmp_path)


_TRITON_RUN = """
import json, sys
import moelink.kernels.triton_moe_nvfp4 as nv
from moelink.engine import LLM, SamplingParams

calls, kernel = [], nv.triton_fused_moe_nvfp4
nv.triton_fused_moe_nvfp4 = lambda *a, **k: calls.append(a[0].dtype) or kernel(*a, **k)  # TritonKernels reads it
llm = LLM(sys.argv[1], dtype="float32", kernels="triton", max_num_seqs=2, max_num_batched_tokens=16,
          num_kv_blocks=16, block_size=4, skip_warmup=True)  # warm-up: tests/kernels/test_triton_warmup.py
ps = json.loads(sys.argv[2])
outs = llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), use_tqdm=False)
print("CALLS", len(calls), set(map(str, calls)))
print("TOKENS", json.dumps([o.outputs[0].token_ids for o in outs]))
"""


@pytest.mark.slow  # a fresh process, and the interpreter runs every kernel of each step
def test_triton_engine_run_matches_reference(tiny):
    """One short engine run with kernels="triton" (the NVFP4 Triton MoE, in the interpreter here: a fresh process,
    since Triton reads TRITON_INTERPRET when a kernel is defined) gives the reference kernels' greedy tokens."""
    import os
    import sys

    from tests.helpers.parity import assert_same, engine_greedy

    dst, _ = tiny("qwen3")
    ps = [_prompts(11)[3]]
    env = interpreter_env() if not torch.cuda.is_available() else dict(os.environ)
    # Forked by the test zygote (torch, transformers imported once), TRITON_INTERPRET and the fast interpreter's
    # sitecustomize taking effect as at an exec'd start (tests/helpers/zygote.py).
    proc = zygote.run([sys.executable, "-c", _TRITON_RUN, dst, json.dumps(ps)], env=env, capture_output=True,
                      text=True, timeout=600, cwd=os.getcwd(), fork_code=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.split("TOKENS", 1)[1])
    calls = proc.stdout.split("CALLS", 1)[1].split("TOKENS")[0]
    assert int(calls.split()[0]) >= 3 and "torch.float32" in calls, calls  # the MoE layer, every step, Triton
    ref = LLM(dst, dtype="float32", kernels="reference", max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=16,
              block_size=4)
    assert_same(got, engine_greedy(ref, ps, max_new=3), ps)


def test_dummy_weights_and_weight_memory(tiny):
    """load_format="dummy" fills NVFP4 experts with valid encodings (positive finite e4m3 scales, the global scale
    putting weights in the float range) and the start-up report counts them as nvfp4 bytes."""
    from moelink.engine.rank.weight_memory import weight_bytes_by_format
    from moelink.kernels.nvfp4 import nvfp4_dequantize
    from moelink.planner.weight_bytes import weight_bytes

    dst, _ = tiny("qwen3")
    cfg = ModelConfig.from_pretrained(dst, dtype="float32")
    model = load_model(cfg, ReferenceKernels(), CPU, load_format="dummy")
    layer = next(m for m in model.modules() if hasattr(m, "w13_q_EFB"))
    s = layer.w13_scale_EFS.float()
    assert (s >= 224).all() and (s <= 448).all()
    w = nvfp4_dequantize(layer.w2_q_EDB, layer.w2_scale_EDS, layer.w2_scale2_E, torch.float64)
    assert 0.01 <= w.abs().max() <= 0.02 and (layer.w2_input_scale_E == 1).all()
    E, F, B = layer.w13_q_EFB.shape
    D, I = 2 * B, F // 2
    assert weight_bytes_by_format(model)["nvfp4"] == E * (weight_bytes("nvfp4", 2 * I, D) + weight_bytes("nvfp4", D, I))
    assert weight_bytes("nvfp4", 2 * I, D) == 2 * I * D // 2 + 2 * I * D // 16


_NVFP4_PARAMS = ("w13_q_EFB", "w13_scale_EFS", "w13_scale2_E2", "w13_input_scale_E2", "w2_q_EDB", "w2_scale_EDS",
                 "w2_scale2_E", "w2_input_scale_E")


@pytest.mark.parametrize("replicas", [[0, 4], []])
def test_rank_reads_its_experts(tiny, replicas):
    """Under EP each rank holds exactly the single-rank rows of its experts (redundant replicas included) in its
    local slot order, every NVFP4 tensor alike (all per slot: EPLB can move them), and reads no other expert's
    tensors; an EP rank with no tokens runs its experts on an empty batch."""
    from moelink.comm.backends import make_all_to_all
    from moelink.moe.layer import ExpertParallel
    from moelink.moe.placement import ExpertPlacement

    dst, _ = tiny("qwen3")
    cfg = ModelConfig.from_pretrained(dst, dtype="float32")
    whole = load_model(cfg, ReferenceKernels(), CPU)
    placement = ExpertPlacement(num_experts=cfg.num_experts, ep_size=2, replicas=replicas)
    for rank in range(2):
        local = placement.experts_on_rank(rank)
        ep = ExpertParallel(rank, 2, placement, make_all_to_all("none", None, 0, 1, "cpu"), placement.to_tensors("cpu"))
        model = load_model(cfg, ReferenceKernels(), CPU, ep)
        plan = model.weight_plan(None)
        others = set(range(cfg.num_experts)) - set(local)
        assert not any(f".experts.{e}." in n for n in plan for e in others)
        mine, full = model.layers[0].moe, whole.layers[0].moe
        for name in _NVFP4_PARAMS:
            a, b = getattr(mine, name), getattr(full, name)[local]
            assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                               b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b), (rank, name)
        # every NVFP4 tensor is stacked per slot, so online EPLB moves an expert whole (moe/expert_move.py)
        from moelink.moe.expert_move import slot_bytes

        assert slot_bytes(mine) == sum(getattr(mine, n)[0].numel() * getattr(mine, n).element_size()
                                       for n in _NVFP4_PARAMS)
    moe = whole.layers[0].moe
    y = moe.expert_format.run(moe.kernels, moe, torch.zeros(0, cfg.hidden_size), torch.zeros(0, 2),
                              torch.zeros(0, 2, dtype=torch.long))
    assert y.shape == (0, cfg.hidden_size)
