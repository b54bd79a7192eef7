"""The trainer's end of a weight broadcast (docs/rl.md), for a trainer that has no group of its own yet (the tests,
examples/rl_loop.py, benchmarks/rl_weight_sync.py): rank 0 of the group the engine's ranks join with
`init_weights_update_group`, serving its rendezvous. A trainer on SGLang's `init_custom_process_group` meets the
same ranks (comm/process_group.side_group makes its keys as that helper does: PrefixStore(group_name) outermost).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from moelink.comm.process_group import side_group

if TYPE_CHECKING:
    import torch


class TrainerGroup:
    """Rank 0 of a weight-update group: make it while the engine's `init_weights_update_group` joins, then
    `broadcast` the tensors of each `update_weights_from_distributed` call, in the order it names them."""

    def __init__(self, master_address: str, master_port: int, world_size: int,
                 group_name: str = "weight_update_group", backend: str = "gloo", timeout_s: float = 60.0):
        self.group, self._store = side_group(master_address, master_port, 0, world_size, group_name, backend,
                                             timeout_s)

    @staticmethod
    def specs(named_tensors: Iterable[tuple[str, "torch.Tensor"]]) -> dict:
        """The engine call's arguments for these tensors: {"names", "dtypes", "shapes"}."""
        items = list(named_tensors)
        return {"names": [n for n, _ in items], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in items],
                "shapes": [list(t.shape) for _, t in items]}

    def broadcast(self, named_tensors: Iterable[tuple[str, "torch.Tensor"]]) -> int:
        """Send each tensor whole, in order; the bytes sent."""
        sent = 0
        for _, t in named_tensors:
            t = t.detach().contiguous()
            self.group.broadcast(t, 0).wait()
            sent += t.numel() * t.element_size()
        return sent

    def broadcast_packed(self, named_tensors: Iterable[tuple[str, "torch.Tensor"]], buffer_bytes: int) -> int:
        """vLLM's packed broadcast (NCCLWeightTransferEngine.trainer_send_weights with packed=True): the tensors'
        bytes back to back in uint8 buffers, each closed by the tensor that takes it past `buffer_bytes` (the
        update's packed_buffer_size_bytes); the bytes sent. For an update called with packed=True."""
        import torch

        sent, parts, size = 0, [], 0
        items = list(named_tensors)
        for k, (_, t) in enumerate(items):
            flat = t.detach().contiguous().view(-1).view(torch.uint8)
            parts.append(flat)
            size += flat.numel()
            if size > buffer_bytes or k == len(items) - 1:
                buf = torch.cat(parts)
                self.group.broadcast(buf, 0).wait()
                sent += buf.numel()
                parts, size = [], 0
        return sent

    def close(self) -> None:
        """Leave the group (its store goes with it)."""
        self.group = self._store = None


class OpenRLHFGroup:
    """The trainer's end of OpenRLHF's weight sync on moelink (docs/rl.md, OpenRLHF): what OpenRLHF's
    `stateless_init_process_group(master_address, master_port, rank, world_size, device)` returns (vLLM's
    PyNcclCommunicator there), meeting the ranks moelink joins for `collective_rpc("init_process_group", ...)` (group
    "openrlhf", OpenRLHF's). `broadcast(tensor, src=0, stream=None)` as PyNccl's: one tensor, whole. NCCL for a CUDA
    `device`, else gloo (a CUDA tensor then goes through host memory); the engines' `backend` must name the same."""

    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int, device=None,
                 group_name: str = "openrlhf", timeout_s: float = 60.0):
        import torch

        if rank != 0:
            raise ValueError(f"rank={rank} is invalid: the trainer is rank 0 of the weight update group.")
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cpu")
        self.backend = "nccl" if dev.type == "cuda" else "gloo"
        self.group, self._store = side_group(master_address, master_port, 0, world_size, group_name, self.backend,
                                             timeout_s)

    def broadcast(self, tensor: "torch.Tensor", src: int = 0, stream=None) -> None:
        if src != 0:
            raise ValueError(f"src={src} is invalid: the trainer (rank 0) sends.")
        t = tensor.detach().contiguous()
        if self.backend == "gloo" and t.device.type != "cpu":
            t = t.cpu()
        self.group.broadcast(t, 0).wait()

    def close(self) -> None:
        self.group = self._store = None


def stateless_init_process_group(master_address: str, master_port: int, rank: int, world_size: int,
                                 device=None) -> OpenRLHFGroup:
    """OpenRLHF's openrlhf.utils.distributed_util.stateless_init_process_group, for a trainer whose engines are
    moelink's: patch it into openrlhf.trainer.ray.ppo_actor (docs/rl.md, OpenRLHF)."""
    return OpenRLHFGroup(master_address, master_port, rank, world_size, device)
