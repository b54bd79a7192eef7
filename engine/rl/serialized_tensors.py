"""SGLang's `update_weights_from_tensor` payload over HTTP (docs/rl.md#over-http): `serialized_named_tensors`, one
entry per TP rank of the sender, each the base64 of a `multiprocessing.reduction.ForkingPickler` pickle (SGLang's
`MultiprocessingSerializer.serialize(obj, output_str=True)`) of either
  - a list of (name, tensor) pairs (load_format none; a tensor may come wrapped in SGLang's
    `LocalSerializedTensor`, whose `values` hold one such pickle of it per TP rank), or
  - {"flattened_tensor": tensor, "metadata": [FlattenedTensorMetadata(name, shape, dtype, start_idx, end_idx,
    numel), ...]} (load_format "flattened_bucket": slime's and verl's buckets, the slices of one flat tensor, by
    element or, when flattened to bytes, by byte).

A pickle names the functions that rebuild it, so a client's pickle is never loaded as it is: only torch's rebuild
functions for a CPU tensor and SGLang's two payload classes are allowed, each resolved to this module's reviewed
choice (`_Unpickler.find_class`), and everything else refused naming the entry. What a CPU tensor's pickle carries
depends on the sender's torch sharing strategy: "file_system" (a named shared-memory segment on this host: taken) or
"file_descriptor", torch's default on Linux, whose descriptor only a process of the sender's own multiprocessing
family may fetch (refused, saying to set the strategy). A colocated GPU trainer's pickle holds CUDA IPC handles:
refused naming the field (a CPU server cannot open them; the GPU transport is not served over HTTP yet).

Every rank of this engine takes the whole tensors (each writes the part it holds), so entry 0 is read; the other
entries are the sender's other TP ranks' copies of the same tensors.
"""
from __future__ import annotations

import base64
import binascii
import io
import pickle
from typing import Any

FIELD = "serialized_named_tensors"
_REDUCTIONS = "torch.multiprocessing.reductions"
_CUDA_WHY = (f"{FIELD}[0] holds CUDA IPC handles (a colocated GPU trainer's tensors), which this server does not "
             "open over HTTP (a CPU server cannot). Send CPU tensors "
             "(torch.multiprocessing.set_sharing_strategy('file_system') in the trainer), or update over a process "
             "group (/init_weights_update_group, /update_weights_from_distributed) or from disk.")
_FD_WHY = (f"{FIELD}[0] shares its CPU tensors by file descriptor (torch's default sharing strategy), which only a "
           "process of the sender's own multiprocessing family can fetch: call "
           "torch.multiprocessing.set_sharing_strategy('file_system') in the trainer before serializing.")


class PayloadRefused(ValueError):
    """A payload this server does not take; `field` names what the client sent."""

    field = FIELD


class FlattenedTensorMetadata:
    """SGLang's weight_sync.tensor_bucket.FlattenedTensorMetadata, as its pickle rebuilds it (fields set by BUILD)."""

    name: str
    shape: Any
    dtype: Any
    start_idx: int
    end_idx: int
    numel: int


class LocalSerializedTensor:
    """SGLang's LocalSerializedTensor: `values`, one serialized tensor per TP rank."""

    values: list


def _refuse_cuda(*args):
    raise PayloadRefused(_CUDA_WHY)


def _refuse_fd(*args):
    raise PayloadRefused(_FD_WHY)


class _FdRefused:
    """multiprocessing's DupFd, which a pickle makes as an object (NEWOBJ): refused as it is made."""

    def __new__(cls, *args, **kwargs):
        raise PayloadRefused(_FD_WHY)


def _storage_from_bytes(b: bytes):
    """torch.storage._load_from_bytes (a plain pickle's storage), loaded with torch's weights-only loader."""
    import torch

    return torch.load(io.BytesIO(b), weights_only=True)


def _storage_filename(max_bytes: int | None):
    """torch's rebuild of a CPU storage in a named shared-memory segment ("file_system" strategy): the name is
    torch's own kind, never a path, and the segment at most `max_bytes` (torch grows a segment to the size a pickle
    names: a client's pickle never makes this host's shared memory larger than an update can need)."""
    import torch
    from torch.multiprocessing import reductions

    def rebuild(cls, manager, handle, size, dtype=None):
        if not (isinstance(handle, bytes) and handle.startswith(b"/torch_") and b"/" not in handle[1:]
                and isinstance(size, int) and not isinstance(size, bool) and size >= 0
                and isinstance(manager, bytes) and (dtype is None or isinstance(dtype, torch.dtype))):
            raise PayloadRefused(f"{FIELD}[0] names a shared-memory segment that is not torch's.")
        nbytes = size * (1 if dtype is None else torch._utils._element_size(dtype))
        if max_bytes is not None and nbytes > max_bytes:
            raise PayloadRefused(f"{FIELD}[0] names a shared-memory segment of {nbytes} bytes, more than the served "
                                 f"weights could need ({max_bytes}).")
        if not _torch_manager(manager):
            raise PayloadRefused(f"{FIELD}[0] names a shared-memory manager that is not a torch_shm_manager socket "
                                 "of this server's user (<tmp>/torch-shm-dir-*/manager.sock).")
        return reductions.rebuild_storage_filename(_real(cls), manager, handle, size, dtype)
    return rebuild


def _torch_manager(manager: bytes) -> bool:
    """Whether `manager` names a torch_shm_manager's socket (libshm's `<tmp>/torch-shm-dir-XXXXXX/manager.sock`),
    spelled plainly (absolute; no `.`, `..` or empty segment), a socket itself (not a link) owned by this process'
    user. Why: torch connects to the socket a pickle names and waits up to 1 s for its "OK" with the GIL held (every
    stream stopped), and keeps each name's connection for good: any socket on the host was written to, and each
    spelling of one (`/a/./s`, `/a//s`) cost a file descriptor for the process' life."""
    import os
    import stat

    try:
        path = manager.decode("ascii")
    except UnicodeDecodeError:
        return False
    parts = path.split("/")
    if (not path.startswith("/") or len(parts) < 3 or any(p in ("", ".", "..") for p in parts[1:])
            or parts[-1] != "manager.sock" or not parts[-2].startswith("torch-shm-dir-")):
        return False
    try:
        st = os.lstat(path)
    except (OSError, ValueError):  # ValueError: a NUL in the name
        return False
    return stat.S_ISSOCK(st.st_mode) and st.st_uid == os.getuid()


class _ClassRef:
    """A class a pickle names only as an argument (a tensor's or a storage's type), never to be called: REDUCE on
    it fails (`torch.Tensor(10**12)` would allocate), while torch's rebuilds compare it (`cls == Parameter`)."""

    def __init__(self, cls):
        self.cls = cls

    def __eq__(self, other):
        return self.cls is _real(other)

    def __hash__(self):
        return hash(self.cls)


def _real(cls):
    return cls.cls if isinstance(cls, _ClassRef) else cls


def _storage_empty(cls):
    import torch

    return torch.UntypedStorage() if _real(cls) is torch.UntypedStorage else torch.TypedStorage()


def _allowed(module: str, name: str, max_bytes: int | None = None):
    import torch
    from torch.multiprocessing import reductions

    if "cuda" in name.lower() or "ipc" in name.lower():
        return _refuse_cuda
    if name == "DupFd" and module.startswith("multiprocessing."):
        return _FdRefused
    if module == _REDUCTIONS:
        if name == "rebuild_storage_fd":
            return _refuse_fd
        if name == "rebuild_storage_filename":
            return _storage_filename(max_bytes)
        if name == "rebuild_storage_empty":
            return _storage_empty
        if name in ("rebuild_tensor", "rebuild_typed_storage", "rebuild_parameter", "rebuild_parameter_with_state"):
            return getattr(reductions, name)
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_parameter"):
        return getattr(torch._utils, name)
    if module == "torch.storage" and name == "_load_from_bytes":
        return _storage_from_bytes
    if module in ("torch", "torch.storage") and name in ("UntypedStorage", "TypedStorage"):
        return _ClassRef(getattr(torch, name))
    if module == "torch" and name == "Size":
        return torch.Size
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    if module in ("torch", "torch._tensor") and name == "Tensor":
        return _ClassRef(torch.Tensor)
    if module == "torch.nn.parameter" and name == "Parameter":
        return _ClassRef(torch.nn.Parameter)
    if module == "collections" and name == "OrderedDict":
        import collections

        return collections.OrderedDict
    if name == "FlattenedTensorMetadata":  # SGLang's (sglang.srt.weight_sync.tensor_bucket) or a copy of it
        return FlattenedTensorMetadata
    if name == "LocalSerializedTensor":
        return LocalSerializedTensor
    return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, max_bytes: int | None = None):
        super().__init__(file)
        self.max_bytes = max_bytes

    def find_class(self, module: str, name: str):
        found = _allowed(module, name, self.max_bytes)
        if found is None:
            raise PayloadRefused(f"{FIELD}[0] names {module}.{name}, which a weight payload never needs (only a CPU "
                                 "tensor's rebuild and SGLang's payload classes are taken).")
        return found


def _load(data: bytes | str, max_bytes: int | None = None) -> Any:
    if isinstance(data, str):
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise PayloadRefused(f"{FIELD}[0] is not base64 (SGLang's MultiprocessingSerializer.serialize(..., "
                                 "output_str=True)).") from None
    try:
        return _Unpickler(io.BytesIO(data), max_bytes).load()
    except PayloadRefused:
        raise
    except RuntimeError as e:  # torch could not open what the pickle names (a segment gone, a sender exited)
        raise PayloadRefused(f"{FIELD}[0]: its tensors could not be opened: {str(e).splitlines()[0][:200]} (the "
                             "sender must keep them alive until this call answers).") from None
    except Exception as e:  # noqa: BLE001  (a truncated or garbage pickle)
        raise PayloadRefused(f"{FIELD}[0] is not a payload SGLang's MultiprocessingSerializer wrote "
                             f"({type(e).__name__}).") from None


def _tensor(value: Any, where: str, max_bytes: int | None):
    import torch

    if isinstance(value, LocalSerializedTensor):
        values = getattr(value, "values", None)
        if not isinstance(values, list) or not values:
            raise PayloadRefused(f"{FIELD}[0]: {where} is a LocalSerializedTensor without values.")
        value = _load(values[0], max_bytes)
    if not isinstance(value, torch.Tensor):
        raise PayloadRefused(f"{FIELD}[0]: {where} is not a tensor.")
    if value.device.type != "cpu":
        raise PayloadRefused(_CUDA_WHY)
    return value.detach().clone()  # the sender may free its shared memory once the call answers


def decode_named_tensors(entries: list, load_format: str | None, max_bytes: int | None = None) -> list:
    """[(name, CPU tensor)] of an update_weights_from_tensor call's `serialized_named_tensors` (entry 0; see the
    module's docstring), copied out of the sender's shared memory, no segment larger than `max_bytes` (None: no
    bound). PayloadRefused names what is not taken."""
    import torch

    obj = _load(entries[0], max_bytes)
    if load_format == "flattened_bucket":
        if not isinstance(obj, dict) or set(obj) != {"flattened_tensor", "metadata"}:
            raise PayloadRefused(f"{FIELD}[0] is not a flattened bucket ({{'flattened_tensor', 'metadata'}}), as "
                                 "load_format='flattened_bucket' says.")
        flat, metas = obj["flattened_tensor"], obj["metadata"]
        if not isinstance(flat, torch.Tensor) or flat.device.type != "cpu":
            raise PayloadRefused(_CUDA_WHY if isinstance(flat, torch.Tensor) else
                                 f"{FIELD}[0]: flattened_tensor is not a tensor.")
        if not isinstance(metas, list):
            raise PayloadRefused(f"{FIELD}[0]: metadata is not a list.")
        flat = flat.reshape(-1)
        out = []
        for i, m in enumerate(metas):
            if not isinstance(m, FlattenedTensorMetadata):
                raise PayloadRefused(f"{FIELD}[0]: metadata[{i}] is not a FlattenedTensorMetadata.")
            try:
                name, start, end = m.name, m.start_idx, m.end_idx
                if not (isinstance(name, str) and isinstance(start, int) and isinstance(end, int)
                        and 0 <= start <= end <= flat.numel()):
                    raise ValueError("out of the flat tensor")
                out.append((name, flat[start:end].view(m.dtype).reshape(tuple(m.shape)).clone()))
            except (AttributeError, RuntimeError, TypeError, ValueError) as e:
                raise PayloadRefused(f"{FIELD}[0]: metadata[{i}] does not slice the flat tensor "
                                     f"({str(e).splitlines()[0][:120]}).") from None
        return out
    if not isinstance(obj, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2
                                                     and isinstance(p[0], str) for p in obj):
        raise PayloadRefused(f"{FIELD}[0] is not a list of (name, tensor) pairs (load_format none; a flattened "
                             "bucket takes load_format='flattened_bucket').")
    return [(name, _tensor(t, f"tensor {name!r}", max_bytes)) for name, t in obj]


__all__ = ["FlattenedTensorMetadata", "LocalSerializedTensor", "PayloadRefused", "decode_named_tensors"]
