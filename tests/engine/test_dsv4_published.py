"""DeepSeek-V4 checkpoints in the format DeepSeek publishes V4-Flash / V4-Pro in (issue 45 item 4): FP8 e4m3
linears with ue8m0 block scales (`.scale`), FP4 (e2m1, ue8m0 per 32) routed experts, published tensor names
(tests/helpers/dsv4_published.py quantizes the tiny float checkpoint with the format's own rules).

The FP8 linears (attention's, the indexer's wq_b, the shared expert's) are held FP8 and run W8A8. The oracle is
transformers running the dequantized weights (exact in float64) with the W8A8 activation rounding at the inputs of
those linears (tests/helpers/dsv4_published.fake_quant_dsv4, as tests/engine/test_fp8_checkpoints.py does for
DeepSeek-V3): moelink's greedy tokens equal it token for token, while they differ from the float model's (the
quantization is really there). Blocks of 16 x 16 (published: 128 x 128) so the tiny linears span several scale blocks
(and wo_a's groups of 8 rows split a block: its scales held in rows of 8); moe_intermediate_size 32 (FP4 needs K a
multiple of 32)."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from moelink.engine import LLM
from moelink.engine.models.deepseek_v4.reader import DSV4Quantization
from moelink.engine.config.model import ModelConfig
from moelink.engine.config.quantization import Fp8Config
from moelink.engine.models.linear import Linear
from moelink.engine.rank.loader import load_model
from moelink.kernels.fp8 import FP8_DTYPE, block_dequantize
from moelink.kernels.ops import ReferenceKernels
from moelink.moe.expert_weights_mxfp4_split import PackedBytes

from tests.helpers.dsv4_checkpoint import VOCAB, save_dsv4_checkpoint
from tests.helpers.dsv4_published import fake_quant_dsv4, write_published_dsv4
from tests.helpers.fp8_checkpoints import hf_greedy_with
from tests.helpers.parity import MAX_NEW, assert_pool_free, assert_same, engine_greedy, hf_greedy, prompts

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def float_path(tmp_path_factory) -> str:
    return save_dsv4_checkpoint(tmp_path_factory.mktemp("dsv4_float"), moe_intermediate_size=32)


@pytest.fixture(scope="module")
def fp4(float_path, tmp_path_factory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("dsv4_fp4")
    return write_published_dsv4(float_path, d / "published", d / "oracle")


def _engine(path: str) -> LLM:
    return LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=48, num_kv_blocks=160, block_size=8)


def test_config_reads_the_published_formats(fp4):
    cfg = ModelConfig.from_pretrained(fp4[0], dtype="float64")
    assert cfg.quantization == Fp8Config((16, 16))
    from moelink.engine.models.deepseek_v4.reader import read_dsv4_quantization

    assert read_dsv4_quantization(cfg.architecture, cfg.hf_config, cfg.quantization) == DSV4Quantization(
        (16, 16), "fp4", "ue8m0")


@pytest.mark.parametrize("edit,match", [
    (lambda r: r.update(expert_dtype="int4"), r"quantization_config.expert_dtype='int4'.*allowed: 'fp4', 'fp8'"),
    (lambda r: r["quantization_config"].update(scale_fmt="e5m2"), r"quantization_config.scale_fmt='e5m2'"),
    (lambda r: r["quantization_config"].update(modules_to_not_convert=["attn"]),
     r"quantization_config.modules_to_not_convert=\['attn'\] is not supported"),
    (lambda r: r.update(quantization_config={"quant_method": "mxfp4"}), r"quant_method='mxfp4' is not supported"),
    (lambda r: r.pop("quantization_config"), r"expert_dtype='fp4' is invalid .* without quantization_config"),
], ids=["expert_dtype", "scale_fmt", "modules_to_not_convert", "quant_method", "fp4_without_fp8"])
def test_other_formats_are_refused_naming_the_field(fp4, tmp_path, edit, match):
    shutil.copytree(fp4[0], tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    edit(raw)
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(str(tmp_path / "m"), dtype="float64")


def test_fp4_experts_stay_packed_and_fp8_linears_stay_fp8(fp4):
    """The experts hold the file's bytes unchanged (w1 -> gate rows, w3 -> up rows, w2); an FP8 linear holds the
    file's e4m3 bytes and its ue8m0 scales as float32 (dequantized: the oracle's weight); the float tensors are
    copied."""
    cfg = ModelConfig.from_pretrained(fp4[0], dtype="float64")
    model = load_model(cfg, ReferenceKernels(), CPU)
    file = load_file(f"{fp4[0]}/model.safetensors")
    moe, inter = model.layers[3].moe, cfg.moe_intermediate_size
    assert moe.w13_blocks_EFSQ.dtype == torch.uint8 and moe.w13_blocks_EFSQ.shape == (6, 2 * inter, 1, 16)
    for e in (0, 4):
        p = f"layers.3.ffn.experts.{e}."
        gate, up = moe.w13_blocks_EFSQ[e, :inter], moe.w13_blocks_EFSQ[e, inter:]
        assert torch.equal(gate.reshape(inter, -1), file[p + "w1.weight"].view(torch.uint8))
        assert torch.equal(up.reshape(inter, -1), file[p + "w3.weight"].view(torch.uint8))
        assert torch.equal(moe.w2_scales_EDS[e], file[p + "w2.scale"].view(torch.uint8))
    w, s = file["layers.1.attn.wq_b.weight"], file["layers.1.attn.wq_b.scale"]
    assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu and s.shape == (4, 1)
    wq_b = model.layers[1].attn.wq_b
    assert wq_b.weight.dtype == FP8_DTYPE and torch.equal(wq_b.weight.view(torch.uint8), w.view(torch.uint8))
    assert wq_b.weight_scale_inv.dtype == torch.float32 and torch.equal(wq_b.weight_scale_inv, s.float())
    oracle = load_file(f"{fp4[1]}/model.safetensors")
    for i, name, block in [(1, "wq_b", (16, 16)), (1, "wo_a", (8, 16)), (1, "wq_idx", (16, 16)), (2, "wo_b", (16, 16))]:
        lin = getattr(model.layers[i].attn, name)  # wo_a: 2 groups of 8 rows, scales held in rows of 8
        hf_name = {"wq_idx": "indexer.wq_b"}.get(name, name)
        assert lin.method.block == block, name
        assert torch.equal(block_dequantize(lin.weight, lin.weight_scale_inv, block, torch.float64),
                           oracle[f"model.layers.{i}.attn.{hf_name}.weight"]), name
    w2 = model.layers[3].shared.w2
    assert torch.equal(block_dequantize(w2.weight, w2.weight_scale_inv, (16, 16), torch.float64),
                       oracle["model.layers.3.ffn.shared_experts.w2.weight"])
    assert torch.equal(model.layers[1].attn.compressor.wkv_CD, file["layers.1.attn.compressor.wkv.weight"])


FP8_NAMES = re.compile(r"\.(wq_a|wq_b|wkv|wo_a|wo_b|wq_idx|w1|w2|w3)\.")


def _linear_bytes(model) -> tuple[int, int]:
    """(bytes of the attention's and shared expert's Linears, bytes of every attention and shared-expert parameter)."""
    lin = sum(p.numel() * p.element_size() for m in model.modules() if isinstance(m, Linear) for p in m.parameters())
    every = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".attn." in n or ".shared." in n)
    return lin, every


def test_fp8_linears_hold_no_float_copy_and_half_the_bytes(fp4, float_path):
    """Every FP8 linear (5 of attention and 3 of the shared expert a layer, the indexer's wq_b on the 2 CSA layers) is
    float8_e4m3fn + float32 block scales and nothing else holds a float copy; against the float model in bf16 their
    bytes are about half (1 byte a weight + 4 bytes per 16 x 16 block, 8 x 16 for wo_a: 0.51 here, 0.5001 in 128 x
    128 blocks). The float checkpoint keeps plain float weights."""
    published = load_model(ModelConfig.from_pretrained(fp4[0], dtype="bfloat16"), ReferenceKernels(), CPU)
    linears = {n: m for n, m in published.named_modules() if isinstance(m, Linear)}
    assert len(linears) == 8 * 4 + 2
    for n, m in linears.items():
        assert {k: p.dtype for k, p in m.named_parameters()} == {"weight": FP8_DTYPE, "weight_scale_inv": torch.float32}
    held = (FP8_DTYPE, torch.float32)
    assert not [n for n, p in published.named_parameters() if FP8_NAMES.search(n) and p.dtype not in held]
    floats = load_model(ModelConfig.from_pretrained(float_path, dtype="bfloat16"), ReferenceKernels(), CPU)
    assert {p.dtype for m in floats.modules() if isinstance(m, Linear) for p in m.parameters()} == {torch.bfloat16}
    (fp8_lin, fp8_all), (bf16_lin, bf16_all) = _linear_bytes(published), _linear_bytes(floats)
    print(f"\nattention + shared expert linears: {fp8_lin} B FP8 vs {bf16_lin} B bf16 ({fp8_lin / bf16_lin:.3f}x); "
          f"with the float compressors, norms and sinks: {fp8_all} B vs {bf16_all} B ({fp8_all / bf16_all:.3f}x)")
    assert fp8_lin < 0.52 * bf16_lin and fp8_all < bf16_all


def test_wo_a_scales_held_finer_refuse_a_file_scale_of_another_shape():
    """wo_a of 2 groups of 8 rows in 16-row file blocks holds [2, Kb] scales from the file's [1, Kb]; a file scale of
    any other shape is refused naming it (repeating and cutting it would hide a wrong file)."""
    from moelink.engine.models.deepseek_v4.weights import dsv4_linear_method, published_linear_plan

    wo_a = Linear(32, 16, dsv4_linear_method(DSV4Quantization((16, 16)), group_rows=8), ReferenceKernels(),
                  torch.float64)
    entry = published_linear_plan(wo_a, "layers.1.attn.wo_a.weight", 16)["layers.1.attn.wo_a.scale"]
    entry.dest.put(torch.tensor([[0.5, 2.0]]).to(torch.float8_e8m0fnu), CPU)
    assert wo_a.weight_scale_inv.tolist() == [[0.5, 2.0], [0.5, 2.0]]
    with pytest.raises(ValueError, match=r"'layers.1.attn.wo_a.scale' has shape \(2, 2\), expected \(1, 2\)"):
        entry.dest.put(torch.ones(2, 2), CPU)


def test_an_expert_rank_reads_only_its_experts(fp4):
    from moelink.comm.backends import make_all_to_all
    from moelink.moe.layer import ExpertParallel
    from moelink.moe.placement import ExpertPlacement

    cfg = ModelConfig.from_pretrained(fp4[0], dtype="float64")
    placement = ExpertPlacement(num_experts=6, ep_size=2)
    ep = ExpertParallel(1, 2, placement, make_all_to_all("none", None, 0, 1, "cpu"), placement.to_tensors("cpu"))
    read: dict[str, int] = {}
    model = load_model(cfg, ReferenceKernels(), CPU, ep, read_bytes=read)
    experts = {int(n.split(".experts.")[1].split(".")[0]) for n in read if ".experts." in n}
    assert experts == {3, 4, 5} and model.layers[2].moe.w2_blocks_EDSQ.shape[0] == 3
    # packed: an expert's w1 is I x D/2 bytes (16 x 16) and its scale I x D/32
    assert read["layers.2.ffn.experts.3.w1.weight"] == 32 * 16 and read["layers.2.ffn.experts.3.w1.scale"] == 32


def test_a_packed_tensor_of_another_dtype_is_refused():
    dest = torch.zeros(4, 1, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="'x.weight' is torch.float16: DeepSeek-V4's FP4 experts hold packed"):
        PackedBytes(dest, "x.weight").put(torch.zeros(4, 16, dtype=torch.float16), CPU)
    with pytest.raises(ValueError, match=r"'x.weight' has shape \(4, 8\), expected \(4, 16\)"):
        PackedBytes(dest, "x.weight").put(torch.zeros(4, 8, dtype=torch.int8), CPU)
    PackedBytes(dest, "x.weight").put(torch.full((4, 16), 7, dtype=torch.int8), CPU)
    assert bool((dest == 7).all())
    # torch's own packed-FP4 dtype (safetensors F4) holds the same bytes
    PackedBytes(dest, "x.weight").put(torch.full((4, 16), 0x21, dtype=torch.uint8).view(torch.float4_e2m1fn_x2), CPU)
    assert bool((dest == 0x21).all())


@pytest.mark.slow
def test_fp4_checkpoint_greedy_equals_transformers_on_dequantized_weights(fp4, float_path):
    """Prompts of 1..150 tokens (every compression boundary, the window, the indexer's top-k), chunked and
    batched: the FP4 experts run through the MXFP4 kernels' reference, the FP8 linears W8A8 (the oracle rounds their
    inputs the same way)."""
    ps = prompts(VOCAB, seed=42, n=5, lo=1, hi=150)
    llm = _engine(fp4[0])
    got = engine_greedy(llm, ps)
    assert_same(got, hf_greedy_with(fake_quant_dsv4(fp4[1], (16, 16)), ps, MAX_NEW), ps)
    assert got != hf_greedy(float_path, ps), "the quantized model answers as the float one: nothing was quantized"
    assert_pool_free(llm)


@pytest.mark.slow
def test_fp8_experts_checkpoint_greedy_equals_transformers(float_path, tmp_path):
    """Without expert_dtype the routed experts are FP8 like the linears (DeepSeek's convert.py --expert-dtype fp8):
    dequantized at load (W4A16's float activations: only the linears' inputs are rounded)."""
    pub, oracle = write_published_dsv4(float_path, tmp_path / "published", tmp_path / "oracle", expert_dtype="fp8")
    assert "expert_dtype" not in json.loads((tmp_path / "published" / "config.json").read_text())
    ps = prompts(VOCAB, seed=7, n=3, lo=1, hi=150)
    assert_same(engine_greedy(_engine(pub), ps), hf_greedy_with(fake_quant_dsv4(oracle, (16, 16)), ps, MAX_NEW), ps)
