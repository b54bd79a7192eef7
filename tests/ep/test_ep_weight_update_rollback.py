"""Updates at EP 2 on Ray are all or nothing on both ranks (engine/rl/rank/rollback.py; docs/rl.md), one engine:

- a broadcast of an attention projection (held by both ranks) and experts 3-5 (rank 1's, placement "contiguous")
  with rollback_bytes the projection's bytes is refused before the trainer sends anything, naming rollback_bytes and
  rank 1's need (the projection and its experts: each rank sizes its own part);
- an update from disk whose later tensor, an expert only rank 1 holds, has a NaN fails on rank 1 only: rank 1
  restores itself, and rank 0, which wrote everything else (its experts, every attention and norm weight), restores
  on the driver's word (finish_weights_update). Greedy tokens and logprobs are bitwise those before;
- then the broadcast lands with the default limit."""
from __future__ import annotations

import pytest

from moelink.engine import LLM
from moelink.engine.rl.trainer import TrainerGroup

from tests.engine.test_weight_updates_distributed import _perturbed, _saved, _tensors
from tests.engine.test_weight_updates_quantized import run
from tests.engine.test_weight_updates_rollback import KW, PS, _join

pytestmark = pytest.mark.slow


def test_ep2_updates_are_refused_up_front_or_rolled_back_on_both_ranks(local_ray, tiny_model, tmp_path):
    path = tiny_model("qwen3_e6k3")
    new = _perturbed(_tensors(path))
    q = "model.layers.0.self_attn.q_proj.weight"
    send = [(q, new[q])] + [(n, t) for n, t in new.items() if ".mlp.experts." in n and
                            int(n.split(".mlp.experts.")[1].split(".")[0]) >= 3]
    q_bytes = new[q].numel() * 4  # float32 in the engine
    rank1 = sum(t.numel() * 4 for _, t in send)
    llm = LLM(path, expert_parallel_size=2, **KW)
    try:
        before = run(llm, PS)
        trainer = _join(llm, [send], world_size=3)
        with pytest.raises(ValueError, match=rf"rollback_bytes={q_bytes} is too small: rolling this update back would "
                                             rf"hold {rank1} bytes of old weights on rank 1 "):
            llm.update_weights_from_distributed(**TrainerGroup.specs(send), group_name="g", bucket_bytes=q_bytes,
                                                rollback_bytes=q_bytes)
        assert trainer.sent == 0

        bad_name = "model.layers.1.mlp.experts.4.down_proj.weight"  # rank 1's only
        bad = dict(new)
        bad[bad_name] = bad[bad_name].clone()
        bad[bad_name].view(-1)[0] = float("nan")
        with pytest.raises(RuntimeError, match=rf"checkpoint tensor '{bad_name}' holds 1 NaN value.*as they were "
                                               r"\(rolled back on every rank\)"):
            llm.update_weights_from_disk(_saved(path, bad, tmp_path / "bad"))
        assert run(llm, PS) == before

        llm.update_weights_from_distributed(**TrainerGroup.specs(send), group_name="g", bucket_bytes=q_bytes)
        trainer.join(30.0)
        assert trainer.error is None and trainer.sent == 1
        assert run(llm, PS) != before
        llm.destroy_weights_update_group("g")
    finally:
        llm.engine.shutdown()
