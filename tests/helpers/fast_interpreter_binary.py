"""The type checks the Triton interpreter makes before every binary op (`binary_op_type_checking_impl`), answered
directly where they change nothing, and the constexpr unwrap of every builtin's operands (`_lean_unwrap`): part of
tests/helpers/fast_interpreter.py (why the interpreter is patched there), split out for size; loaded by path as that
module may be (interpreter_site's children)."""
from __future__ import annotations


def _same_operands_pass_through(interp) -> None:
    """`binary_op_type_checking_impl(lhs, rhs, ...)` for two tensors of one plain scalar type (`tl.dtype` itself: no
    pointer) and one shape (`a + b`, `x * y`, `m & n` between equal blocks: the commonest operands of an interpreted
    kernel; the checks, casts and broadcast walk cost 5-8 % of an interpreter graph test, py-spy) returns the two
    operands as they are, which is what the original returns for them: no number to type, no pointer to check, the
    promotion rule's type (asked of the interpreter's own `computation_type_impl`, so a pair it rejects raises the
    same) is the operands' type, so both casts give back their input, and equal shapes broadcast to themselves.
    A tensor beside an int or a float (not a bool) whose promotion with the number's type is the tensor's own type
    (`x + 1`, `0.5 * y`) skips the same no-op checks (no pointer, the tensor's cast gives it back): the number is
    made a tensor and broadcast by the same `_cast_to_computation_type` and `broadcast_impl_value` calls, in the
    same order. Where the rule picks another type (an fp16 division, an int32 tensor beside a 2**40), and every
    other case, the original runs."""
    sem = interp.interpreter_semantic
    original = type(sem).binary_op_type_checking_impl
    tensor, dtype = interp.tl.core.tensor, interp.tl.core.dtype

    def checked(lhs, rhs, allow_lhs_ptr=False, allow_rhs_ptr=False, arithmetic_check=True, div_or_mod=False):
        lhs_cls, rhs_cls = lhs.__class__, rhs.__class__
        if lhs_cls is tensor and rhs_cls is tensor:
            lhs_ty, rhs_ty = lhs.type, rhs.type
            scalar = lhs_ty.scalar
            if scalar is rhs_ty.scalar and type(scalar) is dtype and (
                    lhs_ty is rhs_ty or (lhs_ty is not scalar and rhs_ty is not scalar
                                         and lhs_ty.shape.values == rhs_ty.shape.values)) and (
                    not arithmetic_check
                    or sem.computation_type_impl(scalar, False, scalar, False, div_or_mod) is scalar):
                return lhs, rhs
        elif arithmetic_check and lhs_cls is tensor and (rhs_cls is int or rhs_cls is float):
            scalar = lhs.type.scalar  # a number beside a tensor of its computation type: no pointer, no cast
            if type(scalar) is dtype \
                    and sem.computation_type_impl(scalar, False, sem.to_tensor_type(rhs), True, div_or_mod) is scalar:
                return sem.broadcast_impl_value(lhs, sem._cast_to_computation_type(rhs, scalar))
        elif arithmetic_check and rhs_cls is tensor and (lhs_cls is int or lhs_cls is float):
            scalar = rhs.type.scalar
            if type(scalar) is dtype \
                    and sem.computation_type_impl(sem.to_tensor_type(lhs), True, scalar, False, div_or_mod) is scalar:
                return sem.broadcast_impl_value(sem._cast_to_computation_type(lhs, scalar), rhs)
        return original(sem, lhs, rhs, allow_lhs_ptr, allow_rhs_ptr, arithmetic_check, div_or_mod)

    checked._moelink_fast = True
    sem.binary_op_type_checking_impl = checked


def install_binary_checks(interp) -> None:
    """`_same_operands_pass_through` where the interpreter's semantic has the method and it is not patched yet."""
    sem = getattr(interp, "interpreter_semantic", None)
    core = getattr(getattr(interp, "tl", None), "core", None)
    if callable(getattr(type(sem), "binary_op_type_checking_impl", None)) \
            and callable(getattr(sem, "computation_type_impl", None)) \
            and isinstance(getattr(core, "tensor", None), type) and isinstance(getattr(core, "dtype", None), type) \
            and not getattr(vars(sem).get("binary_op_type_checking_impl"), "_moelink_fast", False):
        _same_operands_pass_through(interp)


def _lean_unwrap(core) -> None:
    """`triton.language.core._unwrap_if_constexpr`, which every builtin runs on each operand (3 % of an interpreter
    kernel test, py-spy), answering a tensor, an int, a float or None at once: the original's four `isinstance`
    walks (list, tuple, `tl.tuple`, constexpr) find none of these, so it returns the operand itself; anything else
    goes to the original (whose own recursion, by the module's global name, comes back here)."""
    original, tensor = core._unwrap_if_constexpr, core.tensor

    def unwrap(o):
        cls = o.__class__
        if cls is tensor or cls is int or cls is float or o is None:
            return o
        return original(o)

    unwrap._moelink_fast = True
    unwrap._moelink_original = original
    core._unwrap_if_constexpr = unwrap


def install_lean_unwrap(interp) -> None:
    """`_lean_unwrap` on the interpreter's language core where it has the function, once."""
    core = getattr(getattr(interp, "tl", None), "core", None)
    unwrap = getattr(core, "_unwrap_if_constexpr", None)
    if callable(unwrap) and isinstance(getattr(core, "tensor", None), type) \
            and not getattr(unwrap, "_moelink_fast", False):
        _lean_unwrap(core)
