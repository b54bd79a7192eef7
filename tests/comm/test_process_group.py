"""Process-group set-up: free ports, argument checks, and failures that must surface as errors, not hangs."""
from __future__ import annotations

import socket

import pytest
import torch

from moelink.comm import backend_for_device, find_free_port, init_process_group


def test_find_free_port_is_bindable():
    port = find_free_port("127.0.0.1")
    assert 0 < port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_backend_follows_device():
    assert backend_for_device("cpu") == "gloo"
    assert backend_for_device(torch.device("cuda", 0)) == "nccl"


@pytest.mark.parametrize("kwargs, field", [
    (dict(rank=2, world_size=2), "rank"),
    (dict(rank=0, world_size=0), "world_size"),
    (dict(master_port=0), "master_port"),
    (dict(master_port=70000), "master_port"),
    (dict(master_addr=""), "master_addr"),
    (dict(backend="mpi"), "backend"),
    (dict(timeout_s=0), "timeout_s"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    args = dict(rank=0, world_size=2, master_addr="127.0.0.1", master_port=29500, backend="gloo", timeout_s=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        init_process_group(**args)


@pytest.fixture(scope="module")
def failures(ep_launch):
    """Three failing groups, run at the same time:
    "die": rank 1 exits right after joining; "stall": rank 1 stays alive but never joins a collective
    (timeout_s=2); "lonely": a 2-rank group that only rank 0 joins (timeout_s=2)."""
    die, stall, lonely = ep_launch(dict(world_size=2, mode="die"), dict(world_size=2, mode="stall"),
                                   dict(world_size=2, mode="lonely", ranks=[0]), timeout_s=60)
    return dict(die=die, stall=stall, lonely=lonely)


@pytest.mark.parametrize("mode, within_s", [("die", 10), ("stall", 15)])
def test_lost_peer_raises_instead_of_hanging(failures, mode, within_s):
    # Rank 0's next dispatch must raise, well before the test's own deadline.
    result, peer = failures[mode]
    assert peer == dict(peer=mode)
    assert result["error"] is not None
    assert result["elapsed_s"] < within_s
    if mode == "stall":
        assert result["elapsed_s"] > 1.5  # it waited for the configured timeout, not less


def test_missing_peer_times_out_at_rendezvous(failures):
    (result,) = failures["lonely"]
    assert "Timed out" in result["error"] or "timeout" in result["error"].lower()
    assert result["elapsed_s"] < 20


def test_rendezvous_store_listens_on_the_group_address_only(listening):
    """Rank 0's store is an unauthenticated key-value server: it must not listen on every interface."""
    import torch.distributed as dist

    from moelink.comm import destroy

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    port = find_free_port("127.0.0.1")
    init_process_group(0, 1, "127.0.0.1", port, "gloo", timeout_s=10.0)
    try:
        assert listening(port) == {("127.0.0.1", port)}
        # The group works on that store.
        t = torch.ones(3)
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0, 1.0]
    finally:
        destroy()
