"""INT4 experts (issue 44) end to end on CPU: tiny Qwen3-MoE and DeepSeek-V3 (Kimi K2 / K2.5-shaped) checkpoints saved
by transformers, their experts quantized by compressed-tensors' own compressor (pack-quantized W4A16, group 32;
tests/helpers/int4_checkpoints.py), loaded and served by moelink's LLM in float64.

Oracles: symmetric (Kimi K2 Thinking's scheme): transformers itself loading the compressed checkpoint (its
compressed-tensors integration decompresses it; the decompressed bf16-valued weights are exact in float32, the
model then runs in float64). Asymmetric (zero points): transformers 5.24's integration fails to load per-expert zero
points into its fused experts (a CONVERSION error), so the oracle is the checkpoint decompressed by compressed-tensors
(`PackedQuantizationCompressor.decompress`, float64) and loaded by transformers as a float model. GPTQ and AWQ: the
same integers rewritten in their layouts give the compressed-tensors checkpoint's tokens. Kimi K2.5: the DeepSeek-V3
INT4 checkpoint wrapped as KimiK25ForConditionalGeneration (language_model.model.*, a vision tower) serves the same
tokens. Also: the config readers and their refusals, the loaded bytes, EP ranks reading their experts only (every
tensor per slot for EPLB), dummy weights and the weight-memory report."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.config.model import ModelConfig
from moelink.engine.config.quantization import Int4Config, read_quantization, resolve_quantization
from moelink.engine.rank.loader import load_model
from moelink.kernels.ops import ReferenceKernels

from tests.helpers.fp8_checkpoints import hf_greedy_with
from tests.helpers.int4_checkpoints import (awq_checkpoint, decompressed_copy, gptq_checkpoint, int4_checkpoint,
                                            kimi_k25_checkpoint, quantization_config, save_tiny)
from tests.helpers.nvfp4_checkpoints import VOCAB
from tests.helpers.fast_interpreter import interpreter_env
from tests.helpers import zygote

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)

CPU = torch.device("cpu")
MAX_NEW = 5
ENGINE_KW = dict(max_num_seqs=4, max_num_batched_tokens=40, num_kv_blocks=64, block_size=8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny(name, symmetric, scope) -> the compressed-tensors INT4 checkpoint (group 32)."""
    built: dict = {}

    def get(name: str, symmetric: bool = True, scope: str = "experts"):
        key = (name, symmetric, scope)
        if key not in built:
            if (name, "float") not in built:
                built[(name, "float")] = save_tiny(tmp_path_factory.mktemp(f"{name}_float"), name)
            root = tmp_path_factory.mktemp(f"{name}_int4_{'sym' if symmetric else 'asym'}_{scope}")
            built[key] = int4_checkpoint(built[(name, "float")], root / "int4", symmetric, 32, scope)
        return built[key]

    return get


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(L)] for L in (1, 23, rng.randint(2, 12))]


def _greedy(path: str, prompts) -> list[list[int]]:
    llm = LLM(path, dtype="float64", **ENGINE_KW)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("name,symmetric,scope", [("dsv3", True, "experts"), ("qwen3", True, "all"),
                                                  ("qwen3", False, "experts"), ("dsv3", False, "all")])
def test_greedy_equals_transformers(tiny, tmp_path, name, symmetric, scope):
    """scope "all": attention, dense and shared MLPs INT4 too (dequantized at load, engine/rank/int4_linears.py)."""
    from transformers import AutoModelForCausalLM

    dst = tiny(name, symmetric, scope)
    cfg = ModelConfig.from_pretrained(dst, dtype="float64")
    assert isinstance(cfg.quantization, Int4Config) and cfg.quantization.symmetric == symmetric
    prompts = _prompts(len(name) + symmetric)
    got = _greedy(dst, prompts)
    assert len({t for g in got for t in g}) > 3, "degenerate model"
    if symmetric:  # transformers' own compressed-tensors integration decompresses the checkpoint
        hf = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float64, experts_implementation="eager")
        hf = hf.to(torch.float64).eval()
    else:  # decompressed by compressed-tensors, loaded as float (module docstring: why)
        hf = AutoModelForCausalLM.from_pretrained(decompressed_copy(dst, tmp_path / "deq"), dtype=torch.float64,
                                                  experts_implementation="eager").eval()
    assert got == hf_greedy_with(hf, prompts, MAX_NEW)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_and_awq_layouts_give_the_same_tokens(tiny, tmp_path, symmetric):
    """The same integers in GPTQ's (v1 zeros, qweight packed along K, transposed) and AWQ's (packed along N in its
    nibble order) layouts are rewritten at load into the same experts: identical weights, identical tokens."""
    dst = tiny("qwen3", symmetric, "all")
    prompts = _prompts(7)[:2]
    want = _greedy(dst, prompts)
    gptq = gptq_checkpoint(dst, tmp_path / "gptq", symmetric, 32)
    assert _greedy(gptq, prompts) == want
    a = load_model(ModelConfig.from_pretrained(dst, dtype="float64"), ReferenceKernels(), CPU)
    b = load_model(ModelConfig.from_pretrained(gptq, dtype="float64"), ReferenceKernels(), CPU)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    if not symmetric:  # AWQ is asymmetric by construction
        awq = awq_checkpoint(dst, tmp_path / "awq", symmetric, 32)
        assert _greedy(awq, prompts) == want
        c = load_model(ModelConfig.from_pretrained(awq, dtype="float64"), ReferenceKernels(), CPU)
        for (n, p), (_, q) in zip(a.named_parameters(), c.named_parameters()):
            assert torch.equal(p, q), n


def test_kimi_k25_serves_its_text_model(tiny, tmp_path):
    """A Kimi K2.5 checkpoint (KimiK25ForConditionalGeneration: text model under language_model.model., head
    language_model.lm_head.weight, a vision tower beside) runs as its DeepSeek-V3 text model: the tokens of the text
    checkpoint, the vision tower not read, an image request refused naming the text model."""
    dst = tiny("dsv3", True, "experts")
    k25 = kimi_k25_checkpoint(dst, tmp_path / "k25")
    cfg = ModelConfig.from_pretrained(k25, dtype="float64")
    assert cfg.architecture == "DeepseekV3ForCausalLM" and cfg.text_weights_prefix == "language_model.model."
    assert isinstance(cfg.quantization, Int4Config) and cfg.quantization.text_prefix == "language_model.model."
    prompts = _prompts(3)[:2]
    assert _greedy(k25, prompts) == _greedy(dst, prompts)
    from moelink.engine.config.checkpoint_headers import text_model_name

    assert text_model_name("language_model.lm_head.weight", cfg.text_weights_prefix) == "lm_head.weight"
    assert text_model_name("vision_tower.patch_embed.proj.weight", cfg.text_weights_prefix) is None
    assert text_model_name("mm_projector.proj.0.weight", cfg.text_weights_prefix) is None


def test_loaded_bytes_and_zero_points(tiny):
    """weight_packed is copied as it is (gate rows, then up), scales in the model dtype, and compressed-tensors'
    zero points (packed along N) unpacked into uint8 per (row, group)."""
    from safetensors.torch import load_file

    from moelink.kernels.int4 import unpack_rows

    dst = tiny("qwen3", False, "experts")
    t = {}
    for f in Path(dst).glob("*.safetensors"):
        t.update(load_file(str(f)))
    model = load_model(ModelConfig.from_pretrained(dst, dtype="float64"), ReferenceKernels(), CPU)
    layer = model.layers[0].moe
    I = layer.w13_q_EFW.shape[1] // 2
    p = "model.layers.0.mlp.experts.4."
    assert torch.equal(layer.w13_q_EFW[4, I:], t[p + "up_proj.weight_packed"])
    assert torch.equal(layer.w2_s_EDS[4], t[p + "down_proj.weight_scale"].double())
    assert torch.equal(layer.w13_z_EFS[4, :I], unpack_rows(t[p + "gate_proj.weight_zero_point"], I))
    assert layer.w13_z_EFS.dtype == torch.uint8 and int(layer.w13_z_EFS.max()) <= 15


_INT4_PARAMS = ("w13_q_EFW", "w13_s_EFS", "w13_z_EFS", "w2_q_EDW", "w2_s_EDS", "w2_z_EDS")


def test_rank_reads_its_experts(tiny):
    """Under EP each rank holds exactly the single-rank rows of its experts (a redundant replica included), every
    INT4 tensor stacked per slot (online EPLB moves them whole), and reads no other expert's tensors."""
    from moelink.comm.backends import make_all_to_all
    from moelink.moe.expert_move import slot_bytes
    from moelink.moe.layer import ExpertParallel
    from moelink.moe.placement import ExpertPlacement

    dst = tiny("qwen3", False, "experts")
    cfg = ModelConfig.from_pretrained(dst, dtype="float32")
    whole = load_model(cfg, ReferenceKernels(), CPU)
    placement = ExpertPlacement(num_experts=cfg.num_experts, ep_size=2, replicas=[0])
    for rank in range(2):
        local = placement.experts_on_rank(rank)
        ep = ExpertParallel(rank, 2, placement, make_all_to_all("none", None, 0, 1, "cpu"), placement.to_tensors("cpu"))
        model = load_model(cfg, ReferenceKernels(), CPU, ep)
        plan = model.weight_plan(None)
        assert not any(f".experts.{e}." in n for n in plan for e in set(range(cfg.num_experts)) - set(local))
        mine, full = model.layers[0].moe, whole.layers[0].moe
        for name in _INT4_PARAMS:
            assert torch.equal(getattr(mine, name), getattr(full, name)[local]), (rank, name)
        assert slot_bytes(mine) == sum(getattr(mine, n)[0].numel() * getattr(mine, n).element_size()
                                       for n in _INT4_PARAMS)


def test_dummy_weights_and_weight_memory(tiny):
    """load_format="dummy" makes INT4 experts (any words, positive scales, zero points) that run, and the start-up
    report counts them as int4 bytes: half a byte a weight, a scale per 32 in the model dtype, a uint8 zero point."""
    from moelink.engine.rank.weight_memory import weight_bytes_by_format
    from moelink.planner.weight_bytes import weight_bytes

    dst = tiny("qwen3", False, "experts")
    model = load_model(ModelConfig.from_pretrained(dst, dtype="float32"), ReferenceKernels(), CPU,
                       load_format="dummy")
    layer = model.layers[0].moe
    assert (layer.w13_s_EFS > 0).all() and layer.w13_z_EFS.max() <= 15
    E, F, W = layer.w13_q_EFW.shape
    D, I = 8 * W, F // 2
    got = weight_bytes_by_format(model)["int4"]
    assert got == E * (weight_bytes("int4", 2 * I, D, float_bytes=4, zero_points=True)
                       + weight_bytes("int4", D, I, float_bytes=4, zero_points=True))
    assert got == E * 3 * I * D * (0.5 + 5 / 32)
    y = layer.expert_format.run(layer.kernels, layer, torch.randn(3, D), torch.full((3, 2), 0.5),
                                torch.tensor([[0, 1], [2, 3], [4, 5]]))
    assert torch.isfinite(y).all() and y.abs().max() > 0


def test_config_readers_and_refusals():
    """compressed-tensors' own validation, the INT4 scheme pulled out, Kimi's ignore patterns; GPTQ / AWQ; every
    scheme moelink does not run refused naming the field; --quantization int4 refused with the reason."""
    kimi = quantization_config(True, 32, ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                                          r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"])
    q = read_quantization(kimi)
    assert isinstance(q, Int4Config) and (q.group_size, q.symmetric, q.layout) == (32, True, "compressed-tensors")
    assert q.is_quantized("model.layers.3.mlp.experts") and not q.is_quantized("model.layers.3.self_attn.q_proj")
    ignored = read_quantization({**kimi, "ignore": ["re:.*layers\\.3\\.mlp\\.experts.*"]})
    assert not ignored.is_quantized("model.layers.3.mlp.experts") and ignored.is_quantized("model.layers.4.mlp.experts")
    w = kimi["config_groups"]["group_0"]["weights"]
    bad = lambda **kw: {**kimi, "config_groups": {"group_0": {**kimi["config_groups"]["group_0"],  # noqa: E731
                                                              "weights": {**w, **kw}}}}
    with pytest.raises(ValueError, match=r"quantization_config.format='float-quantized' .*pack-quantized"):
        read_quantization({**kimi, "format": "float-quantized"})
    with pytest.raises(ValueError, match=r"actorder='group'"):
        read_quantization(bad(actorder="group"))
    with pytest.raises(ValueError, match=r"weights.strategy='channel'"):
        read_quantization(bad(strategy="channel", group_size=None))
    with pytest.raises(ValueError, match=r"int 8-bit"):
        read_quantization(bad(num_bits=8))
    with pytest.raises(ValueError, match=r"group_size=16 .*32, 64, 128"):
        read_quantization(bad(group_size=16))
    with pytest.raises(ValueError, match=r"input_activations"):
        read_quantization({**kimi, "config_groups": {"group_0": {**kimi["config_groups"]["group_0"],
                           "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}}}})
    # Issue 53: a `re:` entry that does not compile, refused as the config is read (before: re.error at load).
    with pytest.raises(ValueError, match=r"quantization_config\.ignore='re:\(' is not supported \(its pattern does not "
                                         r"compile: missing \), unterminated subpattern.*\): allowed: module names"):
        read_quantization({**kimi, "ignore": [*kimi["ignore"], "re:("]})
    with pytest.raises(ValueError, match=r"quantization_config\.config_groups\.group_0\.targets='re:\[' is not "
                                         r"supported \(its pattern does not compile"):
        read_quantization({**kimi, "config_groups": {"group_0": {**kimi["config_groups"]["group_0"],
                                                                 "targets": ["re:["]}}})
    with pytest.raises(ValueError, match="not a valid compressed-tensors config"):
        read_quantization({**kimi, "config_groups": {"group_0": {"weights": {"num_bits": "x"}}}})
    g = read_quantization({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True})
    assert (g.layout, g.group_size, g.symmetric, g.gptq_v1) == ("gptq", 128, True, True)
    with pytest.raises(ValueError, match=r"desc_act=True .*act-order"):
        read_quantization({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True})
    with pytest.raises(ValueError, match=r"bits=8"):
        read_quantization({"quant_method": "gptq", "bits": 8, "group_size": 128})
    with pytest.raises(ValueError, match=r"group_size=-1"):
        read_quantization({"quant_method": "gptq", "bits": 4, "group_size": -1})
    a = read_quantization({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"})
    assert (a.layout, a.symmetric) == ("awq", False)
    with pytest.raises(ValueError, match=r"version='gemv'"):
        read_quantization({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"})
    for asked in ("int4", "gptq", "awq"):
        with pytest.raises(ValueError, match=rf"quantization='{asked}' is invalid: INT4 weights are read as published"):
            resolve_quantization(None, asked)
    with pytest.raises(ValueError, match="already quantized with 'int4'"):
        resolve_quantization(q, "fp8")


def test_int4_refusals(tiny, tmp_path):
    from moelink.moe.expert_weights_int4 import Int4Experts

    with pytest.raises(ValueError, match="moe_intermediate_size=48 .*group size 32"):
        Int4Experts(32, True).create(torch.nn.Module(), 2, 64, 48, torch.float32, "meta")
    with pytest.raises(ValueError, match="per expert"):
        Int4Experts(32, True).weight_plan(None, "model.layers.0.mlp.", True, [0], (), ("gate_proj", "up_proj",
                                                                                        "down_proj"))
    dst = tiny("qwen3", True, "experts")
    cfg = json.loads((Path(dst) / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 64
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in Path(dst).iterdir():
        if f.name != "config.json":
            (bad / f.name).symlink_to(f)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"moe_intermediate_size=32 .*group size 64"):
        LLM(str(bad), dtype="float32", **ENGINE_KW)


@pytest.mark.parametrize("what, message", [
    # Issue 53: nothing read weight_shape; 2^30 rows loaded without a word.
    ("weight_shape", r"checkpoint tensor 'model\.layers\.0\.mlp\.experts\.1\.down_proj\.weight_shape' holds "
                     r"\[1073741824, 32\]: it must be the expert linear's shape \[64, 32\] \(config\.json "
                     r"moe_intermediate_size=32, hidden_size=64\)"),
    # Issue 53: a float weight_packed of the right shape was cast into the int32 words (garbage) without a word.
    ("float_packed", r"checkpoint tensor 'model\.layers\.0\.mlp\.experts\.1\.down_proj\.weight_packed' has dtype "
                     r"'F32' in its header: an INT4 packed weight \(compressed-tensors\) must be I32"),
    # Outside the experts (scope "all"): the shape its packed tensor unpacks to.
    ("linear_shape", r"checkpoint tensor 'model\.layers\.0\.self_attn\.q_proj\.weight_shape' holds \[1073741824, 64\]: "
                     r"it must be the shape its 'model\.layers\.0\.self_attn\.q_proj\.weight_packed' \[64, 8\] unpacks "
                     r"to \(\[64, 64\]"),
])
def test_int4_tensors_are_checked_before_anything_is_sized(tiny, tmp_path, what, message):
    from safetensors.torch import load_file, save_file

    from moelink.engine.config.engine_args import EngineArgs

    src = Path(tiny("qwen3", True, "all" if what == "linear_shape" else "experts"))
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (bad / f.name).symlink_to(f)
    for f in src.glob("*.safetensors"):
        ts = load_file(str(f))
        base = "model.layers.0.mlp.experts.1.down_proj."
        if base + "weight_packed" in ts:
            assert ts[base + "weight_shape"].tolist() == [64, 32]  # [hidden, expert width]: the down projection
            if what == "weight_shape":
                ts[base + "weight_shape"] = torch.tensor([1 << 30, 32])
            elif what == "float_packed":
                ts[base + "weight_packed"] = ts[base + "weight_packed"].view(torch.float32).clone()
        if what == "linear_shape" and "model.layers.0.self_attn.q_proj.weight_shape" in ts:
            ts["model.layers.0.self_attn.q_proj.weight_shape"] = torch.tensor([1 << 30, 64])
        save_file(ts, str(bad / f.name), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=message):
        EngineArgs(model=str(bad), dtype="float32", device="cpu", num_kv_blocks=16).create_engine_config()


_TRITON_RUN = """
import json, sys
import moelink.kernels.triton_moe_int4 as m
from moelink.engine import LLM, SamplingParams

calls, kernel = [], m.triton_fused_moe_int4
m.triton_fused_moe_int4 = lambda *a, **k: calls.append(a[0].shape[0]) or kernel(*a, **k)  # TritonKernels reads it
llm = LLM(sys.argv[1], dtype="float32", kernels="triton", max_num_seqs=2, max_num_batched_tokens=32,
          num_kv_blocks=16, block_size=4, skip_warmup=True)
ps = json.loads(sys.argv[2])
outs = llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), use_tqdm=False)
print("WORKSPACE", llm.engine.executor.worker.runner.kernels.int4_workspace.nbytes())
print("CALLS", json.dumps(calls))
print("TOKENS", json.dumps([o.outputs[0].token_ids for o in outs]))
"""


@pytest.mark.slow  # a fresh process, and the interpreter runs every kernel of each step
def test_triton_engine_run_matches_reference(tiny):
    """One short engine run with kernels="triton" (the INT4 Triton MoE in the interpreter: a 32-token prefill step,
    10.7 rows per expert, through the dequantize-once path into the rank's workspace, a decode through the GEMVs)
    gives the reference kernels' greedy tokens."""
    import os
    import sys

    dst = tiny("qwen3", False, "experts")
    ps = [_prompts(11)[1][:9], _prompts(12)[1][:23]]
    env = interpreter_env() if not torch.cuda.is_available() else dict(os.environ)
    # Forked by the test zygote (torch, transformers imported once), TRITON_INTERPRET and the fast interpreter's
    # sitecustomize taking effect as at an exec'd start (tests/helpers/zygote.py).
    proc = zygote.run([sys.executable, "-c", _TRITON_RUN, dst, json.dumps(ps)], env=env, capture_output=True,
                      text=True, timeout=600, cwd=os.getcwd(), fork_code=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.split("TOKENS", 1)[1])
    calls = json.loads(proc.stdout.split("CALLS", 1)[1].split("TOKENS")[0])
    assert max(calls) == 32 and 2 in calls, calls  # the prefill (dequant path) and a decode (tiny GEMVs)
    E, I, D = 6, 32, 64  # qwen3's tiny experts, in float32: the workspace holds one layer's
    assert int(proc.stdout.split("WORKSPACE", 1)[1].split()[0]) == E * 3 * I * D * 4
    ref = LLM(dst, dtype="float32", kernels="reference", max_num_seqs=2, max_num_batched_tokens=32, num_kv_blocks=16,
              block_size=4)
    outs = ref.generate(ps, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert got == [o.outputs[0].token_ids for o in outs]


def test_config_reading_knows_the_group_sizes_the_kernels_take():
    from moelink.engine.config.quantization_int4 import INT4_GROUP_SIZES
    from moelink.kernels.int4 import GROUP_SIZES

    assert INT4_GROUP_SIZES == GROUP_SIZES
