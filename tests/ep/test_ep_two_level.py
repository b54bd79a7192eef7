"""The two_level all-to-all in the engine: EP 4 as 2 simulated nodes x 2 ranks on Ray (CPU, gloo).

Oracle: the same prompts on one rank, float64, greedy: tokens must be identical. The node map comes from
`--ep-nvlink-domain-size 2` (nodes [0, 0, 1, 1]) or the test hook `ep_node_ids` (interleaved [0, 1, 0, 1]):
one machine, two "nodes"; the placement group's own map (one Ray node here) is read too. The inter-node counters must be non-zero, consistent with the dispatch counters,
and exported unchanged as Prometheus metrics.
"""
from __future__ import annotations

import pytest

from moelink.comm.two_level import node_numbers
from moelink.engine import LLM

from tests.helpers import ep_runs
from tests.helpers.ep_runs import ENGINE_KW, MAX_NEW, greedy as _greedy
from tests.helpers.tiny_configs import TINY_CONFIGS

pytestmark = pytest.mark.slow

NAME = "qwen3_e6k3"


def _scrape(registry) -> dict[str, float]:
    from prometheus_client import generate_latest

    out = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


@pytest.fixture(scope="module")
def reference(local_ray, tiny_model):
    """Prompts, one rank's greedy tokens, and the dispatch bytes of the one-level "torch" backend at EP 4: the run
    tests/ep/test_ep_ray.py checks too (tests/helpers/ep_runs.py, made once per process; its tokens must be one
    rank's)."""
    vocab = TINY_CONFIGS[NAME]["vocab_size"]
    path = tiny_model(NAME)
    prompts, want = ep_runs.one_rank(path, vocab)
    torch_run = ep_runs.ep_run(path, vocab, 4, all_to_all="torch")
    assert torch_run.tokens == want
    return path, prompts, want, torch_run.bytes_dispatched


@pytest.mark.parametrize("node_map,nodes", [(dict(ep_nvlink_domain_size=2), (0, 0, 1, 1)),
                                            (dict(ep_node_ids=[0, 1, 0, 1]), (0, 1, 0, 1))])
def test_two_simulated_nodes_match_one_rank_and_count_the_network(reference, node_map, nodes):
    from moelink.engine.core.metrics import EngineMetrics

    cfg = TINY_CONFIGS[NAME]
    path, prompts, want, torch_bytes = reference
    llm = LLM(path, expert_parallel_size=4, all_to_all="two_level", **node_map, **ENGINE_KW)
    try:
        engine = llm.engine
        # The flags' map reaches every rank; the placement group's (one Ray node here) is read all the same.
        assert engine.ep_plan.node_of_rank == nodes and engine.executor.plan is engine.ep_plan
        assert len(engine.executor.node_ids) == 4 and node_numbers(engine.executor.node_ids) == (0, 0, 0, 0)
        got = _greedy(llm, prompts)
        assert got == want
        m = engine.moe_metrics
        computed = sum(len(p) + MAX_NEW - 1 for p in prompts)
        assert m.total_routed() == computed * cfg["top_k"] * cfg["num_layers"]
        row_bytes = cfg["hidden_size"] * 8
        # Two nodes: a token crosses at most once per MoE layer (one remote node), and some do.
        assert 0 < m.inter_node_rows <= computed * cfg["num_layers"]
        assert m.bytes_inter_node == m.inter_node_rows * row_bytes
        # Crossing rows are dispatch rows too: never more than the rows that went to another node's ranks.
        assert m.bytes_inter_node < m.bytes_dispatched == m.bytes_combined
        # Dispatch rows are one per (token, destination rank) whatever the path: the one-level backend's count.
        assert m.bytes_dispatched == torch_bytes
        metrics = EngineMetrics()
        metrics.attach(engine)
        scraped = _scrape(metrics.registry)
        assert scraped["moelink_all_to_all_inter_node_bytes_total"] == m.bytes_inter_node > 0
        assert scraped["moelink_all_to_all_inter_node_rows_total"] == m.inter_node_rows
        assert scraped["moelink_all_to_all_bytes_total{direction=\"dispatch\"}"] == m.bytes_dispatched
    finally:
        llm.engine.shutdown()


def test_placement_group_node_map_by_default(reference):
    """No flag: the map is the placement group's. All four bundles sit on this one Ray node, so two_level is
    the one-level exchange: same tokens, same dispatch bytes, nothing crosses a node."""
    path, prompts, want, torch_bytes = reference
    llm = LLM(path, expert_parallel_size=4, all_to_all="two_level", **ENGINE_KW)
    try:
        engine = llm.engine
        assert engine.ep_plan.node_of_rank == node_numbers(engine.executor.node_ids) == (0, 0, 0, 0)
        assert _greedy(llm, prompts) == want
        m = engine.moe_metrics
        assert m.bytes_dispatched == torch_bytes and m.bytes_inter_node == m.inter_node_rows == 0
    finally:
        llm.engine.shutdown()
