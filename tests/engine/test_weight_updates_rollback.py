"""A broadcast update that fails part way is rolled back (engine/rl/rank/rollback.py, engine/rl/rank/weight_sync.py;
docs/rl.md): every tensor of a perturbed model sent one bucket per tensor, so many buckets are written before the
failure; then the greedy tokens and their logprobs are bitwise those before the update, the error names the tensor,
the engine serves on, and the next good update lands. Failures: a trainer that dies part way (its group closed), a
NaN in a later bucket; an unknown name or a wrong shape late in the list, and an update whose old bytes pass
rollback_bytes, are refused before any tensor is broadcast. An update from disk is all or nothing the same way: a
checkpoint whose later tensor holds a NaN or an inf (its headers fine) is rolled back, its limit checked first."""
from __future__ import annotations

import logging

import threading

import pytest

from moelink.engine import LLM
from moelink.engine.rl.trainer import TrainerGroup

from tests.engine.test_weight_updates_distributed import _perturbed, _tensors
from tests.engine.test_weight_updates_quantized import run
from tests.helpers.net import free_port
from tests.helpers.parity import assert_pool_free

pytestmark = [pytest.mark.usefixtures("heap_held_frozen"), pytest.mark.slow]
KW = dict(dtype="float32", max_num_seqs=4, max_num_batched_tokens=40, num_kv_blocks=64, block_size=8,
          enable_weight_updates=True)
PS = [[1, 2, 3, 4, 5], [9, 8, 7], list(range(20, 47))]


class Trainer(threading.Thread):
    """Rank 0 of the group in a thread: broadcasts each round in turn (a round of None: closes its group, as a dying
    trainer's process would, and stops)."""

    def __init__(self, port: int, rounds: list, world_size: int = 2):
        super().__init__(daemon=True)
        self.port, self.rounds, self.world_size = port, rounds, world_size
        self.error: BaseException | None = None
        self.sent = 0

    def run(self) -> None:
        try:
            group = TrainerGroup("127.0.0.1", self.port, self.world_size, "g", "gloo", timeout_s=30.0)
            for send in self.rounds:
                if send is None:
                    group.close()
                    return
                group.broadcast(send)
                self.sent += 1
            group.close()
        except BaseException as exc:  # pragma: no cover - reported by the test
            self.error = exc


def _engine(tiny_model, ep: int = 1):
    path = tiny_model("qwen3_e6k3")
    new = list(_perturbed(_tensors(path)).items())
    return path, new, LLM(path, expert_parallel_size=ep, **KW) if ep > 1 else LLM(path, **KW)


def _join(llm, rounds, world_size: int = 2) -> Trainer:
    trainer = Trainer(free_port(), rounds, world_size)
    trainer.start()
    llm.init_weights_update_group("127.0.0.1", trainer.port, 1, world_size, "g", "gloo", timeout_s=5.0)
    return trainer


def test_a_trainer_dying_part_way_leaves_the_weights_bitwise_as_before(tiny_model):
    _, new, llm = _engine(tiny_model)
    before = run(llm, PS)
    trainer = _join(llm, [new[:12], None])  # 12 tensors (12 buckets written), then its group closes
    with pytest.raises(RuntimeError, match=rf"receiving tensor '{new[12][0]}' from group 'g' failed .*the group is "
                                           r"destroyed\. The weights are as they were \(rolled back on every rank\)"):
        llm.update_weights_from_distributed(**TrainerGroup.specs(new), group_name="g", bucket_bytes=1)
    trainer.join(30.0)
    assert run(llm, PS) == before  # tokens and logprobs, bitwise; served
    assert_pool_free(llm)

    trainer = _join(llm, [new])  # the next good update, through a new group
    llm.update_weights_from_distributed(**TrainerGroup.specs(new), group_name="g", bucket_bytes=1)
    got = run(llm, PS)
    llm.update_weights_from_tensor(new)
    assert got == run(llm, PS) != before
    trainer.join(30.0)
    assert trainer.error is None


def test_a_nan_in_a_later_bucket_is_rolled_back_and_the_group_serves_the_next_update(tiny_model):
    _, new, llm = _engine(tiny_model)
    before = run(llm, PS)
    name, w = new[20]
    bad = list(new)
    nan = w.clone()
    nan.view(-1)[0] = float("nan")
    bad[20] = (name, nan)
    late = list(new)
    late[-1] = ("model.nope", late[-1][1])
    trainer = _join(llm, [bad, new])
    with pytest.raises(ValueError, match=r"names\[\d+\]='model\.nope' is invalid"):  # before any broadcast
        llm.update_weights_from_distributed(**TrainerGroup.specs(late), group_name="g", bucket_bytes=1)
    with pytest.raises(ValueError, match=rf"shapes\[3\]=\[1\] is invalid: tensor '{new[3][0]}'"):
        llm.update_weights_from_distributed(**{**TrainerGroup.specs(new), "shapes": [list(t.shape) for _, t in new[:3]]
                                               + [[1]] + [list(t.shape) for _, t in new[4:]]}, group_name="g")
    with pytest.raises(RuntimeError, match=rf"writing the bucket of '{name}' failed: tensor '{name}' holds 1 NaN .* "
                                           r"as they were \(rolled back on every rank\).*Group 'g' is kept"):
        llm.update_weights_from_distributed(**TrainerGroup.specs(bad), group_name="g", bucket_bytes=1)
    assert run(llm, PS) == before
    with pytest.raises(ValueError, match=rf"named_tensors\[20\] '{name}' holds 1 NaN"):  # checked before any write
        llm.update_weights_from_tensor(bad)
    assert run(llm, PS) == before
    llm.update_weights_from_distributed(**TrainerGroup.specs(new), group_name="g", bucket_bytes=1)  # the same group
    got = run(llm, PS)
    llm.update_weights_from_tensor(new)
    assert got == run(llm, PS) != before
    llm.destroy_weights_update_group("g")
    trainer.join(30.0)
    assert trainer.error is None and trainer.sent == 2  # the failed broadcast went to its end


def test_rollback_bytes_is_checked_up_front_and_a_disk_update_is_rolled_back(tiny_model, tmp_path, monkeypatch,
                                                                             caplog):
    from tests.engine.test_weight_updates_distributed import _saved

    path, new, llm = _engine(tiny_model)
    before = run(llm, PS)
    trainer = _join(llm, [new])
    need = sum(t.numel() * 4 for _, t in new)  # every tensor, float32 in the engine (no tied copies in qwen3_e6k3)
    with pytest.raises(ValueError, match=rf"rollback_bytes=100000 is too small: rolling this update back would hold "
                                         rf"{need} bytes of old weights on rank 0 .*Nothing was written"):
        llm.update_weights_from_distributed(**TrainerGroup.specs(new), group_name="g", bucket_bytes=1 << 14,
                                            rollback_bytes=100_000)
    assert trainer.sent == 0  # refused before the broadcast: the trainer's waits for the next call
    llm.update_weights_from_distributed(**TrainerGroup.specs(new), group_name="g", bucket_bytes=1 << 14)
    trainer.join(30.0)
    assert trainer.error is None and trainer.sent == 1
    llm.destroy_weights_update_group("g")
    updated = run(llm, PS)
    assert updated != before

    # From disk: the old checkpoint's values, but a late tensor (layer 1's o_proj, read after layer 0 and most of
    # layer 1) holds a NaN, then an inf; the headers are fine, so only the load finds it, part way.
    old = _tensors(path)
    late = "model.layers.1.self_attn.o_proj.weight"
    for i, value in enumerate((float("nan"), float("inf"))):
        bad = dict(old)
        bad[late] = bad[late].clone()
        bad[late].view(-1)[3] = value
        where = _saved(path, bad, tmp_path / f"bad{i}")
        what = "1 NaN value" if i == 0 else "1 infinite value"
        with pytest.raises(RuntimeError, match=rf"update_weights_from_disk failed: checkpoint tensor '{late}' holds "
                                               rf"{what}.*as they were \(rolled back on every rank\)"):
            llm.update_weights_from_disk(where, weight_version="bad")
        assert run(llm, PS) == updated  # bitwise: the tensors written before the bad one are restored
        assert llm.get_weight_version() is None
    from moelink.engine.rank import loader  # one rank runs in this process

    read = loader._read

    def gone(st, name, src_idx):  # the file removed (or cut short) while the update reads it
        if name == late:
            raise FileNotFoundError("model.safetensors was removed")
        return read(st, name, src_idx)
    monkeypatch.setattr(loader, "_read", gone)
    with pytest.raises(RuntimeError, match=rf"reading checkpoint tensor '{late}' failed: FileNotFoundError: .*as they "
                                           r"were \(rolled back on every rank\)"):
        llm.update_weights_from_disk(path)
    monkeypatch.undo()
    assert run(llm, PS) == updated
    with pytest.raises(ValueError, match=rf"named_tensors\[\d+\] '{late}' holds 1 infinite value"):
        llm.update_weights_from_tensor(list(bad.items()))  # the inf is found on the driver, before any rank writes
    with pytest.raises(ValueError, match=rf"rollback_bytes=1000 is too small: .* would hold {need} bytes"):
        llm.update_weights_from_disk(path, rollback_bytes=1000)
    with pytest.raises(ValueError, match=r"rollback_bytes=-1 is invalid: must be an integer >= 0"):
        llm.update_weights_from_disk(path, rollback_bytes=-1)
    llm.update_weights_from_disk(path, weight_version="old")  # a good one lands: the first weights, bitwise
    assert run(llm, PS) == before and llm.get_weight_version() == "old"

    # Left out, the limit is the default when every rank's part fits it, and no rollback (logged) when not: a caller
    # that sends no rollback_bytes (SGLang's, vLLM's) is never refused for a model larger than the default.
    from moelink.engine.rl import control as rl_control

    monkeypatch.setattr(rl_control, "DEFAULT_ROLLBACK_BYTES", need - 1)
    with caplog.at_level(logging.WARNING, logger=rl_control.__name__):
        llm.update_weights_from_disk(path, weight_version="large")
    assert f"old bytes on rank 0 ({need}) pass the default rollback_bytes ({need - 1})" in caplog.text
    assert run(llm, PS) == before and llm.get_weight_version() == "large"
    with pytest.raises(RuntimeError, match=rf"checkpoint tensor '{late}' holds 1 infinite value.*refused until"):
        llm.update_weights_from_disk(where)  # no rollback: the model refuses requests until a complete update
    with pytest.raises(Exception, match="requests are refused"):
        run(llm, PS)
    llm.update_weights_from_disk(path)
    assert run(llm, PS) == before

