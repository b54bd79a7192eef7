"""The float Triton fused MoE with gpt-oss's expert biases and clamped swiglu_oai activation, in the interpreter
against reference_fused_moe in float64. Ragged shapes, fresh seeds, NaN-poisoned outputs and workspaces
(conftest.py); the SiLU path without biases is covered by test_triton_moe.py."""
from __future__ import annotations

import pytest
import torch

from moelink.kernels.moe import SILU, MoEActivation, reference_fused_moe
from moelink.kernels.triton_moe import triton_fused_moe

from tests.helpers.moe_cases import DTYPES, FUSED, SMALL, WIDE, expert_map as _expert_map, routing as _routing

OAI = MoEActivation("swiglu_oai", alpha=1.702, limit=7.0)
TIGHT = MoEActivation("swiglu_oai", alpha=1.1, limit=0.5)  # most values clamped: the clamps must be right
CLAMP = MoEActivation("silu_clamp", limit=0.5)  # DeepSeek-V4's clamped SiLU, most values clamped
RELU2 = MoEActivation("relu2")  # Nemotron-H's ungated relu(up)^2: the gate rows are not read

# (T, E local, G global, K, D, I, routing, config, combine, activation, biases)
CASES = [
    (13, 6, 6, 3, 48, 40, "rand", SMALL, "sum", OAI, "both"),  # masked K and N tails, both biases
    (23, 5, 12, 4, 40, 24, "map", FUSED, "atomic", OAI, "both"),  # fused gate|up tile, remote experts, atomics
    (1, 4, 4, 2, 32, 16, "rand", SMALL, "sum", TIGHT, "b13"),  # decode, empty experts, gate-up bias only
    (37, 5, 5, 1, 32, 32, "one", WIDE, "sum", OAI, "b2"),  # all tokens on one expert, down bias only
    (19, 3, 9, 3, 32, 16, "map", SMALL, "sum", SILU, "both"),  # SiLU with biases
    (9, 4, 4, 2, 48, 24, "rand", FUSED, "sum", TIGHT, "none"),  # swiglu_oai without biases
    (9, 4, 4, 2, 48, 24, "rand", FUSED, "sum", CLAMP, "none"),  # silu_clamp, fused gate|up tile
    (1, 4, 4, 2, 32, 16, "rand", SMALL, "sum", CLAMP, "none"),  # silu_clamp, decode
    (11, 4, 4, 2, 48, 24, "rand", FUSED, "sum", RELU2, "none"),  # relu2, fused gate|up tile
    (1, 4, 8, 2, 32, 16, "map", SMALL, "atomic", RELU2, "none"),  # relu2, decode, remote experts
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("T,E,G,K,D,I,mode,cfg,combine,act,biases", CASES)
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_fused_moe_bias_activation(T, E, G, K, D, I, mode, cfg, combine, act, biases, dtype, gen, kdev, check,
                                   nan_buffer):
    x = (torch.randn(T, D, generator=gen) * 3).to(dtype)  # gate values past the clamp
    w13 = (torch.randn(E, 2 * I, D, generator=gen) / D**0.5).to(dtype)
    w2 = (torch.randn(E, D, I, generator=gen) / I**0.5).to(dtype)
    b13 = torch.randn(E, 2 * I, generator=gen).to(dtype) if biases in ("both", "b13") else None
    b2 = torch.randn(E, D, generator=gen).to(dtype) if biases in ("both", "b2") else None
    ids = _routing(gen, T, G, K, "one" if mode == "one" else "rand")
    ids[::3, -1] = -1  # EP receive-buffer holes
    weights = torch.rand(T, K, generator=gen)
    emap = _expert_map(gen, G, E) if mode == "map" else None
    d = lambda t: None if t is None else t.double()  # noqa: E731
    want = reference_fused_moe(x.double(), w13.double(), w2.double(), weights.double(), ids, emap,
                               b13_EF=d(b13), b2_ED=d(b2), activation=act)
    dev = lambda t: None if t is None else t.to(kdev)  # noqa: E731
    out = nan_buffer((T, D), dtype, kdev)
    got = triton_fused_moe(dev(x), dev(w13), dev(w2), dev(weights), dev(ids), dev(emap), out=out, config=cfg,
                           combine=combine, b13_EF=dev(b13), b2_ED=dev(b2), activation=act)
    assert got is out
    check(got, want, dtype, f"fused_moe {act.kind} biases={biases} T={T} {mode} {combine}")


def test_bias_float32_with_bf16_activations(gen, kdev, check):
    """gpt-oss keeps biases in their own dtype: a float32 bias with bf16 activations is read as is."""
    T, E, K, D, I = 7, 3, 2, 32, 16
    x = torch.randn(T, D, generator=gen).bfloat16()
    w13 = (torch.randn(E, 2 * I, D, generator=gen) / D**0.5).bfloat16()
    w2 = (torch.randn(E, D, I, generator=gen) / I**0.5).bfloat16()
    b13, b2 = torch.randn(E, 2 * I, generator=gen), torch.randn(E, D, generator=gen)
    ids, weights = _routing(gen, T, E, K, "rand"), torch.rand(T, K, generator=gen)
    want = reference_fused_moe(x.double(), w13.double(), w2.double(), weights.double(), ids, b13_EF=b13.double(),
                               b2_ED=b2.double(), activation=OAI)
    got = triton_fused_moe(*(t.to(kdev) for t in (x, w13, w2, weights, ids)), config=SMALL, b13_EF=b13.to(kdev),
                           b2_ED=b2.to(kdev), activation=OAI)
    check(got, want, torch.bfloat16, "fp32 biases, bf16 activations")


def test_bias_and_activation_rejected_when_wrong(kdev):
    x = torch.zeros(3, 32, device=kdev)
    args = (x, x.new_zeros(2, 32, 32), x.new_zeros(2, 32, 16), x.new_zeros(3, 2),
            torch.zeros(3, 2, dtype=torch.long, device=kdev))
    with pytest.raises(ValueError, match="b13_EF"):
        triton_fused_moe(*args, b13_EF=x.new_zeros(2, 16))
    with pytest.raises(ValueError, match="b2_ED"):
        triton_fused_moe(*args, b2_ED=x.new_zeros(3, 32))
    with pytest.raises(ValueError, match="activation"):
        triton_fused_moe(*args, activation="silu")
    with pytest.raises(ValueError, match="activation"):
        MoEActivation("gelu")
