"""A trainer's float weights into a quantized deployment at EP 2 (and INT4, GPTQ, AWQ at TP 2 x EP 2) on Ray (engine/rl/requantize.py; docs/rl.md): the
trainer (a thread holding rank 0 of its own gloo group) broadcasts every tensor of float checkpoint B, under the float
checkpoint's names; each Ray rank (group ranks 1 and 2) quantizes what it receives into the served format (gpt-oss's
MXFP4 experts, ModelOpt's NVFP4, compressed-tensors INT4 as Kimi K2 ships it, GPTQ asymmetric and AWQ by
round-to-nearest) and keeps its own experts. The tokens and logprobs then equal, bitwise, those of the same engine
after update_weights_from_disk of B quantized by the format's own writer (GPTQ / AWQ: the plain-torch reference
writer, tests/helpers/gptq_awq_reference.py)."""
from __future__ import annotations

import pytest

from moelink.engine import LLM
from moelink.engine.rl.trainer import TrainerGroup

from tests.engine.test_weight_updates_distributed import _tensors, _Trainer
from tests.engine.test_weight_updates_quantized import KW, quantized_pair, run, vocab
from tests.helpers.net import free_port
from tests.helpers.parity import prompts

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("fmt,tp,ep", [("mxfp4", 1, 2), ("nvfp4", 1, 2), ("int4", 1, 2), ("int4", 2, 2),
                                       ("gptq_asym", 1, 2), ("gptq_asym", 2, 2), ("awq", 1, 2), ("awq", 2, 2)])
def test_broadcast_requantized_equals_the_writers_checkpoint(local_ray, tmp_path, fmt, tp, ep):
    qa, qb, fb = quantized_pair(fmt, tmp_path)
    new = list(_tensors(fb).items())
    ps = prompts(vocab(qa), seed=73, n=4, lo=1, hi=30)
    llm = LLM(qa, tensor_parallel_size=tp, expert_parallel_size=ep, **KW)
    trainer = _Trainer(free_port(), new, world_size=3)
    try:
        before = run(llm, ps)
        trainer.start()
        llm.init_weights_update_group("127.0.0.1", trainer.port, 1, 3, "g", "gloo", timeout_s=60.0)
        trainer.go.set()
        llm.update_weights_from_distributed(**TrainerGroup.specs(new), group_name="g", bucket_bytes=1 << 14)
        got = run(llm, ps)
        llm.destroy_weights_update_group("g")
        llm.update_weights_from_disk(qb)
        want = run(llm, ps)
        assert got == want and got != before
    finally:
        trainer.done.set()
        llm.engine.shutdown()
    trainer.join(30.0)
    assert trainer.error is None
