"""Which files a safetensors checkpoint is made of, and, for a checkpoint a request names, within what bounds.

A checkpoint's files are those its model.safetensors.index.json's weight_map names, or every *.safetensors file of
its directory. The served checkpoint is trusted (the operator chose it); a checkpoint a request names (a weight
update from disk, engine/rl/weights.py) is read under `HeaderBounds`: its index size, tensor and file counts checked
before the bytes are read or parsed, and every file it names inside its directory (`confined`: no `..`, no absolute
path, no link out of it, a Hugging Face cache snapshot's own blobs allowed), so a request cannot make the server
parse gigabytes of JSON or read (and quote) someone else's file. The headers themselves are read by
checkpoint_headers.py, which sets the bounds (`bounds_like`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class HeaderBounds:
    """What reading a checkpoint's headers may cost (a checkpoint a request names: a weight update). Each is checked
    before the bytes it bounds are read: `max_header_bytes` the JSON headers of every file together (the 8-byte
    length of each read first), `max_index_bytes` model.safetensors.index.json's size, `max_tensors` the tensors
    the headers and the index's weight_map name, `max_files` the files. `confined`: every file must lie inside the
    checkpoint's directory (`checkpoint_file`)."""

    max_tensors: int
    max_header_bytes: int
    max_index_bytes: int
    max_files: int
    confined: bool = True

    def __post_init__(self) -> None:
        for name in ("max_tensors", "max_header_bytes", "max_index_bytes", "max_files"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} is invalid: must be a positive integer.")


def _roots(path: Path) -> tuple[Path, ...]:
    """Where a confined checkpoint's files may resolve to: its directory, and for a Hugging Face cache snapshot
    (models--org--name/snapshots/<revision>, whose files are links to ../../blobs/<hash>) its repository's blobs."""
    roots = [path.resolve()]
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        roots.append((path.parent.parent / "blobs").resolve())
    return tuple(roots)


def checkpoint_file(path: Path, fname, roots: tuple[Path, ...] | None) -> Path:
    """The file a checkpoint's index names (`fname`, from its weight_map) or lists: a plain name relative to the
    checkpoint directory `path` (no absolute path, no '..', no empty or NUL part); with `roots` (a confined
    checkpoint) it must also resolve, links followed, inside one of them. ValueError naming the entry and the rule,
    never anything of the file it points at."""
    if not isinstance(fname, str) or not fname or "\x00" in fname or os.path.isabs(fname) \
            or any(part in ("", "..") for part in fname.split("/")):
        raise ValueError(f"checkpoint {str(path)!r} is invalid: its {INDEX_NAME} names file {fname!r:.200}: a "
                         "checkpoint names its files relative to its directory (no absolute path, no '..').")
    f = path / fname
    if roots is not None:
        real = f.resolve()
        if not any(real.is_relative_to(root) for root in roots):
            raise ValueError(f"checkpoint {str(path)!r} is invalid: its file {fname!r:.200} is a link out of the "
                             "checkpoint's directory: an update reads files inside it only.")
    return f


def _weight_map(path: Path, bounds: HeaderBounds | None) -> dict | None:
    """model.safetensors.index.json's weight_map (None when there is no index), its size checked before it is
    read."""
    index = path / INDEX_NAME
    if not index.is_file():
        return None
    if bounds is not None:
        if bounds.confined:
            checkpoint_file(path, INDEX_NAME, _roots(path))
        if index.stat().st_size > bounds.max_index_bytes:
            raise ValueError(f"checkpoint {str(path)!r} is invalid: its {INDEX_NAME} is larger than this update "
                             f"may be ({bounds.max_index_bytes} bytes: twice the served checkpoint's index and "
                             "1 MiB).")
        with open(index, "rb") as f:
            raw = f.read(bounds.max_index_bytes + 1)
        if len(raw) > bounds.max_index_bytes:  # grew since its stat
            raise ValueError(f"checkpoint {str(path)!r} is invalid: its {INDEX_NAME} is larger than this update may "
                             f"be ({bounds.max_index_bytes} bytes).")
    else:
        raw = index.read_bytes()
    try:
        weight_map = json.loads(raw).get("weight_map", {})
    except (ValueError, AttributeError):
        raise ValueError(f"checkpoint {str(path)!r} is invalid: its {INDEX_NAME} is not a JSON object.") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"checkpoint {str(path)!r} is invalid: its {INDEX_NAME}'s weight_map is not an object.")
    if bounds is not None and len(weight_map) > bounds.max_tensors:
        raise ValueError(f"checkpoint {str(path)!r} is invalid: its {INDEX_NAME} names {len(weight_map)} tensors, "
                         f"more than this update may ({bounds.max_tensors}: twice the served checkpoint's).")
    return weight_map


def safetensors_files(path: Path, bounds: HeaderBounds | None) -> list[Path]:
    """The checkpoint's safetensors files: those its index names, or every *.safetensors of the directory."""
    roots = _roots(path) if bounds is not None and bounds.confined else None
    weight_map = _weight_map(path, bounds)
    names = sorted(set(weight_map.values()), key=str) if weight_map is not None \
        else sorted(f.name for f in path.glob("*.safetensors"))
    if bounds is not None and len(names) > bounds.max_files:
        raise ValueError(f"checkpoint {str(path)!r} is invalid: it names {len(names)} safetensors files, more than "
                         f"this update may ({bounds.max_files}: twice the served checkpoint's).")
    return [checkpoint_file(path, n, roots) for n in names]


def index_of(model_dir: str | Path, bounds: HeaderBounds | None = None) -> dict[str, Path] | None:
    """Tensor name -> file from the checkpoint's index (None when it has none), every file checked by
    `checkpoint_file` (and confined, with `bounds`)."""
    path = Path(model_dir)
    weight_map = _weight_map(path, bounds)
    if weight_map is None:
        return None
    roots = _roots(path) if bounds is not None and bounds.confined else None
    files: dict[str, Path] = {}
    for fname in set(weight_map.values()):
        files[fname] = checkpoint_file(path, fname, roots)
    return {name: files[fname] for name, fname in weight_map.items()}


def glob_files(model_dir: str | Path, bounds: HeaderBounds | None = None) -> list[Path]:
    """The *.safetensors files of a checkpoint without an index (confined and counted, with `bounds`)."""
    return safetensors_files(Path(model_dir), bounds)
