"""FP8 layers whose widths are not multiples of the weight block (issue 27): a stacked piece (up after gate, k
after q, kv_a after q_a) that would start inside a block. DeepSeek-V2-Lite's dense MLP (intermediate_size
10944 = 85.5 blocks of 128) under `--quantization fp8`, and published-format checkpoints with experts 160 or 96
wide, were refused ("a stacked piece starts at row 10944"; "gate and up are stacked, so it must be a multiple
of 128"). Now each piece keeps its own blocks: dense stacks put the next piece on a block boundary
(models/linear.py), per-expert FP8 experts put up at the next boundary (moe/expert_weights.Fp8BlockExperts),
and fused experts, quantized as one tensor, stay stacked as their scales say.

Checkpoints: tests.helpers.fp8_checkpoints' `*_ragged` (16 x 16 blocks) and `*_128` (the issue's widths, 200 /
160 / 96, in the published 128 x 128 blocks), saved by transformers and converted by `moelink quantize-fp8`.
Oracle as in test_fp8_checkpoints.py: transformers' float64 model holding the dequantized weights, with the
W8A8 activation rounding where the engine applies it; the engine must produce its greedy tokens.
"""
from __future__ import annotations

import random

import pytest
import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.config.model import ModelConfig
from moelink.engine.rank.loader import load_model
from moelink.kernels.fp8 import FP8_DTYPE
from moelink.kernels.ops import ReferenceKernels

from tests.helpers.fp8_checkpoints import BLOCK, VOCAB, fake_quant_hf_model, hf_greedy_with

CPU = torch.device("cpu")
MAX_NEW = 6
ENGINE_KW = dict(max_num_seqs=4, max_num_batched_tokens=40, num_kv_blocks=64, block_size=8)
B128 = (128, 128)
# (FP8_TINY name, experts fused on disk, block)
CASES = [("qwen3_fp8_ragged", False, BLOCK), ("qwen3_fp8_ragged", True, BLOCK), ("dsv3_fp8_ragged", False, BLOCK),
         ("dsv2_fp8_ragged", False, BLOCK), ("dsv2_fp8_128", False, B128), ("qwen3_fp8_128", False, B128),
         ("qwen3_fp8_128", True, B128)]


def _prompts(seed: int, n: int = 4) -> list[list[int]]:
    rng = random.Random(seed)
    lens = [1, 37] + [rng.randint(2, 30) for _ in range(n - 2)]
    return [[rng.randrange(VOCAB) for _ in range(L)] for L in lens]


def _greedy(llm, prompts) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8_DTYPE else t


@pytest.mark.parametrize("name,fused,block", CASES)
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_published_layout_greedy_equals_transformers(fp8_tiny, name, fused, block):
    _, dst, deq = fp8_tiny(name, fused, block)
    prompts = _prompts(seed=len(name) + fused)
    with LLM(dst, dtype="float64", **ENGINE_KW) as llm:
        got = _greedy(llm, prompts)
    assert len({t for g in got for t in g}) > 5, "degenerate model"
    assert got == hf_greedy_with(fake_quant_hf_model(deq, block), prompts, MAX_NEW)


@pytest.mark.parametrize("name,fused,block", CASES)
def test_online_quantization_equals_the_tool(fp8_tiny, name, fused, block):
    """--quantization fp8 on the float checkpoint holds bit-identical weights and scales to the converted one,
    gaps included (zeros)."""
    src, dst, _ = fp8_tiny(name, fused, block)
    online = load_model(ModelConfig.from_pretrained(src, "float32", quantization="fp8", fp8_block_size=block),
                        ReferenceKernels(), CPU).state_dict()
    tool = load_model(ModelConfig.from_pretrained(dst, "float32"), ReferenceKernels(), CPU).state_dict()
    assert online.keys() == tool.keys()
    for k in online:
        assert online[k].dtype == tool[k].dtype and torch.equal(_bits(online[k]), _bits(tool[k])), k
    assert sum(1 for v in online.values() if v.dtype == FP8_DTYPE) >= 8


def test_each_piece_starts_on_a_block_boundary(fp8_tiny):
    """The layout, worked out by hand for dsv2_fp8_128 (hidden 40, 128 x 128 blocks): the dense MLP's gate is
    rows [0, 200), up [256, 456) (56 zero rows between, blocks 0-1 gate's, 2-3 up's); the shared MLP (2 x 160 =
    320 wide) gate [0, 320), up [384, 704); each expert's gate [0, 160), up [256, 416) beside w2 [40, 160)."""
    src, _, _ = fp8_tiny("dsv2_fp8_128", False, B128)
    model = load_model(ModelConfig.from_pretrained(src, "float32", quantization="fp8"), ReferenceKernels(), CPU)
    dense = model.layers[0].mlp.gate_up_proj
    assert dense.starts == (0, 256) and tuple(dense.weight.shape) == (456, 40)
    assert tuple(dense.weight_scale_inv.shape) == (4, 1)
    assert (dense.weight[200:256].view(torch.uint8) == 0).all() and (dense.weight[:200].view(torch.uint8) != 0).any()
    shared = model.layers[1].mlp.shared.gate_up_proj
    assert shared.starts == (0, 384) and tuple(shared.weight.shape) == (704, 40)
    moe = model.layers[1].moe
    assert tuple(moe.w13_EFD.shape) == (9, 416, 40) and tuple(moe.w13_scale_inv_EFD.shape) == (9, 4, 1)
    assert tuple(moe.w2_EDI.shape) == (9, 40, 160) and tuple(moe.w2_scale_inv_EDI.shape) == (9, 1, 2)
    assert (moe.w13_EFD[:, 160:256].view(torch.uint8) == 0).all()


def test_online_fp8_on_the_issue_widths_serves(fp8_tiny):
    """The issue's command, `--quantization fp8` (128 x 128 blocks) on a float checkpoint whose dense MLP is
    200 wide and experts 160: it loads, and serves the tokens of the converted checkpoint."""
    src, dst, _ = fp8_tiny("dsv2_fp8_128", False, B128)
    prompts = _prompts(seed=11, n=3)
    with LLM(src, dtype="float64", quantization="fp8", **ENGINE_KW) as online, \
            LLM(dst, dtype="float64", **ENGINE_KW) as tool:
        assert _greedy(online, prompts) == _greedy(tool, prompts)
