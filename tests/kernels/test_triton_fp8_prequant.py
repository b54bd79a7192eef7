"""Issue 80's FP8 decode form: x quantized by the norm before the MoE (kernels/triton_norm.py
`triton_add_rms_norm_fp8`) and h quantized inside the gate-up launch (kernels/triton_moe_fp8_tiny.py
`_quant_h_group`), so the FP8 tiny MoE is two launches. Each fusion must change no bit: the norm's quantized copy
is fp8.per_token_group_quant of its own output, and the two-launch MoE equals the four-launch one (x and h quantized
by launches of their own) bit for bit, at ragged shapes with -1 ids and remote experts, at every token count the
tiny path takes (and one past it, where the sorted path reads the norm's x); against the W8A8 reference as the
other FP8 tests hold it (test_triton_fp8.py's row tolerance)."""
from __future__ import annotations

import pytest
import torch

from moelink.kernels import moe_config
from moelink.kernels import triton_moe_fp8_tiny as tiny
from moelink.kernels.fp8 import per_token_group_quant, reference_fused_moe_fp8
from moelink.kernels.moe_config import GemmConfig, MoELaunchConfig
from moelink.kernels.norm import reference_add_rms_norm, reference_add_rms_norm_fp8
from moelink.kernels.triton_moe_fp8 import triton_fused_moe_fp8
from moelink.kernels.triton_norm import triton_add_rms_norm, triton_add_rms_norm_fp8

from tests.kernels.test_triton_fp8 import _check_rows, _expert_map, _routing, _to, _weight, _x


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.cpu().view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t.cpu()


# (T, D, dtype): one row, D ragged against the 128-channel group, a zero group (scale 1e-12), bf16 and fp32.
NORM_CASES = [(1, 200, torch.bfloat16), (5, 384, torch.float32), (3, 130, torch.float16)]


@pytest.mark.parametrize("T,D,dtype", NORM_CASES)
def test_add_rms_norm_fp8_is_the_norm_then_group_quant(T, D, dtype, gen, kdev):
    x, r = _x(gen, T, D, dtype), _x(gen, T, D, dtype)
    x[0, :128] = 0
    r[0, :128] = 0  # a zero group: the minimum scale, exact zeros
    w = (1 + 0.1 * torch.randn(D, generator=gen)).to(dtype)
    got = triton_add_rms_norm_fp8(*_to(kdev, x, r, w), 1e-6)
    y, summed = triton_add_rms_norm(*_to(kdev, x, r, w), 1e-6)
    want = (y, summed, *per_token_group_quant(y))
    for g, v in zip(got, want):
        assert g.dtype == v.dtype and torch.equal(_bits(g), _bits(v))
    ref = reference_add_rms_norm_fp8(x, r, w, 1e-6)
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(ref[:2], reference_add_rms_norm(x, r, w, 1e-6)))
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(ref[2:], per_token_group_quant(ref[0])))


def test_add_rms_norm_fp8_refuses_what_it_cannot_tile(kdev):
    x = torch.zeros(2, 64, device=kdev)
    with pytest.raises(ValueError, match="below the quantization group"):
        triton_add_rms_norm_fp8(x, x, torch.ones(64, device=kdev), 1e-6)
    with pytest.raises(ValueError, match="power of two"):
        triton_add_rms_norm_fp8(x, x, torch.ones(64, device=kdev), 1e-6, group=96)


# Small GEMV blocks (several K tiles, BLOCK_N 8: 16 programs an h group, one group ragged) and max_pairs 16. The
# down GEMV's K tile 64: three over I 160, the last ragged, an h group over two of them (BLOCK_K 32's five tiles
# took the same branches at most of this file's interpreter time).
SMALL = MoELaunchConfig(16, GemmConfig(64, 64, 1, 4, 3), GemmConfig(64, 64, 1, 4, 3), moe_config.TinyConfig.from_dict(
    {"max_pairs": 16, "BLOCK_SIZE_N": 8, "BLOCK_SIZE_K": 64, "num_warps": 1, "num_stages": 1,
     "down": {"BLOCK_SIZE_N": 8, "BLOCK_SIZE_K": 64}}))
# (T, routing): every tiny token count at top-4 (1, 2 and 4 = max_pairs / K: the down GEMV's width narrows with T),
# -1 ids and remote experts (an expert map) among them, then 5 tokens: past max_pairs, the sorted path.
MOE_CASES = [(1, "map"), (2, "neg"), (4, "map"), (5, "neg")]


@pytest.mark.parametrize("T,mode", MOE_CASES)
def test_two_launch_fp8_moe_equals_four_launch(T, mode, gen, kdev, seed, nan_buffer):
    E, G, K, D, I, dtype = 6, 8, 4, 128, 160, torch.bfloat16
    x, r = _x(gen, T, D, dtype), _x(gen, T, D, dtype)
    w = (1 + 0.1 * torch.randn(D, generator=gen)).to(dtype)
    w13q, w13s = _weight(gen, E, 2 * I, D)
    w2q, w2s = _weight(gen, E, D, I)
    ids = _routing(gen, T, G if mode == "map" else E, K, "rand" if mode == "map" else mode)
    emap = _expert_map(gen, G, E) if mode == "map" else None
    weights = torch.rand(T, K, generator=gen)
    y, _, xq, xs = triton_add_rms_norm_fp8(*_to(kdev, x, r, w), 1e-6)
    experts = _to(kdev, w13q, w13s, w2q, w2s, weights, ids, emap)
    two = triton_fused_moe_fp8(y, *experts, out=nan_buffer((T, D), dtype, kdev), config=SMALL, x_fp8=(xq, xs))
    want = reference_fused_moe_fp8(y.cpu().double(), w13q, w13s, w2q, w2s, weights.double(), ids, emap)
    _check_rows(two, want, dtype, f"two-launch fp8 MoE T={T} {mode}", seed, flips=2)
    if T * K > SMALL.tiny.max_pairs:  # the sorted path: it read the norm's x, the same as quantizing y itself
        assert torch.equal(two.cpu(), triton_fused_moe_fp8(y, *experts, config=SMALL).cpu())
        return
    # x and h quantized by launches of their own, as before the fusions
    four_out = triton_fused_moe_fp8(y, *experts, out=nan_buffer((T, D), dtype, kdev), config=SMALL, fuse_h=False)
    assert torch.equal(two.cpu(), four_out.cpu()), f"T={T} {mode}: the fusions moved bits"
    if mode == "map":
        assert (two.cpu()[(emap[ids] < 0).all(1)] == 0).all()


def test_h_group_counters_return_to_zero(gen, kdev):
    """The group counters are zeros after a launch (the last program of each group resets its own): the next
    launch, and a CUDA graph's replay, start from zeros with no memset."""
    E, K, D, I, T = 4, 2, 128, 96, 3
    w13q, w13s = _weight(gen, E, 2 * I, D)
    w2q, w2s = _weight(gen, E, D, I)
    x, ids, weights = _x(gen, T, D, torch.float32), _routing(gen, T, E, K, "neg"), torch.rand(T, K, generator=gen)
    args = _to(kdev, x, w13q, w13s, w2q, w2s, weights, ids)
    first = triton_fused_moe_fp8(*args, config=SMALL)
    counts = tiny._COUNTS[torch.device(kdev)]
    assert not counts.any()
    assert torch.equal(first.cpu(), triton_fused_moe_fp8(*args, config=SMALL).cpu())
