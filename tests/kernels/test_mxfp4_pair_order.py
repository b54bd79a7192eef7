"""MXFP4 blocks in the Triton decode's pair order (kernels/mxfp4.py `to_pair_order`: each 4-byte word's nibbles
permuted once at load, moe/layer.py), read by every MXFP4 Triton path with `pair_order=True`: the tiny GEMVs, the
per-tile sorted GEMMs and the dequantize-once pre-pass each give the bits they give on the checkpoint's layout, and
the reference's values on it (the same sums in the same order: only where a value sits in a word moved). Ragged
shapes, remote experts and -1 ids, in the interpreter. Why the order: the per-tile K loop then packs no bf16 pairs
by byte permutes (benchmarks/results/compile_report_mxfp4_sm90.md, docs/kernels.md)."""
from __future__ import annotations

import pytest
import torch

from moelink.kernels.mxfp4 import from_pair_order, mxfp4_dequantize, mxfp4_quantize, to_pair_order
from moelink.kernels.triton_mxfp4_dequant import dequantize_experts
from tests.kernels.test_triton_moe_mxfp4_paths import DEQUANT, OAI, WITH_TINY, _layer, _run, _want


def test_pair_order_is_a_permutation_within_each_word(gen):
    blocks = torch.randint(0, 256, (3, 5, 2, 16), dtype=torch.uint8, generator=gen)
    pairs = to_pair_order(blocks)
    assert torch.equal(from_pair_order(pairs), blocks) and not torch.equal(pairs, blocks)
    one = torch.zeros(16, dtype=torch.uint8)
    one[4] = 0x10  # element 9: word 1's element 1 (byte 4's high nibble) -> word 1's byte 2, low nibble
    assert to_pair_order(one).nonzero().flatten().tolist() == [6] and to_pair_order(one)[6] == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_prepass_reads_pair_order(dtype, gen, kdev):
    q, s = mxfp4_quantize(torch.randn(2, 6, 96, generator=gen))
    got = dequantize_experts(to_pair_order(q).to(kdev), s.to(kdev), dtype, pairs=True)
    assert torch.equal(got.cpu(), mxfp4_dequantize(q, s, dtype))


# (T, E local, G global, K, D, I, routing, config, path): the tiny GEMVs at decode size with remote experts, the
# per-tile sorted GEMMs with masked K tails, the dequant pre-pass then the float GEMMs; gpt-oss's biases and
# clamped SwiGLU throughout.
CASES = [(3, 5, 12, 4, 96, 32, "map", WITH_TINY, "auto"), (5, 4, 4, 2, 96, 96, "rand", None, "sorted"),
         (6, 3, 9, 3, 64, 64, "map", DEQUANT, "auto")]


@pytest.mark.parametrize("T,E,G,K,D,I,mode,cfg,path", CASES)
def test_every_path_reads_pair_order_bit_for_bit(T, E, G, K, D, I, mode, cfg, path, gen, kdev, check):
    L = _layer(gen, T, E, G, K, D, I, mode, torch.bfloat16, "both")
    L["ids"][0, -1] = -1  # (an id of no expert: nothing read for it)
    want = _run(L, kdev, activation=OAI, config=cfg, path=path)
    w13q, w13s, w2q, w2s = L["w"]
    pairs = dict(L, w=(to_pair_order(w13q), w13s, to_pair_order(w2q), w2s))
    got = _run(pairs, kdev, activation=OAI, config=cfg, path=path, pair_order=True)
    assert torch.equal(got.cpu(), want.cpu()), f"{path} {mode}: pair order moved bits"
    check(got, _want(L, OAI), torch.bfloat16, f"pair order {path}")


def test_pair_order_refuses_the_native_path(gen, kdev):
    L = _layer(gen, 2, 4, 4, 2, 64, 32, "rand", torch.bfloat16, "none")
    with pytest.raises(ValueError, match="native"):
        _run(L, kdev, native=True, pair_order=True)
