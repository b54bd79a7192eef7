"""ParallelConfig: how an engine's ranks are laid out (data-parallel attention, expert parallelism, tensor-parallel
groups inside a node, the executor and the elastic-EP timings), validated field by field; ModelConfig
(engine/config/model.py) is the checkpoint's side.
"""
from __future__ import annotations

from dataclasses import dataclass

from moelink.comm.backends import resolve_backend
from moelink.comm.two_level import check_node_of_rank

from .tensor_parallel import check_tp_layout
from .timeouts import (DEFAULT_HEARTBEAT_TIMEOUT_S, DEFAULT_REJOIN_DELAY_S, DEFAULT_STEP_TIMEOUT_S, check_rejoin,
                       check_seconds)

_EXECUTORS = ("auto", "inprocess", "mp", "ray")


@dataclass
class ParallelConfig:
    """Data-parallel attention + expert-parallel MoE over the same `expert_parallel_size` ranks.

    Every rank runs attention for its own requests and holds 1/N of the experts.
    `executor` "auto" is in-process for one rank and Ray beyond; "mp" runs the one rank in a process of its own
    (engine/cluster/mp_executor.py: the forward beside the driver's scheduling and streaming); `ray_address`
    None starts a local Ray instance, "auto" joins the running cluster, or give
    an address. `all_to_all` names a backend of moelink.comm.backends: "auto"
    picks "none" for one rank and "torch" otherwise (gloo on CPU, NCCL on GPU).

    The node-aware backend ("two_level") needs the node (NVLink domain) of each
    rank. By default the Ray executor reads it from its placement group (the
    Ray node of each rank's bundle). `ep_nvlink_domain_size` N overrides it:
    consecutive groups of N ranks share a domain (GB200 NVL72: 72); N >= the
    rank count is one domain. `ep_node_ids` (for tests and simulation: several
    "nodes" on one machine) gives the node number of each rank outright.
    picks "none" for one rank and "torch" otherwise (gloo on CPU, NCCL on GPU);
    the fixed-capacity ones ("torch_padded", "nccl") run two dispatch modes
    picked per step (comm/ep_modes.py), low-latency at `ep_decode_capacity`.
    """

    expert_parallel_size: int = 1
    executor: str = "auto"
    ray_address: str | None = None
    all_to_all: str = "auto"
    num_redundant_experts: int = 0
    # Online EPLB (moe/eplb.py, engine/cluster/eplb_controller.py): every eplb_interval steps the driver re-places the
    # experts from the expert load of the last eplb_interval steps and the ranks move weights to match; 0: off.
    eplb_interval: int = 0
    # Bytes (MiB) one rank may stage in one move chunk of online EPLB (engine/cluster/eplb_controller.py); None: the
    # largest expert slot x the most slots a rank holds x the chunk's layers (what a chunk can need at most).
    eplb_staging_mb: float | None = None
    # Rows per (source, destination) block of a low-latency (decode-only) dispatch on the fixed-capacity
    # backends (torch_padded, nccl): the most tokens one rank may have in a step that runs low-latency;
    # None: max_num_seqs (every decode batch fits). Larger decode steps run high-throughput (engine/contract/ep_step.py).
    ep_decode_capacity: int | None = None
    # Watchdogs of a multi-rank engine (see RayExecutor): a model step that takes longer than
    # step_timeout_s fails the engine (the first model step, which JIT-compiles kernels, gets at least
    # timeouts.FIRST_STEP_TIMEOUT_S); a rank that answers no heartbeat for heartbeat_timeout_s (frozen, wedged
    # or unreachable) fails it too, whether or not a step is running. One collective may wait
    # comm_timeout_s for its peers, so step_timeout_s is longer: a lost peer is reported by its rank.
    step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S
    heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S
    comm_timeout_s: float = 60.0
    ep_nvlink_domain_size: int | None = None
    ep_node_ids: tuple[int, ...] | None = None
    # Two micro-batches per step, each one's compute overlapping the other's all-to-all (engine/rank/step_plan.py).
    # Only EP > 1 has an all-to-all to overlap: at one rank steps run as one batch.
    enable_two_batch_overlap: bool = False
    # Elastic EP (engine/cluster/elastic.py): a lost rank (killed, actor lost, silent) is dropped and the engine goes on
    # at EP N-1, its requests recomputed, instead of failing, when at least 2 ranks survive (EP >= 3). Off, or
    # at EP 2: the fail-fast watchdogs, as before.
    elastic_ep: bool = True
    # Rejoin (engine/cluster/rejoin.py): after a loss, a replacement rank is started in the lost rank's placement-group
    # bundle ep_rejoin_delay_s later, pre-loads its share in the background and is admitted at a step boundary:
    # the group returns to EP N. None: on exactly when elastic_ep is.
    ep_rejoin: bool | None = None
    ep_rejoin_delay_s: float = DEFAULT_REJOIN_DELAY_S
    # Tensor parallelism (docs/tensor-parallelism.md): groups of this many consecutive ranks split attention, dense
    # MLPs, embedding and LM head; the world is tensor_parallel_size x data_parallel_size (DP attention), the
    # experts in EP over the whole world. expert_parallel_size, when > 1, is that world (a multiple of this).
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        n = self.expert_parallel_size
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"expert_parallel_size={n!r} is invalid: must be a positive integer.")
        # The TP layout's checks (engine/config/tensor_parallel.py).
        self.elastic_ep = check_tp_layout(self)
        n = self.world_size
        if self.executor not in _EXECUTORS:
            raise ValueError(f"executor={self.executor!r} is invalid: choose from {', '.join(_EXECUTORS)}.")
        if self.executor in ("inprocess", "mp") and n > 1:
            raise ValueError(f"executor={self.executor!r} runs one rank; a world of {n} ranks (expert_parallel_size="
                             f"{self.expert_parallel_size}, tensor_parallel_size={self.tensor_parallel_size}) needs "
                             "executor='ray' or 'auto'.")
        # The registry owns the names and "auto"; it also refuses a backend that cannot run at n ranks.
        resolve_backend(self.all_to_all, n)
        cap = self.ep_decode_capacity
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
            raise ValueError(f"ep_decode_capacity={cap!r} is invalid: must be a positive integer (tokens per rank "
                             "of a low-latency decode dispatch) or None (max_num_seqs).")
        if not isinstance(self.num_redundant_experts, int) or self.num_redundant_experts < 0:
            raise ValueError(f"num_redundant_experts={self.num_redundant_experts!r} is invalid: must be an integer >= 0.")
        if isinstance(self.eplb_interval, bool) or not isinstance(self.eplb_interval, int) or self.eplb_interval < 0:
            raise ValueError(f"eplb_interval={self.eplb_interval!r} is invalid: must be an integer >= 0 (steps "
                             "between expert re-placements; 0 = off).")
        if self.eplb_interval and n == 1:
            raise ValueError(f"eplb_interval={self.eplb_interval} needs expert_parallel_size > 1: one rank holds "
                             "every expert, there is nothing to re-place.")
        mb = self.eplb_staging_mb
        if mb is not None and (isinstance(mb, bool) or not isinstance(mb, (int, float)) or not mb > 0
                               or mb * 2**20 < 1):
            raise ValueError(f"eplb_staging_mb={mb!r} is invalid (--eplb-staging-mb): must be a number of MiB > 0 "
                             "(a rank's staging for one online-EPLB move chunk), or None for the default.")
        for name in ("step_timeout_s", "heartbeat_timeout_s", "comm_timeout_s"):
            check_seconds(name, getattr(self, name))
        if not isinstance(self.enable_two_batch_overlap, bool):
            raise ValueError(f"enable_two_batch_overlap={self.enable_two_batch_overlap!r} is invalid: must be True "
                             "or False.")
        if not isinstance(self.elastic_ep, bool):
            raise ValueError(f"elastic_ep={self.elastic_ep!r} is invalid: must be True or False.")
        check_rejoin(self.ep_rejoin, self.ep_rejoin_delay_s, self.elastic_ep)
        self._check_node_map()

    @property
    def experts_split_by_tp(self) -> bool:
        """-tp N with expert_parallel_size 1: every rank holds every expert, split by intermediate size over its TP
        group (an all-reduce after the MoE block), as vLLM runs TP without --enable-expert-parallel; with
        expert_parallel_size > 1 the experts are in EP over the world instead."""
        return self.tensor_parallel_size > 1 and self.expert_parallel_size == 1

    @property
    def expert_world_size(self) -> int:
        """The ranks the experts are placed over (the EP plan's size): 1 when TP splits them, else the world."""
        return 1 if self.experts_split_by_tp else self.world_size

    @property
    def data_parallel_size(self) -> int:
        """Data-parallel attention groups (one scheduler each): the world over tensor_parallel_size."""
        return self.world_size // self.tensor_parallel_size

    def _check_node_map(self) -> None:
        n, size = self.world_size, self.ep_nvlink_domain_size
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"ep_nvlink_domain_size={size!r} is invalid: must be a positive integer (ranks "
                                 "per NVLink domain, e.g. 8 for an HGX node, 72 for a GB200 NVL72).")
            if size < n and n % size:
                raise ValueError(f"ep_nvlink_domain_size={size} is invalid for expert_parallel_size={n}: domains are "
                                 f"groups of consecutive ranks, so the size must divide {n} (or be >= {n}: one "
                                 "domain).")
        if self.ep_node_ids is not None:
            if size is not None:
                raise ValueError("ep_node_ids and ep_nvlink_domain_size both set: give one node map, not two.")
            self.ep_node_ids = check_node_of_rank(self.ep_node_ids, n, "ep_node_ids")
        if (size is not None or self.ep_node_ids is not None) and self.all_to_all != "two_level":
            which = "ep_nvlink_domain_size" if size is not None else "ep_node_ids"
            raise ValueError(f"{which} is set but all_to_all={self.all_to_all!r}: the node map is only used by "
                             "the node-aware backend, all_to_all='two_level'.")

    def node_of_rank(self) -> tuple[int, ...] | None:
        """The node number of each rank from the flags (ep_node_ids, else ep_nvlink_domain_size); None: read
        it from the Ray placement group."""
        if self.ep_node_ids is not None:
            return tuple(self.ep_node_ids)
        if self.ep_nvlink_domain_size is not None:
            return tuple(r // self.ep_nvlink_domain_size for r in range(self.world_size))
        return None

    @property
    def world_size(self) -> int:
        """Every rank: expert_parallel_size, or one TP group when that is 1 (-tp N alone runs N ranks)."""
        return max(self.expert_parallel_size, self.tensor_parallel_size)

    @property
    def rejoin_enabled(self) -> bool:
        """Whether a lost rank is replaced (ep_rejoin, by default elastic_ep; off by default under TP, where a loss
        takes a whole TP group out and a replacement is one rank)."""
        if self.ep_rejoin is None:
            return self.elastic_ep and self.tensor_parallel_size == 1
        return self.ep_rejoin

    @property
    def resolved_executor(self) -> str:
        if self.executor != "auto":
            return self.executor
        return "inprocess" if self.world_size == 1 else "ray"


__all__ = ["ParallelConfig"]
