"""A rank's memory given back to a trainer on the same devices (vLLM's sleep / wake_up, SGLang's release / resume
memory occupation; docs/rl.md), by resizing storages: the tensors the model and the KV cache hold stay the same
Python objects (parameters, views, the attention layers' cache tuples), only their storage is emptied
(`untyped_storage().resize_(0)`) and later given its bytes back.

- level 1: every storage of the model (parameters and buffers) is copied to host memory and emptied, and every KV
  cache storage (paged KV, state pools) emptied; wake-up copies the weights back and zeroes the KV cache, as it was
  made. The KV contents are lost (the engine flushes its prefix cache).
- level 2: the storages an update from disk writes (the load plan's destinations) are emptied with no copy, and the
  KV cache as at level 1; the weights come back from the next update (the rank gives them zeroed bytes first), the
  rest of the model (buffers, tensors derived at load) stays.

A storage given its bytes back may sit at another address: captured CUDA graphs would read the old one, so a wake-up
that moved any storage captures the graphs again (every rank wakes together: EP captures are collective).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

SLEEP_LEVELS = (1, 2)
WAKE_TAGS = ("weights", "kv_cache")


def _storages(tensors) -> list[tuple[torch.Tensor, int]]:
    """One tensor per distinct non-empty storage among `tensors`, with the storage's bytes."""
    out, seen = [], set()
    for t in tensors:
        s = t.untyped_storage()
        if s.nbytes() and s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            out.append((t, s.nbytes()))
    return out


def _flat(caches) -> list[torch.Tensor]:
    """Every tensor in the runner's kv_caches (per layer: a tensor, or tuples of them)."""
    out: list[torch.Tensor] = []
    stack = list(caches or ())
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return out


@dataclass
class Released:
    """What one part (weights or KV cache) gave back: one tensor per storage, its bytes and address, and the host
    copies (level-1 weights) to restore from."""

    storages: list[tuple[torch.Tensor, int]]
    ptrs: list[int]
    host: list[torch.UntypedStorage] | None = None

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.storages)


@dataclass
class SleepState:
    """A rank's released parts by tag ("weights", "kv_cache"); empty while awake."""

    level: int = 0
    parts: dict[str, Released] = field(default_factory=dict)
    moved: bool = False  # a storage came back at another address since the graphs were captured

    def sleep(self, level: int, model: torch.nn.Module, plan_tensors: list[torch.Tensor], kv_caches) -> int:
        """Release the weights (level 1: to host memory; level 2: dropped, the plan's tensors only) and the KV cache;
        the device bytes freed."""
        if self.parts:
            raise ValueError(f"sleep(level={level}) is refused: the rank is asleep already (level {self.level}).")
        weights = _storages(list(model.parameters()) + list(model.buffers())) if level == 1 else _storages(plan_tensors)
        kv = _storages(_flat(kv_caches))
        for tag, found in (("weights", weights), ("kv_cache", kv)):
            host = None
            if tag == "weights" and level == 1:
                host = []
                for t, n in found:
                    copy = torch.UntypedStorage(n, device="cpu")
                    copy.copy_(t.untyped_storage())
                    host.append(copy)
            self.parts[tag] = Released(found, [t.untyped_storage().data_ptr() for t, _ in found], host)
            for t, _ in found:
                t.untyped_storage().resize_(0)
        self.level = level
        return sum(p.nbytes for p in self.parts.values())

    def wake(self, tags: tuple[str, ...]) -> tuple[int, bool]:
        """Give the released parts named by `tags` their bytes back (the weights their host copy at level 1);
        (bytes, whether any storage moved)."""
        nbytes, moved = 0, False
        for tag in tags:
            part = self.parts.pop(tag, None)
            if part is None:
                continue
            for i, (t, n) in enumerate(part.storages):
                s = t.untyped_storage()
                s.resize_(n)
                if part.host is not None:
                    s.copy_(part.host[i])
                else:
                    # Zeros, as the cache was made (and a level-2 weight's padding past what an update writes): a
                    # step reads padding and null-block rows with zero weight, and 0 x NaN left in reused memory
                    # would be NaN (seen once: tokens of id 0 after a wake-up).
                    torch.empty(0, dtype=torch.uint8, device=s.device).set_(s).zero_()
                moved |= s.data_ptr() != part.ptrs[i]
            nbytes += part.nbytes
        if not self.parts:
            self.level = 0
        self.moved |= moved
        return nbytes, moved


def wake_runner(state: SleepState, runner, tags: tuple[str, ...], device: torch.device) -> dict:
    """Wake `tags` of `runner`'s rank; graphs captured before are captured again where a storage moved."""
    t0 = time.perf_counter()
    nbytes, _ = state.wake(tags)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # host sync: the weights' copies back are in before graphs or steps
    recaptured = False
    if state.moved and not state.parts:  # every part back: the graphs' inputs exist again
        state.moved = False
        if runner.graphs is not None:
            runner.graphs = None
            runner._capture_graphs()
            recaptured = runner.graphs is not None
    return {"bytes": nbytes, "seconds": time.perf_counter() - t0, "graphs_recaptured": recaptured}


__all__ = ["SLEEP_LEVELS", "WAKE_TAGS", "SleepState", "wake_runner"]
