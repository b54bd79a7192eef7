"""moelink.comm: communication for expert parallelism: process groups and the all-to-all backends.

`init_process_group` / `find_free_port` / `destroy` set up the EP group;
`resolve_backend(name, world_size)` picks the dispatch / combine strategy's
`AllToAllSpec` ("auto", "none", "torch", "torch_padded", "nccl"; registry in
backends.py) and `make_all_to_all(name, group, rank, world_size, device)`
builds it. The interface (`AllToAll`, `DispatchMeta`, `ExpertRoute`) is in
a2a_base.py. The fixed-capacity backends run two dispatch modes picked per step
(ep_modes.py: low-latency, high-throughput; `dispatch_wire_bytes` is their byte
formula). The NCCL backend is imported lazily (GPU only). `link_model` holds
the bandwidth/latency models of links. comm moves rows of tensors; which expert a
row is for is the caller's (moe/) business, asked through `ExpertRoute`.
Must not import: benchmarks, engine (every sub-package), planner, scheduler, moe.
"""
from .a2a_base import AllToAll, DispatchMeta, ExpertRoute
from .backends import ALL_TO_ALL_NAMES, AllToAllSpec, make_all_to_all, resolve_backend
from .process_group import backend_for_device, destroy, find_free_port, init_process_group

__all__ = ["ALL_TO_ALL_NAMES", "AllToAll", "AllToAllSpec", "DispatchMeta", "ExpertRoute", "backend_for_device",
           "destroy", "find_free_port", "init_process_group", "make_all_to_all", "resolve_backend"]
