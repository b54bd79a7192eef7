"""A trainer's float weights into a GPTQ (symmetric with every projection INT4, asymmetric v1 with the routed experts)
or AWQ INT4 deployment (engine/config/requantize_gptq_awq.py; docs/rl.md): round-to-nearest per served group with
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
from moelink.engine.rl.trainer import TrainerGroup
from moelink.engine.rl.weights import check_named_tensors

from tests.engine.test_weight_updates_distributed import _tensors, _Trainer
from tests.engine.test_weight_updates_quantized import KW, quantized_pair, run, vocab
from tests.helpers.net import free_port
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

    llm.update_weights_from_tensor(new)
    assert run(llm, ps) == want  # tokens and logprobs, bitwise

    llm.update_weights_from_disk(qa)  # back, then the same through a broadcast (the rank quantizes)
    assert run(llm, ps) == before
    trainer = _Trainer(free_port(), new)
    trainer.start()
    try:
        llm.init_weights_update_group("127.0.0.1", trainer.port, 1, 2, "g", "gloo")
        trainer.go.set()
        llm.update_weights_from_distributed(**TrainerGroup.specs(new), group_name="g", bucket_bytes=1 << 14)
        assert run(llm, ps) == want
        llm.destroy_weights_update_group("g")
    finally:
        trainer.done.set()
        trainer.join(30.0)
    assert trainer.error is None
