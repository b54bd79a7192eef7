"""tests/helpers/fast_interpreter.py skips the interpreter's integer overflow check only where it is discarded: a
kernel's integer arithmetic gives the same bits with and without the check, and with `debug` on the check still
runs and still catches an overflow."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.kernels.conftest import INTERPRET

if not INTERPRET:
    pytest.skip("the interpreter is not in use (a GPU machine)", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter as interp  # noqa: E402


@triton.jit
def _int_ops(x_ptr, y_ptr, n, scale, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0)
    y = x * scale + offs - 7
    tl.store(y_ptr + offs, y * 2 - x, mask=mask)


def _fast_sem():
    sem = interp.interpreter_semantic
    if not getattr(vars(sem).get("binary_op_sanitize_overflow_impl"), "_moelink_fast", False):
        pytest.skip("this Triton's interpreter is not the one fast_interpreter patches")
    return sem


def _run(x, scale):
    y = torch.empty_like(x)
    _int_ops[(triton.cdiv(x.numel(), 8),)](x, y, x.numel(), scale, BLOCK=8)
    return y


def test_integer_arithmetic_has_the_bits_of_the_checked_interpreter(monkeypatch):
    sem = _fast_sem()
    x = torch.randint(-2**20, 2**20, (21,), dtype=torch.int32)
    fast = _run(x, 5)
    monkeypatch.delattr(sem, "binary_op_sanitize_overflow_impl")  # the interpreter's own check again
    checked = _run(x, 5)
    assert torch.equal(fast, checked)
    assert torch.equal(fast, (x * 5 + torch.arange(21, dtype=torch.int32) - 7) * 2 - x)


def test_with_debug_the_check_runs_and_catches_an_overflow(monkeypatch):
    sem = _fast_sem()
    monkeypatch.setattr(sem.builder, "options", dataclasses.replace(sem.builder.options, debug=True))
    x = torch.full((3,), 2**30, dtype=torch.int32)
    with pytest.raises(Exception, match="overflow"):
        _run(x, 4)
