"""What Triton kernels do, counted in the CPU interpreter (TRITON_INTERPRET=1): launches and programs per kernel,
bytes every program loads and stores (masked lanes not counted) per element type, and fp8 values converted to
another float type. A GPU runs the same programs over the same tiles, so these are the work a kernel asks of
the memory system and the ALUs, independent of any timing; tests compare two ways of doing one job with them.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import numpy as np


@contextmanager
def interpreter_counts() -> Iterator[Counter]:
    """Counts, while the block runs: ("launches", kernel), ("programs", kernel), ("load_bytes", kernel, type),
    ("store_bytes", kernel, type), ("fp8_widened", kernel) (elements of an fp8 tensor cast to a wider float)."""
    import triton.language as tl
    from triton.runtime import interpreter as interp

    counts: Counter = Counter()
    current: list[str] = ["?"]
    builder_cls, executor_cls = interp.InterpreterBuilder, interp.GridExecutor
    saved = {name: getattr(builder_cls, name) for name in ("create_masked_load", "create_masked_store",
                                                            "create_fp_to_fp")}
    saved_call = executor_cls.__call__

    def call(self, *args, **kwargs):
        current.append(self.fn.__name__)
        try:
            saved_call(self, *args, **kwargs)
        finally:
            current.pop()

    def set_grid_dim(self, x, y, z, _orig=builder_cls.set_grid_dim):
        counts["launches", current[-1]] += 1
        counts["programs", current[-1]] += x * y * z
        return _orig(self, x, y, z)

    def masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        ty = ptrs.get_element_ty()
        counts["load_bytes", current[-1], str(ty)] += int(np.count_nonzero(mask.data)) * _itemsize(ty)
        return saved["create_masked_load"](self, ptrs, mask, other, cache_policy, is_volatile)

    def masked_store(self, ptrs, value, mask, cache_policy):
        ty = ptrs.get_element_ty()
        counts["store_bytes", current[-1], str(ty)] += int(np.count_nonzero(mask.data)) * _itemsize(ty)
        return saved["create_masked_store"](self, ptrs, value, mask, cache_policy)

    def fp_to_fp(self, src, dst_type, rounding_mode):
        if src.dtype.scalar in (tl.float8e4nv, tl.float8e5) and dst_type.scalar.primitive_bitwidth > 8:
            counts["fp8_widened", current[-1]] += int(src.data.size)
        return saved["create_fp_to_fp"](self, src, dst_type, rounding_mode)

    saved_grid = builder_cls.set_grid_dim
    builder_cls.create_masked_load, builder_cls.create_masked_store = masked_load, masked_store
    builder_cls.create_fp_to_fp, builder_cls.set_grid_dim, executor_cls.__call__ = fp_to_fp, set_grid_dim, call
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(builder_cls, name, fn)
        builder_cls.set_grid_dim, executor_cls.__call__ = saved_grid, saved_call


def _itemsize(ty) -> int:
    return max(1, ty.primitive_bitwidth // 8)


def total(counts: Counter, what: str, kernel: str | None = None, dtype: str | None = None) -> int:
    """The sum of the counts named `what`, for one kernel and element type or all."""
    return sum(n for key, n in counts.items() if key[0] == what and (kernel is None or key[1] == kernel)
               and (dtype is None or (len(key) > 2 and key[2] == dtype)))
