"""Which layers and steps take the decode fusions (engine/models/gqa_input.py FusedInput, engine/models/fused_output.py
FusedOutput): every layer kind the one-launch forms cannot compute keeps the unfused path, and every per-step
condition (batch size, a LoRA adapter set after build, a projection's method and FP8 block, a row-parallel o_proj,
the device) is asked each step. Host-side objects only: no kernel runs."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moelink.engine.models.fused_output import FusedOutput
from moelink.engine.models.gqa_input import FusedInput
from moelink.engine.models.linear import FloatLinear, Fp8Linear
from moelink.engine.tp.linear import Replicated, RowParallel
from moelink.kernels.norm import FUSED_MAX_TOKENS


def _proj(rows: int, pieces_total: int | None = None):
    return SimpleNamespace(in_features=64, rows=rows, out_features=pieces_total or rows, lora=None,
                           method=FloatLinear(), parallel=Replicated())


def _layer(**over):
    """A plain Qwen3-like GQA layer (4 query heads, 2 kv heads of 16) as FusedInput reads it, `over` on top."""
    layer = SimpleNamespace(kernels=SimpleNamespace(name="triton"), rope=SimpleNamespace(style="neox"),
                            qkv_proj=_proj(128), o_proj=_proj(64), num_heads=4, num_kv_heads=2, head_dim=16,
                            v_head_dim=16, rotary=True, output_gate=False, all_heads_norm=False, value_scale=1.0,
                            clip_qkv=None, norm_after_rope=False)
    for k, v in over.items():
        setattr(layer, k, v)
    return layer


def test_a_plain_gqa_layer_holds_it():
    assert isinstance(FusedInput.for_layer(_layer(), 64, "cpu", plain=True), FusedInput)


@pytest.mark.parametrize("over,plain", [
    (dict(kernels=SimpleNamespace(name="reference")), True),  # the CPU path: its own one-call ops
    (dict(kernels=SimpleNamespace(name="batch_invariant")), True),  # fixed tiles at every batch, not these
    ({}, False),  # a kind that attends or projects its own way (block-sparse, QSA)
    (dict(rope=SimpleNamespace(style="gptj")), True),  # a rotary layout the epilogue does not rotate
    (dict(rotary=False), True),  # a NoPE layer
    (dict(output_gate=True), True),  # Qwen3-Next's gated q_proj
    (dict(all_heads_norm=True), True),  # MiniMax-M2's q/k norm over every head
    (dict(value_scale=0.5), True),  # MiMo-V2-Flash's scaled values
    (dict(clip_qkv=8.0), True),  # OLMoE's / DBRX's q/k/v clamp
    (dict(norm_after_rope=True), True),  # HunYuan-MoE-V1's q/k norm after the rotary
    (dict(qkv_proj=_proj(136, 128)), True),  # gaps between the stacked pieces (FP8 blocks)
    (dict(head_dim=12, v_head_dim=12), True),  # no block of 8-64 rows divides the heads
], ids=["reference", "batch-invariant", "subclass", "gptj-rope", "nope", "output-gate", "all-heads-norm",
        "value-scale", "clip-qkv", "norm-after-rope", "gaps", "head-12"])
def test_layers_the_fused_input_cannot_compute_keep_the_unfused_path(over, plain):
    assert FusedInput.for_layer(_layer(**over), 64, "cpu", plain=plain) is None
    assert FusedInput.for_layer(_layer(), 128, "cpu", plain=True) is None  # an EAGLE-3 head's wider input


def test_each_step_asks_again():
    fused = FusedInput.for_layer(_layer(), 64, "cpu", plain=True)
    assert fused is not None
    x = torch.zeros(FUSED_MAX_TOKENS, 64)
    assert fused.takes(x) and fused.takes_output(x)
    assert not fused.takes(torch.zeros(FUSED_MAX_TOKENS + 1, 64)) and not fused.takes(torch.zeros(0, 64))
    assert not fused.takes(x.double())  # the Triton kernels take float32 / bfloat16 / float16
    fused.attn.qkv_proj.lora = object()  # an adapter loaded after build: its hook runs after the matmul
    assert not fused.takes(x)
    fused.attn.qkv_proj.lora = None
    fused.attn.qkv_proj.method = object()  # a method the GEMV does not read (INT4, ...)
    assert not fused.takes(x)
    fused.attn.qkv_proj.method, fused.attn.qkv_proj.weight_scale_inv = Fp8Linear((128, 128)), "scales"
    assert fused.takes(x) and fused.weight() == dict(w_scale_inv="scales", block=(128, 128))  # W8A8, one launch
    fused.attn.qkv_proj.method = Fp8Linear((12, 128))  # no program of 8-16 rows fits a 12-row scale block
    assert not fused.takes(x)
    fused.attn.qkv_proj.method = Fp8Linear((128, 96))  # a K group the Triton FP8 kernels do not tile
    assert not fused.takes(x)
    fused.attn.qkv_proj.method = FloatLinear()
    assert fused.weight() == {}
    fused.attn.o_proj.parallel = RowParallel(SimpleNamespace(), 0, 64)  # all-reduces before the residual add
    assert fused.takes(x) and not fused.takes_output(x)
    fused.attn.o_proj.parallel = Replicated()
    fused.attn.o_proj.lora = object()
    assert fused.takes(x) and not fused.takes_output(x)


def test_the_output_fusion_alone():
    """MLA's fusion: taken exactly when its output launch is, on the Triton kernels, for a plain mixer."""
    o_proj = _proj(64)
    assert FusedOutput.for_mixer(SimpleNamespace(name="reference"), o_proj, "cpu", plain=True) is None
    assert FusedOutput.for_mixer(SimpleNamespace(name="triton"), o_proj, "cpu", plain=False) is None
    out = FusedOutput.for_mixer(SimpleNamespace(name="triton"), o_proj, "cpu", plain=True)
    assert out is not None and not out.counters_T.any()
    x = torch.zeros(2, 64)
    assert out.takes(x) and out.takes_output(x)
    o_proj.method = object()
    assert not out.takes(x)
    o_proj.method, o_proj.weight_scale_inv = Fp8Linear((128, 128)), "scales"
    assert out.takes(x) and out.weight() == dict(w_scale_inv="scales", block=(128, 128))
    o_proj.method = Fp8Linear((4, 128))
    assert not out.takes(x)
    o_proj.method = FloatLinear()
    assert not out.takes(x.double())  # float64 runs the references
    assert not out.takes(torch.zeros(2, 64, device="meta"))  # counters on another device: never fused


def test_which_mlps_and_steps_take_the_two_gemv_launches():
    """engine/models/mlp_fusion.py: a SiLU-gated MLP on the Triton kernels; each step: the batch size, the dtype,
    a LoRA adapter, a tensor-parallel split, an FP8 block the GEMV cannot tile."""
    from moelink.engine.models.mlp_fusion import FusedMLP

    gu, down = _proj(96), _proj(64)
    assert FusedMLP.for_mlp(SimpleNamespace(name="reference"), gu, down, 48, silu=True) is None
    assert FusedMLP.for_mlp(SimpleNamespace(name="triton"), gu, down, 48, silu=False) is None  # a family's activation
    mlp = FusedMLP.for_mlp(SimpleNamespace(name="triton"), gu, down, 48, silu=True)
    assert mlp is not None
    x = torch.zeros(FUSED_MAX_TOKENS, 64)
    assert mlp.takes(x) and not mlp.takes(torch.zeros(FUSED_MAX_TOKENS + 1, 64)) and not mlp.takes(x.double())
    for proj in (gu, down):
        proj.lora = object()
        assert not mlp.takes(x)
        proj.lora = None
        proj.parallel = RowParallel(SimpleNamespace(), 0, 48)
        assert not mlp.takes(x)
        proj.parallel = Replicated()
        proj.method, proj.weight_scale_inv = Fp8Linear((128, 128)), "scales"
        assert mlp.takes(x)
        proj.method = Fp8Linear((12, 128))
        assert not mlp.takes(x)
        proj.method = FloatLinear()
    assert mlp.takes(x)
