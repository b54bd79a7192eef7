"""tests/helpers/fast_interpreter.py's bf16 <-> fp32 casts give the interpreter's own bits (numpy only: no kernel)."""
from __future__ import annotations

import numpy as np
import pytest

from tests.kernels.conftest import INTERPRET


def _convert():
    if not INTERPRET:
        pytest.skip("the interpreter is not in use (a GPU machine)")
    from triton.runtime import interpreter as interp

    fast = interp._convert_float
    if not getattr(fast, "_moelink_fast", False):
        pytest.skip("this Triton's interpreter is not the one fast_interpreter patches")
    return interp, fast, fast._moelink_original


def _same(interp, fast, original, data, src, dst):
    got, want = fast(data, src, dst, None), original(data, src, dst, None)
    assert got.dtype == want.dtype and got.shape == want.shape
    bad = np.flatnonzero(got.view(want.dtype).ravel() != want.ravel())
    assert bad.size == 0, f"{src} -> {dst}: input bits {data.ravel()[bad[:5]]} differ"


def test_bf16_to_fp32_every_bit_pattern_as_the_interpreter():
    interp, fast, original = _convert()
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    normal = every[((every & 0x7F80) != 0) | ((every & 0x7F) == 0)]  # the fast path's inputs (no subnormal)
    _same(interp, fast, original, normal.reshape(-1, 1), interp.tl.bfloat16, interp.tl.float32)
    _same(interp, fast, original, every.reshape(256, 256), interp.tl.bfloat16, interp.tl.float32)  # + subnormals


def test_fp32_to_bf16_edges_and_random_bits_as_the_interpreter():
    interp, fast, original = _convert()
    rng = np.random.default_rng(0)
    edges = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x00800000,
                      0x3F80FFFF, 0x3F808000, 0x3F807FFF, 0x7F7FFFFF, 0xFF7FFFFF], dtype=np.uint32)
    bits = np.concatenate([edges, rng.integers(0, 1 << 32, 1 << 16, dtype=np.uint32)])
    normal = bits[((bits & 0x7F800000) != 0) | ((bits & 0x7FFFFF) == 0)]
    _same(interp, fast, original, normal.view(np.float32), interp.tl.float32, interp.tl.bfloat16)
    _same(interp, fast, original, bits.view(np.float32).reshape(-1, 1), interp.tl.float32, interp.tl.bfloat16)
