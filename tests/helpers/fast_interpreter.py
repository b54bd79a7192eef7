"""The Triton CPU interpreter without its redundant re-patching: the suite's kernels run the same, in less time.

Triton's interpreter (3.x) swaps `triton.language`'s builtins for interpreted ones around every launch
(`GridExecutor.__call__`: `_patch_lang`, then `restore()`), and again on *every call of a @triton.jit helper*
inside the launch (`InterpretedFunction.__call__`), once per program. Each patch walks the language modules with
`inspect.getmembers`. A launch of T x H programs whose body calls a few helpers (`cast`, `_normed`, ...) so
patched the same modules tens of thousands of times: 30-45 % of an interpreter engine test's time went there.

What is skipped is only a helper call's patch when every language module the helper sees (`tl` / `tl.core` in its
globals) was already patched in this launch, by the launch itself or by an earlier helper call (the interpreter
never restores a helper call's patch before the launch ends): the attributes it would set are set already, so the
interpreted program is the same. A helper that sees a module not yet patched is patched as before. The launch's own patch and restore are untouched. Two more costs of every step go: which language modules a helper sees is worked
out once per module of helpers, not per call, and the interpreter's numpy dtype of a Triton type is looked up in a
memo instead of a table built anew per call (`_memo_np_dtype`), and a bf16 <-> fp32 cast is the bit shift the
interpreter's bit-by-bit conversion works out (`_fast_bf16_casts`: same bits). And three per-op costs: the integer
overflow check whose answer the interpreter drops without `debug` (`_no_discarded_overflow_checks`), the general
broadcast walk for operands of one shape or a scalar beside a block (`_cheap_broadcasts`), and the keyword dict each
builtin's stand-in built per call (`_lean_patched_builtins`), the promotion rule and same-type casts of every binary op (`_memo_type_rules`),
and the `inspect.getmembers` scan of each language module and class at every launch, memoized while their dicts hold
the same objects (fast_interpreter_scan.py), the binary ops' type checks where they change nothing and the constexpr
unwrap of each builtin's operands (fast_interpreter_binary.py), and the `@builtin` wrapper's check, which the
stand-in's `_semantic` passes: tests/kernels/test_fast_interpreter_ops.py compares the bits (and types, errors) with
the interpreter's own code. Installed by tests/kernels/conftest.py and by
the scripts the tests run with TRITON_INTERPRET=1 (`install()`); a no-op when the interpreter's internals are not
the ones described (another Triton version), or without TRITON_INTERPRET=1.
"""
from __future__ import annotations

import inspect
import os
import threading
import types

_state = threading.local()  # per thread: the language modules patched by the launch running now (None: none)


# id(a function's globals) -> (those globals, their size when scanned, _langs of them): one scan of a module's
# globals per module, not per helper call (the scan was 5-8 % of an interpreter engine test once the re-patching
# was skipped). Scanned again if the globals grew (a module importing `tl` late).
_LANGS_OF: dict[int, tuple[dict, int, frozenset]] = {}


def _langs(fn, tl) -> frozenset:
    g = fn.__globals__
    hit = _LANGS_OF.get(id(g))
    if hit is not None and hit[0] is g and hit[1] == len(g):
        return hit[2]
    langs = frozenset(id(v) for v in g.values() if inspect.ismodule(v) and v in (tl, tl.core))
    _LANGS_OF[id(g)] = (g, len(g), langs)
    return langs


def _memo_np_dtype(interp) -> None:
    """The interpreter's `_get_np_dtype(tt_dtype)` memoized by the scalar type's name: the original builds a table of
    19 numpy dtypes on every call (a block type's answer is its element type's, a pointer's uint64), ~160,000
    calls in one engine test. Same answers: each is the original's, for the same scalar type."""
    original = interp._get_np_dtype
    memo: dict[str, object] = {}
    block_type = interp.tl.core.block_type

    def get_np_dtype(tt_dtype):
        scalar = tt_dtype.element_ty if isinstance(tt_dtype, block_type) else tt_dtype
        name = getattr(scalar, "name", None)
        if not isinstance(name, str):
            return original(tt_dtype)
        found = memo.get(name)
        if found is None:
            found = memo[name] = original(scalar)
        return found

    get_np_dtype._moelink_fast = True
    interp._get_np_dtype = get_np_dtype


def _fast_bf16_casts(interp) -> None:
    """The interpreter's `_convert_float` for bf16 <-> fp32 without rounding (every `.to()` between them: numpy has
    no bf16, so a bf16 value is its 16 bits), done as the bit shift it computes instead of its ~30 numpy passes
    over sign, exponent and significand (13 % of an interpreted MoE smoke, py-spy). The two formats share the
    exponent's width and bias, so for every input that is not subnormal (zeros, normals, infinities and NaNs) the
    original's output is the input's bits shifted by 16, the low ones dropped on the way down (it truncates without
    a rounding mode): the same bits. An input holding a subnormal, and every other conversion, goes to the original
    (tests/kernels/test_fast_interpreter.py compares both on every bf16 and on fp32 edge values)."""
    original = interp._convert_float
    np = interp.np

    def convert_float(input, input_dtype, output_dtype, rounding_mode):
        if rounding_mode is None:
            src, dst = getattr(input_dtype, "name", None), getattr(output_dtype, "name", None)
            if src == "bf16" and dst == "fp32":
                bits = np.frombuffer(input.tobytes(), dtype=np.uint16)
                if not np.any(((bits & 0x7F80) == 0) & ((bits & 0x7F) != 0)):
                    return (bits.astype(np.uint32) << 16).reshape(input.shape)
            elif src == "fp32" and dst == "bf16":
                bits = np.frombuffer(input.tobytes(), dtype=np.uint32)
                if not np.any(((bits & 0x7F800000) == 0) & ((bits & 0x7FFFFF) != 0)):
                    return (bits >> 16).astype(np.uint16).reshape(input.shape)
        return original(input, input_dtype, output_dtype, rounding_mode)

    convert_float._moelink_fast = True
    convert_float._moelink_original = original
    interp._convert_float = convert_float


def _cheap_types(core) -> None:
    """The interpreter's type objects made lazy or memoized: a block type's name and shape check, a tensor's shape
    tuple and numel (fast_interpreter_types.py, split out for size)."""
    _sibling("fast_interpreter_types").cheap_types(core)


def _no_discarded_overflow_checks(interp) -> None:
    """The interpreter's integer `+`, `-`, `*` check for overflow (`sanitize_overflow`, on by default): each casts both
    operands to int64, redoes the operation, compares with the type's bounds and hands the answer to `device_assert`,
    which drops it unless the interpreter runs with `debug` (its `InterpreterOptions`, never set by the tests). So
    without `debug` the check computes values nobody reads (19 % of an interpreter LoRA graph test, py-spy): it is
    skipped then, and runs as before with `debug`. Same program: the check's asserts hold for every call (its caller
    has cast both operands to one integer type), and numpy's int64 array operations never raise."""
    sem = interp.interpreter_semantic
    original = type(sem).binary_op_sanitize_overflow_impl

    def sanitize(lhs, rhs, binary_op):
        if sem.builder.options.debug:
            return original(sem, lhs, rhs, binary_op)
        return None

    sanitize._moelink_fast = True
    sem.binary_op_sanitize_overflow_impl = sanitize


def _memo_type_rules(interp) -> None:
    """Two type checks every interpreted binary op makes (7 % of an interpreter graph test with what they call,
    py-spy): `computation_type_impl`, the promotion rule for the operands' scalar types (a dozen `is_fp64()`-style
    calls per op), memoized for plain `tl.dtype`s by their identity and the flags (the rule reads nothing else: the
    types' names, kinds and widths, fixed at creation; the memo keeps them alive, and a pair that raises is not
    memoized, so it raises again); and `cast` to the type a value has already, which the original answers with the
    value itself after `dtype.__eq__` compares the names: here when the scalar types are one `tl.dtype` object."""
    sem, dtype = interp.interpreter_semantic, interp.tl.core.dtype
    rule, cast = type(sem).computation_type_impl, type(sem).cast
    memo: dict[tuple, tuple] = {}

    def computation_type(a_ty, a_is_scalar, b_ty, b_is_scalar, div_or_mod):
        if type(a_ty) is not dtype or type(b_ty) is not dtype:
            return rule(sem, a_ty, a_is_scalar, b_ty, b_is_scalar, div_or_mod)
        key = (id(a_ty), a_is_scalar, id(b_ty), b_is_scalar, div_or_mod)
        hit = memo.get(key)
        if hit is None:
            hit = memo[key] = (a_ty, b_ty, rule(sem, a_ty, a_is_scalar, b_ty, b_is_scalar, div_or_mod))
        return hit[2]

    def same_type_cast(input, dst_ty, fp_downcast_rounding=None):
        src = input.type.scalar
        if src is dst_ty.scalar and type(src) is dtype:
            return input
        return cast(sem, input, dst_ty, fp_downcast_rounding)

    computation_type._moelink_fast = same_type_cast._moelink_fast = True
    sem.computation_type_impl, sem.cast = computation_type, same_type_cast


def _reads_only_the_shape(create_splat) -> bool:
    """Whether the interpreter's `create_splat(ret_ty, arg)` reads nothing of `ret_ty` but `ret_ty.shape`."""
    try:
        src = inspect.getsource(create_splat)
    except (OSError, TypeError):
        return False
    return src.count("ret_ty") == src.count("ret_ty.shape") + 1  # + the parameter itself


def _cheap_broadcasts(interp) -> None:
    """The interpreter's `broadcast_impl_value` (every binary op's operands, 10 % of an interpreter graph test) with
    its three commonest cases done directly: two blocks of one shape (the original walks both shapes, builds the same
    shape again and compares: nothing changes), two blocks of one rank (the same walk over the shapes' ints, without
    the original's `tl.tuple` indexing and comparisons: the same shape, broadcasts and types) and a block beside a scalar (the scalar splat to the block's shape:
    the original hands `create_splat` the block type's `to_ir`, a new equal block type, of which the interpreter's
    `create_splat` reads only the shape; here the type itself). Every other case goes to the original."""
    sem = interp.interpreter_semantic
    original, builder = type(sem).broadcast_impl_value, sem.builder
    make, block_type = sem.make_tensor, interp.tl.core.block_type

    def broadcast(lhs, rhs):
        lhs_ty, rhs_ty = lhs.type, rhs.type
        lhs_block, rhs_block = lhs_ty.is_block(), rhs_ty.is_block()
        if lhs_block and rhs_block:
            lhs_dims, rhs_dims = lhs_ty.shape.values, rhs_ty.shape.values
            if lhs_dims == rhs_dims:
                return lhs, rhs
            if len(lhs_dims) == len(rhs_dims):  # the original's walk over plain ints; a mismatch raises there
                ret = []
                for left, right in zip(lhs_dims, rhs_dims):
                    if left == 1:
                        ret.append(right)
                    elif right == 1 or right == left:
                        ret.append(left)
                    else:
                        return original(sem, lhs, rhs)
                if lhs_dims != ret:
                    lhs = make(builder.create_broadcast(lhs.handle, ret), block_type(lhs_ty.scalar, ret))
                if rhs_dims != ret:
                    rhs = make(builder.create_broadcast(rhs.handle, ret), block_type(rhs_ty.scalar, ret))
                return lhs, rhs
        elif lhs_block:
            ty = lhs_ty.with_element_ty(rhs_ty.scalar)
            return lhs, make(builder.create_splat(ty, rhs.handle), ty)
        elif rhs_block:
            ty = rhs_ty.with_element_ty(lhs_ty.scalar)
            return make(builder.create_splat(ty, lhs.handle), ty), rhs
        return original(sem, lhs, rhs)

    broadcast._moelink_fast = True
    sem.broadcast_impl_value = broadcast


def _makes_the_known_stand_in(patch_attr) -> bool:
    """Whether the interpreter's `_patch_attr` is the one `_lean_patched_builtins` stands in for (Triton 3.9's)."""
    try:
        src = " ".join(inspect.getsource(patch_attr).split())
    except (OSError, TypeError):
        return False
    return ('new_member = lambda *args, member=member, **kwargs: (member(*args, ** {k: v for k, v in kwargs.items() '
            'if k != "_semantic"}, _semantic=interpreter_semantic)) scope.set_attr(obj, name, new_member)') in src


def _lean_patched_builtins(interp) -> None:
    """The interpreter's `_patch_attr`, which makes the stand-in for each builtin of a patched language module, with a
    stand-in that does the same per call without the dict comprehension the original builds from the keywords (every
    interpreted op goes through one: 4 % of an interpreter attention test, py-spy): the keywords the builtin gets are
    the caller's without `_semantic`, then `_semantic=interpreter_semantic` (read per call, as the original's global)
    last, in the same order; `member` can be passed by keyword as before."""
    original = interp._patch_attr
    # A `@builtin`'s wrapper only refuses a call without `_semantic` and calls the function it wraps: the stand-in
    # calls that function itself where the semantic it passes is not None (the wrapper's check passes then).
    wrapper_code = interp.tl.core.builtin(lambda: None).__code__
    if "fn" not in wrapper_code.co_freevars:
        wrapper_code = None

    def patch_attr(obj, name, member, builder, scope):
        own = member
        wrapped = None
        # The function the wrapper calls: its closure's `fn`.
        if wrapper_code is not None and getattr(member, "__code__", None) is wrapper_code:
            wrapped = member.__closure__[wrapper_code.co_freevars.index("fn")].cell_contents

        def new_member(*args, member=member, **kwargs):
            kwargs.pop("_semantic", None)
            kwargs["_semantic"] = sem = interp.interpreter_semantic
            if wrapped is not None and sem is not None and member is own:
                return wrapped(*args, **kwargs)
            return member(*args, **kwargs)

        scope.set_attr(obj, name, new_member)

    patch_attr._moelink_fast = True
    patch_attr._moelink_original = original
    interp._patch_attr = patch_attr


def install() -> bool:
    """Patch the interpreter once per process, when TRITON_INTERPRET=1; True when installed (or already). (Not
    before the variable is set: importing Triton's interpreter first makes Triton define compiled kernels.)"""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except ImportError:
        return False
    executor, function = interp.GridExecutor, getattr(interp, "InterpretedFunction", None)
    if function is None or not hasattr(interp, "_patch_lang") or not callable(getattr(function, "rewrite", None)):
        return False
    if getattr(executor.__call__, "_moelink_fast", False):
        return True
    launch, device_call = executor.__call__, function.__call__

    def launch_call(self, *args, **kwargs):
        outer = getattr(_state, "patched", None)
        _state.patched = _langs(self.fn, tl)
        try:
            return launch(self, *args, **kwargs)
        finally:
            _state.patched = outer

    def helper_call(self, *args, **kwargs):
        patched, langs = getattr(_state, "patched", None), _langs(self.fn, tl)
        if patched is None:
            return device_call(self, *args, **kwargs)
        if not langs <= patched:
            # The interpreter's own call: it patches this helper's modules (tl.core for tl.zeros, tl.sum, ...)
            # and never restores them before the launch ends, so the rest of the launch needs no new patch.
            _state.patched = patched | langs
            return device_call(self, *args, **kwargs)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # what the interpreter's own call raises
            raise interp.InterpreterError(repr(e)) from e

    launch_call._moelink_fast = True
    executor.__call__, function.__call__ = launch_call, helper_call
    if callable(getattr(interp, "_get_np_dtype", None)) and hasattr(getattr(interp, "tl", None), "block_type"):
        _memo_np_dtype(interp)
    if callable(getattr(interp, "_convert_float", None)) and hasattr(interp, "np") \
            and not getattr(interp._convert_float, "_moelink_fast", False):
        _fast_bf16_casts(interp)
    sem = getattr(interp, "interpreter_semantic", None)
    if callable(getattr(type(sem), "binary_op_sanitize_overflow_impl", None)) \
            and hasattr(getattr(sem, "builder", None), "options") \
            and not getattr(vars(sem).get("binary_op_sanitize_overflow_impl"), "_moelink_fast", False):
        _no_discarded_overflow_checks(interp)
    if all(callable(getattr(type(sem), n, None)) and not getattr(vars(sem).get(n), "_moelink_fast", False)
           for n in ("computation_type_impl", "cast")) and isinstance(getattr(interp, "tl", None), types.ModuleType):
        _memo_type_rules(interp)
    splat = getattr(getattr(interp, "InterpreterBuilder", None), "create_splat", None)
    if callable(getattr(type(sem), "broadcast_impl_value", None)) and callable(splat) \
            and _reads_only_the_shape(splat) \
            and not getattr(vars(sem).get("broadcast_impl_value"), "_moelink_fast", False):
        _cheap_broadcasts(interp)  # (only where create_splat reads nothing of its type but the shape)
    attr = getattr(interp, "_patch_attr", None)
    if callable(attr) and not getattr(attr, "_moelink_fast", False) and _makes_the_known_stand_in(attr):
        _lean_patched_builtins(interp)
    _sibling("fast_interpreter_scan").install_memo_scan(interp)
    _sibling("fast_interpreter_binary").install_binary_checks(interp)
    _sibling("fast_interpreter_binary").install_lean_unwrap(interp)
    core = tl.core
    if all(callable(getattr(core, n, None)) for n in ("validate_block_shape", "_unwrap_shape",
                                                       "_type_for_tuple_values", "block_type", "tuple",
                                                       "tensor", "constexpr")) \
            and not getattr(core.block_type.__init__, "_moelink_fast", False) \
            and "name" not in vars(core.block_type) and "type" not in vars(core.tuple):
        _cheap_types(core)
    return True


SITE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "interpreter_site")


def interpreter_env(env: dict | None = None) -> dict:
    """`env` (default: this process's) for a Python the test starts with the kernels in the interpreter:
    TRITON_INTERPRET=1, and this module installed at its start-up (interpreter_site/sitecustomize.py)."""
    out = dict(os.environ if env is None else env, TRITON_INTERPRET="1")
    out["PYTHONPATH"] = os.pathsep.join(p for p in (SITE_DIR, out.get("PYTHONPATH", "")) if p)
    return out


def lazy_interpreter_env(env: dict) -> dict:
    """`env` for a process whose Python children turn the interpreter on themselves (benchmarks/gpu_session.sh's
    --cpu-smoke steps set TRITON_INTERPRET after start-up): TRITON_INTERPRET left as it is, and this module installed
    in any child when Triton imports its interpreter (interpreter_site/sitecustomize.py). Last on PYTHONPATH: a
    `sitecustomize` the caller put there (a test standing in for another image) is the one Python imports."""
    out = dict(env, MOELINK_FAST_INTERPRETER="1")
    out["PYTHONPATH"] = os.pathsep.join(p for p in (out.get("PYTHONPATH", ""), SITE_DIR) if p)
    return out


def _sibling(stem: str):
    """This file's sibling `stem`.py (fast_interpreter_scan, fast_interpreter_binary), found by path as this module
    may be: interpreter_site's sitecustomize loads this file by path in children where `tests` is not importable
    (benchmark smokes run with their own cwd and PYTHONPATH)."""
    import importlib.util
    import sys

    name = f"_moelink_{stem}"
    module = sys.modules.get(name)
    if module is None:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{stem}.py")
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None, path
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module
