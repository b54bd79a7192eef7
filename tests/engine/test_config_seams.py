"""The seams between configuration and runtime: KV sizing as pure functions, the worker's own config,
and imports that point one way (checked on the source, lazy imports inside functions included)."""
from __future__ import annotations

import pytest
import torch

from moelink.engine import EngineArgs
from moelink.engine.config import kv_sizing
from moelink.engine.config.worker_config import WorkerConfig

from tests.helpers.import_graph import build_graph, reachable

@pytest.fixture(scope="module")
def graph():
    return build_graph()


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_engine_args_do_not_load_the_model_runner(graph):
    reached = reachable(graph, "engine.config.engine_args")
    for runtime in ("engine.rank.model_runner", "engine.rank.loader", "engine.rank.cuda_graph", "engine.rank.sampler"):
        assert runtime not in reached, f"engine_args reaches {runtime}"
    assert not any(m.startswith("kernels") for m in reached), sorted(reached)


def test_executors_form_no_cycle(graph):
    executor, ray_executor = graph.edges["engine.cluster.executor"], graph.edges["engine.cluster.ray_executor"]
    assert "engine.cluster.ray_executor" not in executor
    assert "engine.cluster.executor" in ray_executor
    for imported in (executor, ray_executor):
        assert "engine.cluster.executor_factory" not in imported


def test_scheduler_imports_nothing_above_it(graph):
    for module, imported in graph.edges.items():
        if module.startswith("scheduler"):
            assert all(m.startswith("scheduler") for m in imported), f"{module} imports {sorted(imported)}"
            assert "torch" not in graph.external[module]


def test_kv_sizing_rules(tiny_model):
    cfg = EngineArgs(model=tiny_model("qwen3_e6k3"), dtype="float32", max_model_len=256).create_engine_config()
    m = cfg.model
    per_block = kv_sizing.kv_cache_bytes_per_block(m, 16)
    # K and V, every layer, 16 tokens, each KV head's head_dim float32 values.
    assert per_block == 2 * m.num_layers * 16 * m.num_kv_heads * m.head_dim * 4
    # CPU default: every sequence at full length (256 tokens = 16 blocks each).
    assert kv_sizing.driver_num_kv_blocks(m, 16, None, None, "cpu", max_num_seqs=3) == 3 * 16
    assert kv_sizing.driver_num_kv_blocks(m, 16, 7, None, "cpu", 3) == 7
    assert kv_sizing.driver_num_kv_blocks(m, 16, None, 5 * per_block + 1, "cuda", 3) == 5
    assert kv_sizing.driver_num_kv_blocks(m, 16, None, None, "cuda", 3) is None  # the ranks size it
    with pytest.raises(ValueError, match="kv_cache_memory_bytes=.* leaves no room for one KV block"):
        kv_sizing.driver_num_kv_blocks(m, 16, None, per_block - 1, "cpu", 3)
    # A GPU of 100 bytes, 40 free, at most 90% full: 30 bytes for the cache, 3 blocks of 10 less the null block.
    assert kv_sizing.blocks_in_budget(kv_sizing.gpu_kv_budget_bytes(100, 40, 0.9), 10) == 2
    assert kv_sizing.blocks_in_budget(kv_sizing.gpu_kv_budget_bytes(100, 5, 0.9), 10) == 0
    assert kv_sizing.cpu_kv_budget_bytes(1 << 40, 0.5) == kv_sizing.CPU_KV_CAP_BYTES
    assert kv_sizing.common_num_kv_blocks([9, 4, 12]) == 4
    with pytest.raises(ValueError, match="gpu_memory_utilization leaves no memory for the KV cache"):
        kv_sizing.common_num_kv_blocks([9, 0])


def test_worker_config_holds_what_a_worker_needs(tiny_model):
    cfg = EngineArgs(model=tiny_model("qwen3_e6k3"), dtype="float32", max_model_len=256, num_kv_blocks=32,
                     max_num_batched_tokens=512).create_engine_config()
    wc = cfg.worker_config()
    assert (wc.model, wc.device, wc.block_size, wc.num_kv_blocks) == (cfg.model, cfg.device, 16, 32)
    assert wc.world_size == 1 and wc.comm_timeout_s == cfg.parallel.comm_timeout_s and wc.cuda_graph_sizes == ()
    with pytest.raises(ValueError, match=r"WorkerConfig.block_size=0 is invalid: must be a positive integer"):
        WorkerConfig(cfg.model, torch.device("cpu"), 0, None, "auto", (), False, 0.9, 1, 60.0)
