"""Weights from a trainer's process group (`init_weights_update_group`, `update_weights_from_distributed`,
`destroy_weights_update_group`; engine/rl/control.py, engine/rl/rank/weight_sync.py; docs/rl.md). The trainer is a
thread of the test process holding rank 0 of its own gloo group (engine/rl/trainer.TrainerGroup), the engine's rank
rank 1: after the trainer broadcasts perturbed weights of every tensor (in small buckets: several writes), greedy
tokens equal transformers' with the same tensors in float64. A wrong shape is refused naming the tensor before any
broadcast, the weights whole; a destroyed group is refused naming it; a trainer that goes silent part way fails the
tensor it was to send and destroys the group; without a rollback (rollback_bytes=0) the engine then refuses requests
until a complete update lands (with one: tests/engine/test_weight_updates_rollback.py)."""
from __future__ import annotations

import threading

import pytest

from moelink.engine import LLM, SamplingParams
from moelink.engine.rl.trainer import TrainerGroup

from tests.helpers.net import free_port
from tests.helpers.parity import assert_pool_free, assert_same, engine_greedy, hf_greedy, prompts
from tests.helpers.tiny_configs import TINY_CONFIGS
from tests.helpers.weight_checkpoints import checkpoint_tensors, perturbed, saved_checkpoint

pytestmark = pytest.mark.usefixtures("heap_held_frozen")


# The names the other weight-update tests import from here (test_weight_updates_{fp8,gptq_awq,quantized,rollback}.py,
# tests/ep/, tests/server/test_control_service.py): one copy, in tests/helpers/weight_checkpoints.py.
_tensors, _perturbed, _saved = checkpoint_tensors, perturbed, saved_checkpoint


class _Trainer(threading.Thread):
    """Rank 0 of the group, in a thread: joins, then broadcasts `send` (the first `stop_after` only, then stays
    silent as a hung trainer would) once told to."""

    def __init__(self, port: int, send: list, stop_after: int | None = None, world_size: int = 2):
        super().__init__(daemon=True)
        self.port, self.send, self.stop_after, self.world_size = port, send, stop_after, world_size
        self.go, self.done = threading.Event(), threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            group = TrainerGroup("127.0.0.1", self.port, self.world_size, "g", "gloo", timeout_s=60.0)
            self.go.wait(30.0)
            group.broadcast(self.send[:self.stop_after])
            self.done.wait(30.0)  # held until the test is done with the engine's side
            group.close()
        except BaseException as exc:  # pragma: no cover - reported by the test
            self.error = exc


def _join(llm, trainer: _Trainer, timeout_s: float = 30.0) -> None:
    trainer.start()
    info = llm.init_weights_update_group("127.0.0.1", trainer.port, 1, 2, "g", "gloo", timeout_s=timeout_s)
    assert info["success"]


@pytest.mark.slow
def test_broadcast_update_equals_transformers(tiny_model, tmp_path):
    path = tiny_model("qwen3_e6k3")
    new = _perturbed(_tensors(path))
    ps = prompts(TINY_CONFIGS["qwen3_e6k3"]["vocab_size"], seed=29, n=4, lo=1, hi=30)
    want = hf_greedy(_saved(path, new, tmp_path / "new"), ps)
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=8, enable_weight_updates=True)
    before = engine_greedy(llm, ps)
    assert want != before, "the perturbation must change the answers"
    trainer = _Trainer(free_port(), list(new.items()))
    _join(llm, trainer)
    trainer.go.set()
    info = llm.update_weights_from_distributed(**TrainerGroup.specs(new.items()), group_name="g",
                                               weight_version="v1", bucket_bytes=4096)  # several buckets
    assert info["weight_version"] == llm.get_weight_version() == "v1"
    assert info["bytes_read"] == sum(t.numel() * t.element_size() for t in new.values())
    assert_same(engine_greedy(llm, ps), want, ps)
    llm.destroy_weights_update_group("g")
    trainer.done.set()
    trainer.join(30.0)
    assert trainer.error is None
    assert_pool_free(llm)


def test_bad_updates_are_refused_before_any_broadcast(tiny_model):
    path = tiny_model("qwen3_e6k3")
    tensors = _tensors(path)
    name = "model.layers.0.mlp.experts.1.up_proj.weight"
    llm = LLM(path, dtype="float32", num_kv_blocks=32, block_size=8, enable_weight_updates=True)
    ps = [[1, 2, 3, 4, 5], [9, 8, 7]]
    before = engine_greedy(llm, ps, max_new=4)
    trainer = _Trainer(free_port(), [])
    _join(llm, trainer)
    specs = TrainerGroup.specs([(name, tensors[name])])
    for bad, match in [
        ({**specs, "shapes": [[3, 3]]}, rf"shapes\[0\]=\[3, 3\] is invalid: tensor '{name}' is \[.*\]"),
        ({**specs, "names": ["model.nope"]}, r"names\[0\]='model\.nope' is invalid: not a tensor of the served"),
        ({**specs, "dtypes": ["int32"]}, rf"dtypes\[0\]='int32' is invalid: tensor '{name}' is float"),
        ({**specs, "dtypes": []}, "names, dtypes and shapes have 1, 0 and 1 entries"),
    ]:
        with pytest.raises(ValueError, match=match):
            llm.update_weights_from_distributed(**bad, group_name="g")
    with pytest.raises(ValueError, match="group_name='h' is invalid: no such weight update group"):
        llm.update_weights_from_distributed(**specs, group_name="h")
    with pytest.raises(ValueError, match="group_name='g' is invalid: a group of that name is joined already"):
        llm.init_weights_update_group("127.0.0.1", trainer.port, 1, 2, "g")
    llm.destroy_weights_update_group("g")
    with pytest.raises(ValueError, match="group_name='g' is invalid: no such weight update group"):
        llm.update_weights_from_distributed(**specs, group_name="g")
    with pytest.raises(ValueError, match="group_name='g' is invalid: no such weight update group"):
        llm.destroy_weights_update_group("g")
    with pytest.raises(ValueError, match="rank_offset=0 is invalid"):
        llm.init_weights_update_group("127.0.0.1", trainer.port, 0, 2, "g")
    trainer.go.set()
    trainer.done.set()
    trainer.join(30.0)
    assert engine_greedy(llm, ps, max_new=4) == before  # nothing was written


@pytest.mark.slow
def test_without_rollback_a_trainer_silent_part_way_leaves_requests_waiting_for_a_whole_update(tiny_model):
    """rollback_bytes=0 (engine/rl/rank/rollback.py off): the buckets written before the failure stay written."""
    path = tiny_model("qwen3_e6k3")
    new = list(_perturbed(_tensors(path)).items())
    llm = LLM(path, dtype="float32", num_kv_blocks=32, block_size=8, enable_weight_updates=True)
    ps = [[1, 2, 3, 4, 5], [9, 8, 7]]
    before = engine_greedy(llm, ps, max_new=4)
    trainer = _Trainer(free_port(), new, stop_after=3)
    _join(llm, trainer, timeout_s=2.0)
    trainer.go.set()
    missing = new[3][0]
    with pytest.raises(RuntimeError, match=rf"receiving tensor '{missing}' from group 'g' failed .*the group is "
                                           r"destroyed.*partly updated"):
        llm.update_weights_from_distributed(**TrainerGroup.specs(new), group_name="g", bucket_bytes=1, rollback_bytes=0)
    trainer.done.set()
    trainer.join(30.0)
    with pytest.raises(RuntimeError, match="requests are refused: a weight update from group 'g' failed part way"):
        llm.generate(ps, SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="group_name='g' is invalid: no such weight update group"):
        llm.update_weights_from_distributed(**TrainerGroup.specs(new), group_name="g")
    llm.update_weights_from_disk(path)  # a complete update: served again, the old weights back
    assert engine_greedy(llm, ps, max_new=4) == before
    assert_pool_free(llm)
