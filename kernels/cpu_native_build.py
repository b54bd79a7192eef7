"""Builds and loads the native CPU kernels (kernels/csrc/cpu_ops.c) with the machine's C compiler, once per source,
compiler and CPU, into a cache; `library()` is the loaded library or None (then every op runs its plain-torch
reference: kernels/cpu_native.py).

Why a C file and ctypes, not a torch extension: the kernels take raw pointers and sizes, so the build needs no torch
headers (a ~1 s compile, where a torch extension's is ~40 s) and no ABI match with the torch wheel; a ctypes call
costs ~1-2 us where each dispatched torch op costs 3-10 us on these CPUs.

Where: `$MOELINK_CACHE_DIR/cpu_native/` (default `$XDG_CACHE_HOME/moelink` or `~/.cache/moelink`), one file per key:
the source's hash, the compiler's version, the flags and the CPU's instruction sets. The build writes a temporary
file and renames it into place, so processes building at once (test workers, ranks) never load half a file.

Switches (environment): `MOELINK_CPU_NATIVE=0` turns the native kernels off (every op its reference); `CC` names the
compiler (default `cc`). Under `ATEN_CPU_CAPABILITY=avx2` (torch told to use its AVX2 kernels: `make test
CPU_ISA=avx2`) the library is built for AVX2 and FMA rather than the machine's own (`-march=native`), so the suite
runs the instruction sets an AVX2 machine has.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_ops.c"
ABI_VERSION = 5  # ml_abi_version() of the source this module's signatures describe
BUILD_TIMEOUT_S = 120.0
# No -ffast-math: cpu_ops.c's sums keep their order (the same result in any batch) and NaN propagates.
# No contraction into FMAs either: the elementwise ops round as torch's do.
BASE_FLAGS = ("-O3", "-std=c11", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=off")
# Tried first; a compiler without OpenMP builds the same source without it (its pragmas ignored: one thread).
OPENMP_FLAGS = ("-fopenmp",)

_lock = threading.Lock()
_loaded: dict[str, Optional[ctypes.CDLL]] = {}
_flags_of: dict[str, tuple[str, ...]] = {}  # the flags each loaded library was built with

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_F = ctypes.c_float
# name -> (restype, argtypes): the C signatures of cpu_ops.c.
SIGNATURES: dict[str, tuple] = {
    "ml_abi_version": (_I64, []),
    "ml_rms_norm_f32": (None, [_P, _P, _P, _I64, _I64, _F]),
    "ml_add_rms_norm_f32": (None, [_P, _P, _P, _P, _P, _I64, _I64, _F, _INT]),
    "ml_rms_norm_bf16": (_INT, [_P, _P, _P, _P, _P, _I64, _I64, _F, _INT]),
    "ml_route_greedy": (_INT, [_P, _INT, _P, _P, _I64, _I64, _I64, _INT, _F, _P, _P]),
    "ml_moe_small": (_INT, [_P, _P, _P, _P, _P, _P, _P, _P, _I64, _P, _I64, _I64, _I64, _I64, _I64, _INT, _INT, _F,
                            _F, _INT]),
    "ml_rope_write_kv": (_INT, [_P, _I64, _I64, _P, _I64, _I64, _P, _I64, _I64, _P, _P, _I64, _I64, _P, _P, _P, _I64,
                                _P, _P, _F, _P, _I64, _I64, _I64, _I64, _I64, _INT, _INT]),
    "ml_silu_mul": (None, [_P, _I64, _P, _I64, _P, _I64, _I64, _INT]),
    "ml_argmax_rows": (None, [_P, _INT, _P, _I64, _I64]),
    "ml_team_size": (_INT, [_INT]),
    "ml_paged_attention": (_INT, [_P, _I64, _I64, _P, _P, _P, _I64, _I64, _I64, _P, _P, _P, _P, _I64, _I64, _I64, _I64,
                                  _I64, _I64, _I64, _I64, _F, _INT, _INT]),
}


def enabled() -> bool:
    """False when MOELINK_CPU_NATIVE is 0 / false / off / no."""
    return os.environ.get("MOELINK_CPU_NATIVE", "1").strip().lower() not in ("0", "false", "off", "no")


def isa_flags() -> tuple[str, ...]:
    """The instruction-set flags: the machine's own, or AVX2 + FMA when torch is told to stay at AVX2."""
    capability = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if capability == "avx2":
        return ("-mavx2", "-mfma")
    if capability == "default":
        return ()
    if platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64"):
        return ("-march=native",)
    return ()


def cache_dir() -> Path:
    root = os.environ.get("MOELINK_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = os.path.join(xdg, "moelink") if xdg else os.path.join(os.path.expanduser("~"), ".cache", "moelink")
    return Path(root) / "cpu_native"


def _cpu_features() -> str:
    """The CPU's instruction-set line (Linux), so a cache shared between machines keeps one build per CPU kind."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler_version(cc: list[str]) -> Optional[str]:
    if not cc or shutil.which(cc[0]) is None:
        return None
    try:
        done = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _build(cc: list[str], flags: tuple[str, ...], target: Path) -> Optional[str]:
    """Compile SOURCE into `target` (readable by everyone who shares the cache, as the umask allows); None, or what
    went wrong (an unwritable cache folder included)."""
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", prefix=".build-", dir=target.parent)
        os.close(fd)
        done = subprocess.run([*cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            return (done.stderr or done.stdout).strip()[-2000:] or f"{cc[0]} exited with {done.returncode}"
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o755 & ~umask)  # mkstemp's file is the owner's alone
        os.replace(tmp, target)
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    got = lib.ml_abi_version()
    if got != ABI_VERSION:
        raise OSError(f"{path} reports ABI {got}, this moelink expects {ABI_VERSION}")
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The native kernels' library, built at the first call (about a second) and then loaded from the cache; None
    when they are switched off or cannot be built here (no compiler: a warning once, the references run)."""
    if not enabled():
        return None
    cc_text = os.environ.get("CC", "cc")
    flags = BASE_FLAGS + isa_flags()
    memo_key = f"{cc_text}|{' '.join(flags)}"
    with _lock:
        if memo_key in _loaded:
            return _loaded[memo_key]
        lib, why = None, None
        try:
            # With OpenMP where the compiler has it (the large steps' rows over torch's intra-op threads: the library
            # then links libgomp.so.1, the one torch has loaded, so both share one thread pool); else single-threaded.
            for attempt in ((*flags, *OPENMP_FLAGS), flags):
                lib, why = _build_and_load(shlex.split(cc_text), attempt)
                if lib is not None:
                    _flags_of[memo_key] = attempt
                    break
        except Exception as exc:  # noqa: BLE001  (anything here leaves the references running, never the engine down)
            why = f"{type(exc).__name__}: {exc}"
        if lib is None:
            logger.warning("native CPU kernels unavailable (%s): the plain-torch references run instead", why)
        _loaded[memo_key] = lib
        return lib


def built_flags() -> tuple[str, ...]:
    """The compiler flags of the library `library()` gives here (OpenMP's among them or not); () when there is none."""
    lib = library()
    cc_text = os.environ.get("CC", "cc")
    return _flags_of.get(f"{cc_text}|{' '.join(BASE_FLAGS + isa_flags())}", ()) if lib is not None else ()


def _build_and_load(cc: list[str], flags: tuple[str, ...]) -> tuple[Optional[ctypes.CDLL], Optional[str]]:
    """(the library, None) or (None, why not). A cached file that does not load (another libc, a damaged file) is
    built again once, in place."""
    version = _compiler_version(cc)
    if version is None:
        return None, f"no C compiler {' '.join(cc)!r} (set CC to one)"
    key = hashlib.sha256("\n".join([SOURCE.read_text(), version, " ".join(flags), _cpu_features(),
                                    platform.machine()]).encode()).hexdigest()[:24]
    target = cache_dir() / f"cpu_ops-{key}.so"
    built = False
    if not target.exists():
        if (why := _build(cc, flags, target)) is not None:
            return None, why
        built = True
    try:
        return _load(target), None
    except (OSError, AttributeError) as exc:
        if built:
            return None, f"{target}: {exc}"
    if (why := _build(cc, flags, target)) is not None:
        return None, why
    try:
        return _load(target), None
    except (OSError, AttributeError) as exc:
        return None, f"{target}: {exc}"


__all__ = ["ABI_VERSION", "SOURCE", "built_flags", "cache_dir", "enabled", "isa_flags", "library"]
