"""moelink.comm: communication for expert parallelism: process groups and the all-to-all backends.

`init_process_group` / `find_free_port` / `destroy` set up the EP group;
`make_all_to_all(name, group, rank, world_size, device)` builds the dispatch /
combine strategy ("none", "torch", "torch_padded", "nccl"). The NCCL backend is
imported lazily (GPU only). `link_model` holds the bandwidth/latency models of links.
It moves rows of tensors; which expert a row is for is the caller's (moe/) business.
Must not import: benchmarks, engine, engine.server, planner, scheduler, moe.
"""
from .all_to_all import AllToAll, DispatchMeta, PlacementTables, make_all_to_all, select_replicas
from .process_group import backend_for_device, destroy, find_free_port, init_process_group

__all__ = ["AllToAll", "DispatchMeta", "PlacementTables", "backend_for_device", "destroy", "find_free_port",
           "init_process_group", "make_all_to_all", "select_replicas"]
