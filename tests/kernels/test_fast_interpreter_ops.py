"""tests/helpers/fast_interpreter.py skips the interpreter's integer overflow check only where it is discarded,
broadcasts equal shapes and scalars directly, and its builtins' stand-ins pass the keywords without a new dict: a
kernel's integer and float arithmetic (splats on either side, 2-D broadcasts, masks) gives the same bits as the
interpreter's own code, and with `debug` on the overflow check still runs and still catches an overflow."""
from __future__ import annotations

import dataclasses
import re

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


@triton.jit
def _broadcasts(x_ptr, w_ptr, y_ptr, n, m, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_M)
    mask = (rows[:, None] < n) & (cols[None, :] < m)
    x = tl.load(x_ptr + rows[:, None] * m + cols[None, :], mask=mask, other=0.0)
    w = tl.load(w_ptr + cols, mask=cols < m, other=0.0)
    y = (2.0 * x + w[None, :]) * 0.5 - x / 3.0 + 1.5
    y = tl.where(y > 0, y, 0.25 * y) + tl.sum(x, axis=1)[:, None]
    tl.store(y_ptr + rows[:, None] * m + cols[None, :], y.to(tl.bfloat16).to(tl.float32), mask=mask)


@triton.jit
def _promotions(i_ptr, h_ptr, b_ptr, y_ptr, k, f, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    i = tl.load(i_ptr + offs)  # int32
    h = tl.load(h_ptr + offs)  # fp16
    b = tl.load(b_ptr + offs)  # bf16 (the interpreter computes on bf16 bits as integers: cast first)
    wide = i.to(tl.int64) * k + i  # int64 beside int32, an int scalar
    half = h * 3 + h * 1.5 + h / 2 + (h * f).to(tl.float16)  # fp16 with scalars (fp16), an fp32 value (fp32)
    mixed = half + b.to(tl.float32) + wide.to(tl.float32) / k + (i % 5).to(tl.float16)  # fp16+fp32, int div/mod
    tl.store(y_ptr + offs, mixed.to(tl.float32) + i.to(tl.float32, bitcast=False) * 0.5)


SHORTCUTS = ("binary_op_sanitize_overflow_impl", "broadcast_impl_value", "computation_type_impl", "cast",
             "binary_op_type_checking_impl")


def _fast_sem():
    sem = interp.interpreter_semantic
    if not all(getattr(vars(sem).get(n), "_moelink_fast", False) for n in SHORTCUTS) \
            or not getattr(interp._patch_attr, "_moelink_fast", False) \
            or not getattr(interp._patch_builtin, "_moelink_fast", False):
        pytest.skip("this Triton's interpreter is not the one fast_interpreter patches")
    return sem


def _unpatched(monkeypatch, sem):
    for name in SHORTCUTS:  # the interpreter's own methods again
        monkeypatch.delattr(sem, name)
    monkeypatch.setattr(interp, "_patch_attr", interp._patch_attr._moelink_original)  # and its builtins' stand-ins
    monkeypatch.setattr(interp, "_patch_builtin", interp._patch_builtin._moelink_original)  # and its scan


def _run(x, scale):
    y = torch.empty_like(x)
    _int_ops[(triton.cdiv(x.numel(), 8),)](x, y, x.numel(), scale, BLOCK=8)
    return y


def test_integer_arithmetic_has_the_bits_of_the_checked_interpreter(monkeypatch):
    sem = _fast_sem()
    x = torch.randint(-2**20, 2**20, (21,), dtype=torch.int32)
    fast = _run(x, 5)
    _unpatched(monkeypatch, sem)
    checked = _run(x, 5)
    assert torch.equal(fast, checked)
    assert torch.equal(fast, (x * 5 + torch.arange(21, dtype=torch.int32) - 7) * 2 - x)


def test_float_broadcasts_have_the_bits_of_the_interpreter(monkeypatch):
    sem = _fast_sem()
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(11, 6, generator=g), torch.randn(6, generator=g)

    def run():
        y = torch.full_like(x, float("nan"))
        _broadcasts[(triton.cdiv(11, 4),)](x, w, y, 11, 6, BLOCK_N=4, BLOCK_M=8)
        return y

    _assert_same_bits_unpatched(run, monkeypatch, sem)


def test_type_promotions_and_casts_have_the_bits_of_the_interpreter(monkeypatch):
    sem = _fast_sem()
    g = torch.Generator().manual_seed(1)
    i = torch.randint(-1000, 1000, (16,), dtype=torch.int32, generator=g)
    h, b = torch.randn(16, generator=g).half(), torch.randn(16, generator=g).bfloat16()

    def run():
        y = torch.empty(16)
        _promotions[(2,)](i, h, b, y, 7, 1.25, BLOCK=8)  # two programs: the second reads the memo
        return y

    _assert_same_bits_unpatched(run, monkeypatch, sem)


@pytest.mark.parametrize("shapes", [((4, 1), (1, 8)), ((1, 8), (4, 8)), ((4, 8), (4, 1)), ((2, 1, 4), (2, 8, 1)),
                                    ((8,), (2, 8)), ((4, 8), (8, 4)), ((4,), (4,)), ((4, 2), ())])
def test_broadcasts_give_the_interpreters_types_and_values(shapes):
    sem = _fast_sem()
    g = torch.Generator().manual_seed(2)

    def value(shape, dtype):  # a block (or a scalar for ()) the interpreter would make
        data = (torch.randn(shape or (1,), generator=g) * 100).numpy().astype(interp._get_np_dtype(dtype))
        ty = tl.block_type(dtype, list(shape)) if shape else dtype
        return tl.core.tensor(interp.TensorHandle(data, dtype), ty)

    lhs, rhs = value(shapes[0], tl.float32), value(shapes[1], tl.int32)
    try:
        own = type(sem).broadcast_impl_value(sem, lhs, rhs)
    except ValueError as e:
        with pytest.raises(ValueError, match=str(e)):
            sem.broadcast_impl_value(lhs, rhs)
        return
    fast = sem.broadcast_impl_value(lhs, rhs)
    for f, o in zip(fast, own):
        assert f.type == o.type and f.handle.dtype == o.handle.dtype and f.handle.data.dtype == o.handle.data.dtype
        assert f.handle.data.shape == o.handle.data.shape and f.handle.data.tobytes() == o.handle.data.tobytes()


@pytest.mark.parametrize("case", ["same", "scalars", "fp16 div", "int div", "ptr", "shapes", "no arithmetic check",
                                  "int1", "mixed", "number", "int number", "number left", "fp16 number", "wide int",
                                  "negative unsigned", "out of range", "bool", "ptr number", "scalar number",
                                  "int div number", "int number left"])
def test_binary_checks_give_the_interpreters_operands(case):
    """Two tensors of one type and shape pass through the checks as they are; every other pair (another type, a
    rule that widens, a pointer, a broadcast, a number) gets what the interpreter's own checks give."""
    sem = _fast_sem()
    g = torch.Generator().manual_seed(3)

    def value(dtype, shape):
        data = (torch.randn(shape or (1,), generator=g) * 100).numpy().astype(interp._get_np_dtype(dtype))
        return tl.core.tensor(interp.TensorHandle(data, dtype), tl.block_type(dtype, list(shape)) if shape else dtype)

    f16, f32, i32, ptr = tl.float16, tl.float32, tl.int32, tl.pointer_type(tl.float32)
    lhs, rhs, kw = {"same": (value(f32, (4, 8)), value(f32, (4, 8)), {}),
                    "scalars": (value(i32, ()), value(i32, ()), {}),
                    "fp16 div": (value(f16, (8,)), value(f16, (8,)), dict(div_or_mod=True)),
                    "int div": (value(i32, (8,)), value(i32, (8,)), dict(div_or_mod=True)),
                    "ptr": (value(ptr, (8,)), value(i32, (8,)), dict(allow_lhs_ptr=True)),
                    "shapes": (value(f32, (4, 1)), value(f32, (1, 8)), {}),
                    "no arithmetic check": (value(i32, (2, 4)), value(i32, (2, 4)), dict(arithmetic_check=False)),
                    "int1": (value(tl.int1, (8,)), value(tl.int1, (8,)), {}),
                    "mixed": (value(f16, (8,)), value(f32, (8,)), {}),
                    "number": (value(f32, (8,)), 1.5, {}),
                    "int number": (value(i32, (2, 4)), 3, {}),
                    "number left": (-2.5, value(f32, (4,)), {}),
                    "fp16 number": (value(f16, (8,)), 0.1, {}),
                    "wide int": (value(i32, (8,)), 2**40, {}),
                    "negative unsigned": (value(tl.uint32, (8,)), -1, {}),
                    "out of range": (value(tl.int8, (8,)), 300, {}),
                    "bool": (value(i32, (8,)), True, {}),
                    "ptr number": (value(ptr, (8,)), 4, dict(allow_lhs_ptr=True)),
                    "scalar number": (7, value(i32, ()), {}),
                    "int div number": (value(i32, (8,)), 3, dict(div_or_mod=True)),
                    "int number left": (3, value(f16, (2, 4)), {})}[case]
    try:
        own = type(sem).binary_op_type_checking_impl(sem, lhs, rhs, **kw)
    except ValueError as e:
        with pytest.raises(ValueError, match=re.escape(str(e))):
            sem.binary_op_type_checking_impl(lhs, rhs, **kw)
        return
    fast = sem.binary_op_type_checking_impl(lhs, rhs, **kw)
    assert getattr(sem.binary_op_type_checking_impl, "_moelink_fast", False)
    for f, o in zip(fast, own):
        assert f.type == o.type and f.handle.dtype == o.handle.dtype and f.handle.data.dtype == o.handle.data.dtype
        assert f.handle.data.shape == o.handle.data.shape and f.handle.data.tobytes() == o.handle.data.tobytes()
    if case in ("same", "scalars", "int div", "no arithmetic check", "int1"):
        assert fast[0] is lhs and fast[1] is rhs  # passed through, as the interpreter's checks pass them


def test_with_debug_the_check_runs_and_catches_an_overflow(monkeypatch):
    sem = _fast_sem()
    monkeypatch.setattr(sem.builder, "options", dataclasses.replace(sem.builder.options, debug=True))
    x = torch.full((3,), 2**30, dtype=torch.int32)
    with pytest.raises(Exception, match="overflow"):
        _run(x, 4)


def test_the_memoized_scan_patches_what_getmembers_finds_whatever_ran_before():
    _fast_sem()
    fast, own = interp._patch_builtin, interp._patch_builtin._moelink_original
    objs = (tl, tl.core, tl.math, tl.core.tensor, tl.core.tensor_descriptor_base)

    def changes(patch, obj):
        scope = interp._LangPatchScope()
        patch(obj, interp.interpreter_builder, scope)
        found = [(name, old) for _, name, old in scope._changes]
        scope.restore()
        return found

    left = interp._LangPatchScope()  # a helper call's patch, left in place as the interpreter does
    for step in range(4):
        for obj in objs:
            assert changes(fast, obj) == changes(own, obj)  # same builtins, same order, (a hit from step 1 on)
        if step == 1:
            own(tl.core, interp.interpreter_builder, left)  # tl.core's builtins are stand-ins now: none found
            assert changes(fast, tl.core) == changes(own, tl.core) == []
        if step == 2:
            left.restore()  # and builtins again
    assert changes(fast, tl.core) and changes(fast, tl.core) == changes(own, tl.core)


def test_a_builtins_stand_in_calls_it_as_the_interpreters_does(monkeypatch):
    """The stand-in calls a `@builtin`'s function past its wrapper: the same positional and keyword arguments
    (`_semantic` the interpreter's, last), the same result; without a semantic the wrapper's refusal as before."""
    _fast_sem()
    calls = []

    @tl.core.builtin
    def op(x, y=1, *, z=2, _semantic=None):
        calls.append((x, y, z, list(locals())))
        return (x, y, z, _semantic)

    stand_ins = []
    for patch in (interp._patch_attr, interp._patch_attr._moelink_original):
        holder = type("Holder", (), {"op": staticmethod(op)})
        scope = interp._LangPatchScope()
        patch(holder, "op", op, interp.interpreter_builder, scope)
        stand_ins.append(holder.op)
    fast, own = stand_ins
    want = (3, 1, 5, interp.interpreter_semantic)
    assert fast(3, z=5, _semantic="caller's") == own(3, z=5, _semantic="caller's") == want
    assert fast(4, 6) == own(4, 6) and calls[-1] == calls[-2]
    monkeypatch.setattr(interp, "interpreter_semantic", None)
    for stand_in in (fast, own):
        with pytest.raises(ValueError, match="_semantic"):
            stand_in(3)


def test_the_lean_unwrap_answers_as_the_interpreters_own():
    """A tensor, an int, a float, None pass through as the original returns them; constexprs, lists, tuples and
    everything else get the original's answer (its recursion through the fast one included)."""
    _fast_sem()
    fast = tl.core._unwrap_if_constexpr
    if not getattr(fast, "_moelink_fast", False):
        pytest.skip("this Triton's core is not the one fast_interpreter patches")
    own, c = fast._moelink_original, tl.core.constexpr
    t = tl.core.tensor(interp.TensorHandle(interp.np.zeros(4, interp.np.float32), tl.float32),
                       tl.block_type(tl.float32, [4]))
    for value in (t, 3, 2.5, None, True, c(4), c(t), [c(1), 2, [c(3)]], (c(1), 2.0), tl.core.tuple([c(2), 5]), "s"):
        got, want = fast(value), own(value)
        assert type(got) is type(want) and repr(got) == repr(want), value
        if value is t or type(value) in (int, float, bool, str) or value is None:
            assert got is value


def test_a_tensor_gets_the_interpreters_types_shape_and_numel():
    """The lean tensor construction: the same dtype, shape values (constexprs) and numel as the original's for a
    block, a plain dtype and a pointer; each tensor's shape a tuple of its own."""
    _fast_sem()
    cls = tl.core.tensor
    own = getattr(cls.__init__, "_moelink_original", None)
    if own is None:
        pytest.skip("this Triton's core is not the one fast_interpreter patches")
    handle = interp.TensorHandle(interp.np.zeros(1, interp.np.float32), tl.float32)
    for ty in (tl.block_type(tl.float16, [2, 8]), tl.block_type(tl.int32, [4]), tl.float32,
               tl.pointer_type(tl.float32), tl.block_type(tl.pointer_type(tl.int8), [1, 2, 4])):
        fast, want = cls(handle, ty), cls.__new__(cls)
        own(want, handle, ty)
        assert fast.handle is want.handle and fast.type is want.type and fast.dtype is want.dtype
        assert [d.value for d in fast.shape] == [d.value for d in want.shape] and fast.numel.value == want.numel.value
        other = cls(handle, ty).shape
        assert fast.shape.type == want.shape.type and fast.shape is not other and fast.shape.values is not other.values


def test_a_block_type_gets_the_interpreters_shape_and_numel():
    """The lean block type: from a list or a `tl.tuple` of ints or constexprs, the original's shape values, numel
    and name, a shape of its own; no dims is refused as before."""
    _fast_sem()
    cls, c = tl.block_type, tl.constexpr
    own = getattr(cls.__init__, "_moelink_original", None)
    if own is None:
        pytest.skip("this Triton's core is not the one fast_interpreter patches")
    dims = [4, 8]
    for shape in (dims, [c(2), 16], tl.core.tuple([1, 2, 4]), tl.core.tuple([c(8)]), [512, 1024]):
        fast, want = cls(tl.float32, shape), cls.__new__(cls)
        own(want, tl.float32, shape)
        assert fast.shape.values == want.shape.values and all(type(d) is int for d in fast.shape.values)
        assert fast.numel == want.numel and fast.name == want.name and fast == want
    fast = cls(tl.float32, dims)
    assert fast.shape.values is not dims and fast.shape.values is not cls(tl.float32, dims).shape.values
    for make in (lambda: cls(tl.float32, []), lambda: own(cls.__new__(cls), tl.float32, [])):
        with pytest.raises(TypeError, match="0d block_type"):
            make()


def _assert_same_bits_unpatched(run, monkeypatch, sem) -> None:
    """`run()` with the fast paths, then with the interpreter's own methods put back: finite, and bit for bit equal."""
    fast = run()
    _unpatched(monkeypatch, sem)
    own = run()
    assert torch.isfinite(fast).all()
    assert torch.equal(fast.view(torch.int32), own.view(torch.int32))
