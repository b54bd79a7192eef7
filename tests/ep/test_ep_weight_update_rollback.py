"""A broadcast update that fails on one rank only is rolled back on both (engine/rank/rollback.py; docs/rl.md), EP 2
on Ray: the update is an attention projection (held by both ranks, its own bucket) and then experts 3-5 (rank 1's,
placement "contiguous"), with rollback_bytes the projection's bytes. Rank 0 writes the projection and has nothing
more to save: it succeeds. Rank 1 passes the limit at the experts' bucket: it fails and restores itself; the driver
then has rank 0 restore the projection it wrote (finish_weights_update). Greedy tokens and logprobs are bitwise
those before, and the engine serves on."""
from __future__ import annotations

import pytest

from moelink.engine import LLM
from moelink.engine.rl.trainer import TrainerGroup

from tests.engine.test_weight_updates_distributed import _perturbed, _tensors
from tests.engine.test_weight_updates_quantized import run
from tests.engine.test_weight_updates_rollback import KW, PS, _join

pytestmark = pytest.mark.slow


def test_ep2_update_failing_on_one_rank_is_rolled_back_on_both(local_ray, tiny_model):
    path = tiny_model("qwen3_e6k3")
    new = _perturbed(_tensors(path))
    q = "model.layers.0.self_attn.q_proj.weight"
    send = [(q, new[q])] + [(n, t) for n, t in new.items() if ".mlp.experts." in n and
                            int(n.split(".mlp.experts.")[1].split(".")[0]) >= 3]
    q_bytes = new[q].numel() * 4  # float32 in the engine
    llm = LLM(path, expert_parallel_size=2, **KW)
    try:
        before = run(llm, PS)
        trainer = _join(llm, [send], world_size=3)
        with pytest.raises(RuntimeError, match=rf"more than rollback_bytes={q_bytes}.*as they were \(rolled back on "
                                               r"every rank\)"):
            llm.update_weights_from_distributed(**TrainerGroup.specs(send), group_name="g", bucket_bytes=q_bytes,
                                                rollback_bytes=q_bytes)
        assert run(llm, PS) == before
        trainer.join(30.0)
        assert trainer.error is None and trainer.sent == 1
        llm.destroy_weights_update_group("g")
    finally:
        llm.engine.shutdown()
