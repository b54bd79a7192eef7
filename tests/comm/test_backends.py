"""The all-to-all registry: the one list of names, "auto", the errors, and what each spec says about its backend."""
from __future__ import annotations

import pytest

from moelink.comm.a2a_base import AllToAll
from moelink.comm.all_to_all import NoAllToAll, TorchAllToAll
from moelink.comm.backends import ALL_TO_ALL_NAMES, BACKENDS, AllToAllSpec, resolve_backend
from moelink.engine.config.parallel import ParallelConfig


def test_names_and_auto():
    assert ALL_TO_ALL_NAMES == ("auto", "none", "torch", "torch_padded", "nccl", "two_level")
    assert resolve_backend("auto", 1).name == "none"
    assert resolve_backend("auto", 2).name == resolve_backend("auto", 72).name == "torch"
    for name in BACKENDS:
        assert resolve_backend(name, 1) is BACKENDS[name]


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_specs_say_what_the_engine_needs_to_know():
    # Capacity: the fixed-block backends (comm/nccl_all_to_all.py) size their buffers once.
    assert [n for n, s in BACKENDS.items() if s.needs_capacity] == ["torch_padded", "nccl"]
    # Graph-safe: no host sync inside dispatch / combine; "torch" reads the counts on the host.
    assert [n for n, s in BACKENDS.items() if not s.graph_safe] == ["torch", "two_level"]
    # Node map: the node-aware backend is built with the node of each rank.
    assert [n for n, s in BACKENDS.items() if s.needs_node_map] == ["two_level"]
    assert [n for n, s in BACKENDS.items() if not s.accepts_world_size(2)] == ["none"]


def test_unknown_and_misplaced_names_are_one_clear_error():
    with pytest.raises(ValueError, match=r"all_to_all='mpi' is invalid: choose from auto, none, torch, "
                                         r"torch_padded, nccl, two_level\."):
        resolve_backend("mpi", 2)
    with pytest.raises(ValueError, match=r"all_to_all=None is invalid"):
        resolve_backend(None, 2)
    with pytest.raises(ValueError, match=r"all_to_all='none' is for world size 1, got world size 4: use 'auto' "
                                         r"or one of torch, torch_padded, nccl, two_level\."):
        resolve_backend("none", 4)


def test_engine_config_validates_through_the_registry():
    assert ParallelConfig(expert_parallel_size=2, all_to_all="torch_padded").all_to_all == "torch_padded"
    with pytest.raises(ValueError, match=r"all_to_all='mpi' is invalid: choose from auto, none"):
        ParallelConfig(all_to_all="mpi")
    # Refused on the driver, before any worker starts (it used to fail inside each rank's load).
    with pytest.raises(ValueError, match=r"all_to_all='none' is for world size 1, got world size 2"):
        ParallelConfig(expert_parallel_size=2, all_to_all="none")


def test_cli_offers_the_registry_names():
    # The CLI keeps its own literal list (building the parser must not import torch): it must not drift.
    import argparse

    from moelink.engine.api.cli import add_engine_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    (action,) = [a for a in parser._actions if a.dest == "all_to_all"]
    assert tuple(action.choices) == ALL_TO_ALL_NAMES


def test_build_checks_capacity_and_builds_the_named_class():
    assert isinstance(BACKENDS["none"].build(None, 0, 1, "cpu"), NoAllToAll)
    with pytest.raises(ValueError, match="process group"):
        BACKENDS["torch"].build(None, 0, 2, "cpu")
    assert BACKENDS["torch"].factory is TorchAllToAll
    with pytest.raises(ValueError, match=r"'torch_padded' needs max_tokens_per_rank"):
        BACKENDS["torch_padded"].build(None, 0, 1, "cpu")
    padded = BACKENDS["torch_padded"].build(None, 0, 1, "cpu", max_tokens_per_rank=4)
    assert isinstance(padded, AllToAll) and padded.name == "torch_padded" and padded.capacity == 4
    with pytest.raises(ValueError, match="max_world_size"):
        AllToAllSpec("x", needs_capacity=False, graph_safe=False, max_world_size=0, factory=NoAllToAll)
