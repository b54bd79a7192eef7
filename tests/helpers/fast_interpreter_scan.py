"""The `inspect.getmembers` scan the Triton interpreter makes of each language module and class at every launch and
at a helper call (`_patch_builtin`), memoized while the scanned dicts hold the same objects: part of
tests/helpers/fast_interpreter.py (why the interpreter is patched there), split out for size."""
from __future__ import annotations

import inspect
import operator
import types


def _scans_with_getmembers(patch_builtin) -> bool:
    """Whether the interpreter's `_patch_builtin` is the one `_memo_patch_builtin` stands in for (Triton 3.9's)."""
    try:
        src = " ".join(inspect.getsource(patch_builtin).split())
    except (OSError, TypeError):
        return False
    return src.endswith("for name, member in inspect.getmembers(pkg): if tl.core.is_builtin(member): "
                        "_patch_attr(pkg, name, member, builder, scope)")


def _snapshot(obj) -> tuple | None:
    """What `inspect.getmembers(obj)`'s builtins depend on, compared by identity: the names and values of a plain
    module's dict, or of each class's dict along a plain class's MRO (`object`'s cannot change). None where that is
    not all (a module or metaclass with its own `__dir__` / `__getattr__`, a class holding another descriptor)."""
    if type(obj) is types.ModuleType:
        d = vars(obj)
        if "__dir__" in d or "__getattr__" in d:
            return None
        return (tuple(d), tuple(d.values()))
    if type(obj) is not type:
        return None
    parts: list = [obj.__mro__]
    for c in obj.__mro__[:-1]:
        d = vars(c)
        values = tuple(d.values())
        if not all(type(v) in _PLAIN for v in values):
            return None
        parts += (tuple(d), values)
    return tuple(parts)


# Values whose lookup on a class has no side effect and gives a function only where the dict holds that function.
_PLAIN = frozenset((types.FunctionType, property, staticmethod, str, type(None), int, float, bool, tuple, dict,
                    frozenset, types.GetSetDescriptorType, types.MemberDescriptorType, types.MappingProxyType))


def _memo_patch_builtin(interp) -> None:
    """The interpreter's `_patch_builtin`, run at every launch and at a helper call for each language module and
    class (`tl`, `tl.core`, `tl.math`, `tensor`, `tensor_descriptor_base`), with `inspect.getmembers` (5 % of an
    interpreter graph test: ~470 us a launch, `tensor_descriptor_base` alone 210) replaced by a memo of the builtins
    it found, used while the object's dicts hold the same names bound to the same objects (compared by identity:
    the memo keeps them alive). The interpreter leaves a helper call's patches in place, so the builtins found
    depend on what ran before: any change of a dict (a stand-in set, a builtin restored) scans again with
    `getmembers`. Same pairs in the same (sorted) order, each patched by the interpreter's `_patch_attr` as before;
    a member's `__triton_builtin__` mark is set once when `@builtin` makes it and never removed."""
    memo: dict[int, tuple] = {}  # id(obj) -> (obj, snapshot, [(name, member) that are builtins])

    def patch_builtin(pkg, builder, scope):
        snap, hit = _snapshot(pkg), memo.get(id(pkg))
        if snap is not None and hit is not None and hit[0] is pkg and _same(hit[1], snap):
            found = hit[2]
        else:
            is_builtin = interp.tl.core.is_builtin
            found = [(name, member) for name, member in inspect.getmembers(pkg) if is_builtin(member)]
            if snap is not None and all(type(m) is types.FunctionType for _, m in found):
                memo[id(pkg)] = (pkg, snap, found)
        patch_attr = interp._patch_attr
        for name, member in found:
            patch_attr(pkg, name, member, builder, scope)

    patch_builtin._moelink_fast = True
    patch_builtin._moelink_original = interp._patch_builtin
    interp._patch_builtin = patch_builtin


def _same(a: tuple, b: tuple) -> bool:
    """Two snapshots hold the same objects (identity, never a value's own `__eq__`)."""
    return len(a) == len(b) and all(len(x) == len(y) and all(map(operator.is_, x, y)) for x, y in zip(a, b))



def install_memo_scan(interp) -> None:
    """`_memo_patch_builtin` where the interpreter's `_patch_builtin` is the known one, once."""
    builtin = getattr(interp, "_patch_builtin", None)
    if callable(builtin) and not getattr(builtin, "_moelink_fast", False) and _scans_with_getmembers(builtin):
        _memo_patch_builtin(interp)
