"""Elastic EP without Ray: a survivor keeps its model runner (engine/rank/keep_runner.py), and a survivor's scheduler
undoes the step a loss broke (Scheduler.rewind) so that its worker and it agree again (ModelRunner resync).

The runners are built on one process with no all-to-all (as Worker.preload builds them): what is checked is
what a kept runner holds, slot for slot, against a runner built afresh for the same share. ~3 s.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moelink.engine import EngineArgs, SamplingParams
from moelink.engine.cluster.elastic import survivor_placement
from moelink.engine.cluster.step_features import STEP_FEATURES
from moelink.engine.contract.expert_parallel import plan_expert_parallel
from moelink.engine.rank.keep_runner import growth_bytes, keep_blocker, keep_runner
from moelink.engine.config.model import ModelConfig
from moelink.engine.rank.model_runner import ModelRunner
from moelink.moe.expert_move import moe_layers, slot_bytes, slot_tensors
from moelink.moe.layer import ExpertParallel
from moelink.moe.placement import ExpertPlacement

CPU = torch.device("cpu")
KW = dict(dtype="float64", max_model_len=128, num_kv_blocks=16)


def _runner(path, ep_size: int, rank: int, placement: ExpertPlacement) -> ModelRunner:
    """A runner for `rank` of `placement`; `path` a checkpoint or a ModelConfig."""
    model_cfg = path if isinstance(path, ModelConfig) else EngineArgs(
        model=path, expert_parallel_size=ep_size, **KW).create_engine_config().model
    ep = ExpertParallel(rank, ep_size, placement, None, placement.to_tensors(CPU))
    return ModelRunner(model_cfg, 16, 16, CPU, ep=ep)


def _model(kind: str, tiny_model, fp8_tiny, tmp_path_factory):
    """(ModelConfig or tiny checkpoint path, checkpoint path) of one expert layout / format."""
    if kind in ("qwen3_e6k3", "mixtral_e5k3"):
        path = tiny_model(kind)
        return path, path
    if kind.startswith("fp8"):
        from tests.helpers.fp8_checkpoints import BLOCK

        src, dst, _ = fp8_tiny("qwen3_fp8", fused=kind == "fp8_fused")
        if kind == "fp8_online":  # a float checkpoint quantized as it loads (QuantizeOnLoad plan entries)
            return ModelConfig.from_pretrained(src, "float32", quantization="fp8", fp8_block_size=BLOCK), src
        return ModelConfig.from_pretrained(dst, "float32"), dst
    from tests.helpers.gpt_oss_checkpoints import save_gpt_oss

    path = save_gpt_oss(tmp_path_factory.mktemp("keep_gpt_oss") / "float", intermediate_size=32)
    if kind == "gpt_oss_mxfp4":
        from moelink.engine.tools.mxfp4_checkpoint import quantize_mxfp4_checkpoint

        path = str(quantize_mxfp4_checkpoint(path, tmp_path_factory.mktemp("keep_mxfp4") / "mxfp4"))
    return ModelConfig.from_pretrained(path, "float32"), path


@pytest.mark.parametrize("kind", ["qwen3_e6k3", "mixtral_e5k3", "fp8", "fp8_fused", "fp8_online", "gpt_oss",
                                  "gpt_oss_mxfp4"])
def test_a_kept_runner_holds_what_a_fresh_one_of_its_new_share_holds(tiny_model, fp8_tiny, tmp_path_factory,
                                                                       kind):
    """Per-expert and fused checkpoints, FP8 (with its block scales, also quantized on load), gpt-oss's fused
    interleaved experts with biases, MXFP4 blocks and scales: the kept runner's slots equal a fresh runner's."""
    spec, path = _model(kind, tiny_model, fp8_tiny, tmp_path_factory)
    num_experts = spec.num_experts if isinstance(spec, ModelConfig) else None
    old = (ExpertPlacement(num_experts=num_experts, ep_size=3) if num_experts is not None else
           plan_expert_parallel(EngineArgs(model=path, expert_parallel_size=3, **KW).create_engine_config()).placement)
    new = survivor_placement(old, [0, 2])  # rank 1 lost: its experts go to the survivors, appended
    runner = _runner(spec, 3, 2, old)  # old rank 2 becomes new rank 1
    kv_before = [t for layer in runner.kv_caches for t in layer]
    dense = runner.model.embed_tokens
    n_old = len(old.experts_on_rank(2))
    added = new.experts_on_rank(1)[n_old:]
    assert added, "the survivor must get an expert of the lost rank"
    want = growth_bytes(moe_layers(runner.model), len(added))
    assert keep_blocker(runner, 2, new.experts_on_rank(1), free_bytes=want) is None
    loaded = keep_runner(runner, ExpertParallel(1, 2, new, None, new.to_tensors(CPU)), path, False, ())
    fresh = _runner(spec, 2, 1, new)
    layers, ref = moe_layers(runner.model), moe_layers(fresh.model)
    assert loaded == sum(len(added) * slot_bytes(layer) for layer in ref)
    for a, b in zip(layers, ref):
        assert a.num_local_slots == b.num_local_slots == len(new.experts_on_rank(1))
        ta, tb = slot_tensors(a, a.num_local_slots), slot_tensors(b, b.num_local_slots)
        assert ta.keys() == tb.keys() and ta
        for n in ta:
            assert torch.equal(ta[n], tb[n]), (a.moe_index, n)
        for t in ("replica_count_G", "replica_rank_GX", "replica_slot_GX"):
            assert torch.equal(getattr(a.ep_tables, t), getattr(b.ep_tables, t)), t
        assert a.placement is new and a.ep is runner.ep
    assert runner.ep.rank == 1 and runner.ep.world_size == 2 and runner.ep.placement is new
    assert runner.model.expert_ids == fresh.model.expert_ids == list(new.experts_on_rank(1))
    # The KV cache and the dense weights are the same tensors: nothing else was reloaded or reallocated.
    assert [t for layer in runner.kv_caches for t in layer] == kv_before
    assert all(a is b for a, b in zip([t for layer in runner.kv_caches for t in layer], kv_before))
    assert runner.model.embed_tokens is dense


def test_keep_blocker_names_a_layout_change_a_memory_shortfall_and_a_missing_runner(tiny_model):
    path = tiny_model("qwen3_e6k3")
    old = ExpertPlacement(num_experts=6, ep_size=3)  # [0 1] [2 3] [4 5]
    new = survivor_placement(old, [0, 2])
    runner = _runner(path, 3, 0, old)
    share = new.experts_on_rank(0)
    need = growth_bytes(moe_layers(runner.model), len(share) - 2)
    assert need > 0 and keep_blocker(runner, 0, share, free_bytes=need) is None
    assert "MiB beside the old ones" in keep_blocker(runner, 0, share, free_bytes=need - 1)
    assert "no expert-parallel model runner" in keep_blocker(None, 0, share, free_bytes=need)
    # Online EPLB re-placed one layer (its rank-0 slots swapped): the share no longer starts with them.
    layer = moe_layers(runner.model)[1]
    layer.placement = ExpertPlacement(num_experts=6, ep_size=3, layout=[[1, 0], [2, 3], [4, 5]])
    why = keep_blocker(runner, 0, share, free_bytes=need)
    assert "MoE layer 1" in why and "layout change" in why


PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = [[(7 * i + j) % 50 + 3 for j in range(20 + 9 * i)] for i in range(5)]
_WANT: dict[str, dict[str, list[int]]] = {}


def _engine(path: str):
    from moelink.engine.core.llm_engine import LLMEngine

    # A small token budget: the broken step holds prompt chunks and new requests, not only decodes.
    return LLMEngine(EngineArgs(model=path, expert_parallel_size=1, max_num_batched_tokens=24, max_num_seqs=4,
                                **KW).create_engine_config())


def _drain(eng) -> dict[str, list[int]]:
    done = {}
    for _ in range(500):
        if not eng.has_requests():
            return done
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    raise AssertionError("requests did not finish")


@pytest.mark.parametrize("model", ["qwen3_e6k3", "gpt_oss"])
@pytest.mark.parametrize("ran", [False, True], ids=["never-sent", "ran-unanswered"])
def test_a_rewound_step_is_recomputed_alone_and_outputs_are_unchanged(tiny_model, tmp_path_factory, ran, model):
    """The step a loss broke either never reached the worker (lost while idle) or ran there with its answer
    lost: after Scheduler.rewind, the next steps recompute that one step, the worker's states are the
    scheduler's again (resync), and every output is the undisturbed one; no KV block leaks. gpt-oss: its
    sliding-window layers have their own block table (re-sent too), the prompts longer than its window."""
    if model == "gpt_oss":
        from tests.helpers.gpt_oss_checkpoints import save_gpt_oss

        path = save_gpt_oss(tmp_path_factory.mktemp("rewind_gpt_oss") / "float", num_hidden_layers=2)  # paired
    else:
        path = tiny_model(model)
    if model not in _WANT:  # the undisturbed outputs, once per model
        ref = _engine(path)
        try:
            for i, p in enumerate(PROMPTS):
                ref.add_request(f"r{i}", p, PARAMS)
            _WANT[model] = _drain(ref)
        finally:
            ref.shutdown()
    want = _WANT[model]
    eng = _engine(path)
    try:
        for i, p in enumerate(PROMPTS):
            eng.add_request(f"r{i}", p, PARAMS)
        for _ in range(2):  # then the broken step decodes r0, ends r1's prompt and admits r2 (24 tokens)
            eng.step()
        # The overlapped loop has a step in flight: collect it, so the broken step is the only one the loss hits
        # (two in flight are undone together: tests/ep/test_ep_elastic.py).
        eng._drain()
        sched = eng.schedulers[0]
        before = {rid: r.num_computed_tokens for rid, r in sched.requests.items()}
        broken = sched.schedule()
        assert broken.num_scheduled_tokens and any(n > 1 for n in broken.num_scheduled_tokens.values())
        assert broken.scheduled_new_reqs, "the broken step should admit a waiting request"
        if ran:
            eng.executor.execute([broken])  # the worker ran it; its sampled tokens never reach the scheduler
        sched.rewind(broken)
        # Computed up to where each request was before the broken step (a new one: nothing).
        assert {rid: r.num_computed_tokens for rid, r in sched.requests.items()} == {
            rid: before.get(rid, 0) for rid in sched.requests}
        running, waiting = {r.request_id for r in sched.running}, {r.request_id for r in sched.waiting}
        assert {n.req_id for n in broken.scheduled_new_reqs} <= running and waiting
        sent = []
        launch = eng.executor.launch
        eng.executor.launch = lambda outs: sent.append(outs[0]) or launch(outs)
        got = _drain(eng)
        nxt = sent[0]
        assert nxt.resync is not None and {n.req_id for n in nxt.resync.running} == running
        assert nxt.resync.waiting_ids == waiting
        if model == "gpt_oss":  # the sliding group's table travels with the resync
            assert eng.config.cache.sliding_window and all(n.sliding_block_ids for n in nxt.resync.running)
        assert nxt.num_scheduled_tokens == broken.num_scheduled_tokens  # that step again, nothing more
        assert all(so.resync is None for so in sent[1:])
        assert got == want
        s = eng.rank_stats()[0]
        assert s.num_free_blocks == s.num_total_blocks
        assert not eng.executor.worker.runner.requests
    finally:
        eng.shutdown()


def test_worker_keeps_only_when_it_can_and_otherwise_changes_nothing(tiny_model, monkeypatch):
    from dataclasses import replace

    from moelink.engine.rank import keep_runner as kr
    from moelink.engine.rank.worker import Worker

    path = tiny_model("qwen3_e6k3")
    config = EngineArgs(model=path, expert_parallel_size=3, **KW).create_engine_config()
    plan = plan_expert_parallel(config)
    new_plan = replace(plan, placement=survivor_placement(plan.placement, [0, 2]))
    worker = Worker(config.worker_config(), 2, plan, step_features=STEP_FEATURES)
    worker.runner = _runner(path, 3, 2, plan.placement)
    monkeypatch.setattr(kr, "free_device_bytes", lambda device, util: 0)  # nothing fits beside the old slots
    why = worker.reconfigure_keep(1, 2, new_plan)
    assert why.startswith("rank 2: ") and "MiB beside the old ones" in why
    assert (worker.rank, worker.world_size, worker.plan, worker._keeping) == (2, 3, plan, False)
    monkeypatch.setattr(kr, "free_device_bytes", lambda device, util: 1 << 40)
    worker.elastic_test_refuse_keep("refused")
    assert worker.reconfigure_keep(1, 2, new_plan) == "rank 2: refused"
    worker.elastic_test_refuse_keep(None)
    assert worker.reconfigure_keep(1, 2, new_plan) is None
    assert (worker.rank, worker.world_size, worker.plan, worker._keeping) == (1, 2, new_plan, True)
    assert worker.config.world_size == 2 and worker.runner is not None
    worker.reconfigure(1, 2, new_plan)  # the driver's fallback when another rank refused: a full rebuild
    assert worker.runner is None and not worker._keeping


class _Remote:
    def __init__(self, log: list, name: str, answer=None):
        self.log, self.name, self.answer = log, name, answer

    def remote(self, *args):
        self.log.append((self.name, args))
        return self.answer(*args) if callable(self.answer) else self.answer


class _FakeWorker:
    def __init__(self, refuse: str | None):
        self.log: list = []
        self.reconfigure_keep = _Remote(self.log, "reconfigure_keep", refuse)
        for name in ("reconfigure", "init_distributed", "load", "allocate_kv_cache"):
            setattr(self, name, _Remote(self.log, name))
        self.pick_master = _Remote(self.log, "pick_master", ("127.0.0.1", 1))
        self.available_kv_blocks = _Remote(self.log, "available_kv_blocks", 40)


@pytest.mark.parametrize("refusing", [(), (1,)])
def test_reform_group_keeps_all_runners_or_rebuilds_all_logging_once(refusing, monkeypatch, caplog):
    """The driver's side (engine/cluster/elastic.py reform_group with keep): every survivor keeps, and then no rank
    rebuilds or re-sizes its KV cache; or one cannot, and every rank rebuilds (and the caches are sized)."""
    from moelink.engine.cluster import elastic

    monkeypatch.setattr(elastic, "_gather", lambda refs, timeout, what: list(refs))
    workers = [_FakeWorker(f"rank {r}: no room" if r in refusing else None) for r in range(3)]
    config = SimpleNamespace(cache=SimpleNamespace(num_kv_blocks=None))  # the KV cache sized by the ranks
    with caplog.at_level("WARNING", logger="moelink.engine.cluster.elastic"):
        addr, port, blocks, kept = elastic.reform_group(workers, "plan", config, keep=True)
    assert kept == (not refusing) and (addr, port) == ("127.0.0.1", 1)
    for w in workers:
        names = [n for n, _ in w.log]
        assert names[0] == "reconfigure_keep" and ("reconfigure" in names) == bool(refusing)
        assert ("allocate_kv_cache" in names) == bool(refusing) and "load" in names
    assert blocks == (40 if refusing else None)
    warnings = [r for r in caplog.records if "rebuild their model runners" in r.getMessage()]
    assert len(warnings) == (1 if refusing else 0)
    if refusing:
        assert "rank 1: no room" in warnings[0].getMessage()
