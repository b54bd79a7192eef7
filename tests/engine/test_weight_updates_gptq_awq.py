"""A trainer's float weights into a GPTQ (symmetric with every projection INT4, asymmetric v1 with the routed experts)
or AWQ INT4 deployment (engine/rl/requantize_gptq_awq.py; docs/rl.md): round-to-nearest per served group with
the format's own conventions. Two float DeepSeek-V3 checkpoints A and B, each written in the served layout offline by
the plain-torch reference writer (tests/helpers/gptq_awq_reference.py); the engine serving A takes every tensor of
float B under the float checkpoint's names, by update_weights_from_tensor and by a gloo broadcast (each rank
quantizes), and then gives exactly the tokens and logprobs of an engine started on B's offline checkpoint; the packed
tensors the update writes equal the offline writer's bitwise. A tensor the format cannot encode (NaN, another shape)
is refused before any rank writes."""
from __future__ import annotations

import pytest
import torch

from moelink.engine import LLM
from moelink.engine.rl.weights import check_named_tensors

from tests.engine.test_weight_updates_distributed import _tensors
from tests.engine.test_weight_updates_quantized import KW, quantized_pair, run, tensor_then_broadcast, vocab
from tests.helpers.parity import prompts

pytestmark = pytest.mark.usefixtures("heap_held_frozen")
NAME = "model.layers.1.mlp.experts.1.down_proj.weight"


@pytest.mark.slow  # over 1 s (two engines on tiny DeepSeek-V3 checkpoints, a gloo broadcast)
@pytest.mark.parametrize("fmt", ["gptq", "gptq_asym", "awq"])
def test_float_weights_requantized_into_gptq_awq_equal_the_offline_checkpoint(tmp_path, fmt):
    qa, qb, fb = quantized_pair(fmt, tmp_path)
    new = list(_tensors(fb).items())
    ps = prompts(vocab(qa), seed=63, n=4, lo=1, hi=30)
    want = run(LLM(qb, **KW), ps)
    llm = LLM(qa, **KW)
    before = run(llm, ps)
    assert before != want

    w = dict(new)[NAME]
    layout = fmt[:4]
    n, k = w.shape
    with pytest.raises(ValueError, match=rf"'{NAME}' has shape \[{n}, {k + 1}\]: the served {layout} weight takes "
                                         rf"a float tensor of shape \[{n}, {k}\]"):
        llm.update_weights_from_tensor([(m, torch.zeros(n, k + 1) if m == NAME else t) for m, t in new])
    nan = w.clone()
    nan[3, 5] = float("nan")
    with pytest.raises(ValueError, match=rf"'{NAME}' holds NaN or inf: the served {layout} weight cannot encode"):
        llm.update_weights_from_tensor([(n, nan if n == NAME else t) for n, t in new])
    assert run(llm, ps) == before  # refused before any rank wrote

    cfg = llm.engine.config.model  # the driver's re-quantized tensors are the offline writer's, bitwise
    made, offline = check_named_tensors(cfg, cfg.model, new), _tensors(qb)
    packed = [m for m in made if m.endswith((".qweight", ".qzeros", ".scales"))]
    assert len(packed) == sum(m.endswith((".qweight", ".qzeros", ".scales")) for m in offline) > 0
    for m in packed:
        assert made[m].dtype == offline[m].dtype and torch.equal(made[m], offline[m]), m

    tensor_then_broadcast(llm, qa, new, ps, before, want)


@pytest.mark.parametrize("layout,symmetric", [("gptq", True), ("gptq", False), ("awq", False)])
def test_re_quantized_tensors_read_back_by_the_loader_within_a_step(layout, symmetric):
    """What a re-quantized GPTQ / AWQ weight means, read by the loader's own unpacking (kernels/int4.py, checked against
    compressed-tensors in tests/engine/test_int4_checkpoint.py): within half a scale step of the float weight (and the
    float16 scale's rounding) wherever a group has values of both signs, so the packing order, the v1 zero offset
    and the group of each value are the loader's. Rows 8-16 hold a group with no negative value: there the
    libraries' own rules clamp the top (GPTQ symmetric keeps zero 8 and scale max / 15, so values above 7 steps
    reach code 15 only; GPTQ v1's zero 0 is raised to 1; AWQ's rounded zero shifts the grid by up to half a step). A
    group of zeros dequantizes to zeros."""
    from moelink.engine.config.quantization_int4 import Int4Config
    from moelink.engine.rl.requantize import requantizable, requantize
    from moelink.kernels.int4 import awq_to_rows, gptq_qweight_rows, gptq_zeros_rows, int4_dequantize

    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w[:8, :32] = 0.0
    w[8:16, 32:] = w[8:16, 32:].abs()
    words = (8, 24) if layout == "gptq" else (64, 3)  # qweight [K/8, N] or [K, N/8]
    served = {"x.qweight": ("I32", words), "x.qzeros": ("I32", (2, 3)), "x.scales": ("F16", (2, 24))}
    spec = requantizable(Int4Config(32, symmetric, layout, gptq_v1=True), served)["x.weight"]
    assert spec.shape == (24, 64)
    out = requantize("x.weight", spec, w)
    q, z, s = out["x.qweight"], out["x.qzeros"], out["x.scales"].transpose(0, 1).float()
    if layout == "gptq":
        q, z = gptq_qweight_rows(q), gptq_zeros_rows(z, True)
    else:
        q, z = awq_to_rows(q, pack=True), awq_to_rows(z, pack=False)
    deq = int4_dequantize(q, s, z, torch.float64)
    steps = (deq - w).abs() / s.repeat_interleave(32, dim=1).double()
    both_signs = torch.cat([steps[:8], steps[16:]])
    assert both_signs.max() <= 0.5 + 8 * 2**-11  # half a step, and 7.5 steps times the float16 scale's rounding
    assert steps[8:16].max() <= (8.0 if symmetric else 1.0) + 16 * 2**-11  # up to 15 steps times that rounding
    assert torch.equal(deq[:8, :32], torch.zeros(8, 32, dtype=torch.float64))
