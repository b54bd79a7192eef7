"""Weights from a trainer's process group (SGLang's `init_weights_update_group` / `update_weights_from_distributed`;
docs/rl.md): what the driver sends every rank, and what each rank answers.

The trainer is rank 0 of a group of its own (comm/process_group.side_group: never the engine's EP/TP groups); engine
rank r joins it as `rank_offset + r`. The trainer broadcasts each tensor whole, in the order the update names them;
every rank receives them a bucket at a time (at most `bucket_bytes`, or one tensor when a tensor is larger) and
writes each bucket in place through the plan its load used (its experts, its TP slice), so an update holds one
bucket beyond the served weights, and the old bytes it overwrote (at most `rollback_bytes` a rank, in host memory) to
roll it back on every rank if it fails (engine/rl/rank/rollback.py; `finish_weights_update` keeps or restores them once
every rank answered).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config.checkpoint_files import HeaderBounds
from .safe_text import shown
from ..config.timeouts import (DEFAULT_GROUP_TIMEOUT_S, DEFAULT_JOIN_TIMEOUT_S, MAX_GROUP_TIMEOUT_S,
                               MAX_JOIN_TIMEOUT_S, check_bounded_seconds)

DEFAULT_BUCKET_BYTES = 512 << 20  # what a rank receives before it writes (the most an update holds beside the weights)
# Old bytes a rank may hold in host memory to roll a failed update back (engine/rl/rank/rollback.py); 0: no rollback.
DEFAULT_ROLLBACK_BYTES = 1 << 30
DEFAULT_TIMEOUT_S = DEFAULT_GROUP_TIMEOUT_S  # a trainer silent this long fails the tensor being received
GROUP_BACKENDS = ("gloo", "nccl")
# A weight_version is echoed with every output of every request (each streamed chunk): a label, not a payload.
MAX_WEIGHT_VERSION_CHARS = 256


def check_weight_version(value) -> None:
    """`weight_version` of an update: None (no label) or a string of at most MAX_WEIGHT_VERSION_CHARS printable ASCII
    characters (space to '~'): it goes out with every later output of every user (a 60 MB label made another user's
    16-token stream 960 MB), and into logs and headers, where control characters do not belong."""
    if value is None:
        return
    if not isinstance(value, str):
        raise ValueError(f"weight_version={type(value).__name__} is invalid: must be a string (a version label).")
    if len(value) > MAX_WEIGHT_VERSION_CHARS or not all(" " <= c <= "~" for c in value):
        what = (f"{len(value)} characters" if len(value) > MAX_WEIGHT_VERSION_CHARS
                else "it holds a character outside printable ASCII")
        raise ValueError(f"weight_version is invalid ({what}): must be at most {MAX_WEIGHT_VERSION_CHARS} printable "
                         "ASCII characters (space to '~').")


# The formats a trainer's float weight is re-quantized into (engine/rl/requantize.py does it, on the driver for a
# tensor update, on each rank for a broadcast: the plan of it travels to the ranks in a DistributedUpdate).
FORMATS = ("fp8", "mxfp4", "nvfp4", "int4", "gptq", "awq")


@dataclass(frozen=True)
class Requant:
    """How one float tensor a trainer sends becomes served tensors: `fmt` (FORMATS), the float tensor's `shape`,
    the served tensors it makes, (name, safetensors dtype, shape) each, and the format's parameters (FP8's `block`,
    INT4's `group` and `symmetric`, GPTQ's `gptq_v1`: zero points stored minus one)."""

    fmt: str
    shape: tuple[int, ...]
    outputs: tuple[tuple[str, str, tuple[int, ...]], ...]
    block: tuple[int, int] = (128, 128)
    group: int = 32
    symmetric: bool = True
    gptq_v1: bool = False

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"Requant.fmt={self.fmt!r} is invalid: choose from {', '.join(FORMATS)}.")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _, _ in self.outputs)


@dataclass(frozen=True)
class UpdateGroupSpec:
    """A trainer's group as the engine joins it: rank 0 (the trainer) serves the rendezvous at
    master_address:master_port; the engine's ranks are rank_offset .. rank_offset + ranks - 1 of world_size."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str
    backend: str = "gloo"
    timeout_s: float = DEFAULT_TIMEOUT_S
    # The most the join may take (the rendezvous with the trainer), after which the caller is answered and the ranks
    # drop the join (engine/rl/rank/weight_sync.py), whatever torch's store client does meanwhile.
    join_timeout_s: float = DEFAULT_JOIN_TIMEOUT_S

    def __post_init__(self) -> None:
        def bad(field: str, allowed: str):
            raise ValueError(f"{field}={shown(getattr(self, field))} is invalid: {allowed}.")

        if not isinstance(self.master_address, str) or not 0 < len(self.master_address) <= 253 \
                or not self.master_address.isprintable():
            bad("master_address", "must be a host name or IP address (at most 253 printable characters)")
        for name, low in (("master_port", 1), ("rank_offset", 1), ("world_size", 2)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                bad(name, f"must be an integer >= {low}" + (" (the trainer is rank 0)" if name == "rank_offset" else ""))
        if self.master_port > 65535:
            bad("master_port", "must be at most 65535")
        if not isinstance(self.group_name, str) or not 0 < len(self.group_name) <= 128 or "/" in self.group_name \
                or not self.group_name.isprintable():
            bad("group_name", "must be a non-empty string of at most 128 printable characters, without '/'")
        if self.backend not in GROUP_BACKENDS:
            bad("backend", f"choose from {', '.join(GROUP_BACKENDS)} (gloo on CPU ranks, nccl on GPUs)")
        check_bounded_seconds("timeout_s", self.timeout_s, MAX_GROUP_TIMEOUT_S)
        check_bounded_seconds("join_timeout_s", self.join_timeout_s, MAX_JOIN_TIMEOUT_S)

    def check_ranks(self, num_ranks: int) -> None:
        """The engine's ranks fit in the group after the offset."""
        if self.rank_offset + num_ranks > self.world_size:
            raise ValueError(f"world_size={self.world_size} is invalid: rank_offset={self.rank_offset} plus the "
                             f"engine's {num_ranks} rank(s) needs at least {self.rank_offset + num_ranks}.")


def check_rollback_bytes(value) -> None:
    """`rollback_bytes` of an update (from disk or from a trainer's group): an integer >= 0, 0 for no rollback."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"rollback_bytes={value!r} is invalid: must be an integer >= 0 (0: no rollback).")


# What a rank answers about its end of a join (`UpdateGroups.join_status`): still joining, joined, or failed.
JOIN_STATES = ("joining", "joined", "failed")


@dataclass(frozen=True)
class JoinStatus:
    """One rank's end of a pending join: `state` one of JOIN_STATES; `phase` what a joining rank waits for
    ("resolving", "connecting": nothing answered the TCP connect yet, "rendezvous": connected, waiting for the
    trainer's store and group); `error` why it failed."""

    state: str
    phase: str = ""
    error: str | None = None


@dataclass(frozen=True)
class DiskUpdate:
    """One update_weights_from_disk call as every rank receives it: the checkpoint (the driver checked its headers
    against the served one) and the most old bytes each rank keeps to roll it back (0: no rollback). `bounds`: what
    the rank's own read of the checkpoint's index may cost, and that its files lie inside its directory (the driver
    checked them: the rank checks again, the files may have changed since)."""

    model_path: str
    rollback_bytes: int = DEFAULT_ROLLBACK_BYTES
    bounds: HeaderBounds | None = None

    def __post_init__(self) -> None:
        check_rollback_bytes(self.rollback_bytes)


@dataclass(frozen=True)
class DiskUpdateResult:
    """One rank's answer to a DiskUpdate: the bytes read, and the error that stopped it (None when every tensor
    landed; the rank then holds its undo log until the driver's finish_weights_update). rolled_back: the rank
    restored what it had written. Answered, not raised, as DistributedUpdateResult."""

    bytes_read: int
    error: str | None = None
    rolled_back: bool = False


@dataclass(frozen=True)
class DistributedUpdate:
    """One update_weights_from_distributed call as every rank receives it: (name, dtype, shape) per tensor in the
    trainer's broadcast order (the driver checked each against the served checkpoint), the group, the bucket bound."""

    group_name: str
    tensors: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    # Quantized weights sent in float: (the float tensor's name, how it becomes the served tensors), each quantized
    # into the served format as it is written (engine/rl/requantize.py).
    requantize: tuple[tuple[str, Requant], ...] = ()
    # The most old bytes each rank keeps to roll the update back if it fails (0: no rollback; a failure part way then
    # leaves the buckets written before it).
    rollback_bytes: int = DEFAULT_ROLLBACK_BYTES
    # vLLM's packed broadcast (NCCLWeightTransferEngine, `packed: true`): each bucket arrives as one uint8 buffer of
    # its tensors' bytes back to back, a bucket closed by the tensor that takes it past bucket_bytes (vLLM's
    # packed_buffer_size_bytes); False: each tensor broadcast whole, a bucket at most bucket_bytes (SGLang's).
    packed: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.packed, bool):
            raise ValueError(f"packed={self.packed!r} is invalid: must be true or false.")
        if isinstance(self.bucket_bytes, bool) or not isinstance(self.bucket_bytes, int) or self.bucket_bytes < 1:
            raise ValueError(f"bucket_bytes={self.bucket_bytes!r} is invalid: must be a positive integer.")
        check_rollback_bytes(self.rollback_bytes)
        if not self.tensors:
            raise ValueError("names is empty: an update names at least one tensor.")

    def buckets(self) -> list[list[int]]:
        """The tensors' indices grouped in order, each group's bytes at most bucket_bytes (a larger tensor alone);
        packed, vLLM's grouping (a group ends with the tensor that takes it past bucket_bytes)."""
        out: list[list[int]] = []
        size = 0
        for i, (_, dtype, shape) in enumerate(self.tensors):
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            if self.packed:  # vLLM's packing: the bucket takes tensors until its bytes pass the bound
                if not out or size > self.bucket_bytes:
                    out.append([])
                    size = 0
            elif not out or size + nbytes > self.bucket_bytes:
                out.append([])
                size = 0
            out[-1].append(i)
            size += nbytes
        return out


@dataclass(frozen=True)
class DistributedUpdateResult:
    """One rank's answer: bytes received, tensors written in place (whole buckets), and the error that stopped it
    (None when every tensor landed; the rank then holds its undo log until the driver's finish_weights_update).
    rolled_back: the rank restored what it had written; group_lost: the group failed (the trainer died or went
    silent) and the rank left it. A rank reports an error rather than raising: a raised error is a rank's death to the
    Ray executor, and the trainer's failure is not the rank's."""

    bytes_received: int
    tensors_written: int
    error: str | None = None
    rolled_back: bool = False
    group_lost: bool = False


__all__ = ["DEFAULT_BUCKET_BYTES", "DEFAULT_JOIN_TIMEOUT_S", "DEFAULT_ROLLBACK_BYTES", "DEFAULT_TIMEOUT_S",
           "DiskUpdate", "DiskUpdateResult", "DistributedUpdate", "DistributedUpdateResult", "JOIN_STATES",
           "JoinStatus", "MAX_WEIGHT_VERSION_CHARS", "UpdateGroupSpec", "check_rollback_bytes",
           "check_weight_version"]
