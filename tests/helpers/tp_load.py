"""Loading one tensor-parallel rank's shard in one process (no process group): `LoadOnlyTP` stands in for the rank's
TensorParallel (loading runs no collective), `file_bytes` gives each checkpoint tensor's bytes as stored, the
measure a rank's reads (engine/rank/loader.load_plan's read_bytes) are compared with."""
from __future__ import annotations

from safetensors import safe_open

from moelink.engine.rank.loader import checkpoint_index

# safetensors header dtypes -> bytes per element
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "F8_E4M3": 1,
               "F8_E8M0": 1}


class LoadOnlyTP:
    """A TP rank's place (`rank` of `size`) without a process group."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size


def file_bytes(path: str) -> dict[str, int]:
    """Bytes of each tensor of the checkpoint at `path`, by its name in the files."""
    out = {}
    for name, f in checkpoint_index(path).items():
        with safe_open(str(f), framework="pt") as st:
            t = st.get_slice(name)
            n = 1
            for d in t.get_shape():
                n *= d
            out[name] = n * DTYPE_BYTES[t.get_dtype()]
    return out
