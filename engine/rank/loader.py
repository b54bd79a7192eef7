"""Load a Hugging Face safetensors checkpoint into a model by its weight plan.

Tensors are read one at a time with `safe_open`, so memory holds at most one
checkpoint tensor beyond the model itself, and a rank reads only the tensors
its plan lists (its own experts under expert parallelism).

FP8 (engine/config/quantization.py): FP8 tensors are copied as they are and their
`weight_scale_inv` as float32, both by the plan; a plan destination
`QuantizeOnLoad` (online FP8 from a float checkpoint) block-quantizes the tensor
as it is read. MXFP4 (gpt-oss's experts) is uint8 blocks and scales, copied as they are; so are NVFP4 experts
(uint8 values, e4m3 scales, float32 global scales), while NVFP4 weights elsewhere are dequantized to the
model dtype as they load (engine/rank/nvfp4_linears.py). INT4 experts' words and scales are copied, their zero
points and GPTQ / AWQ tensors rewritten as read (a `Repack` destination, moe/expert_weights_int4.py); INT4
linears elsewhere are dequantized at load (engine/rank/int4_linears.py).
`process_weights_after_loading` then lets modules convert what
they loaded (MLA's kv_b_proj, dequantized for its absorption).

Where tensors come from is a checkpoint object (`open_checkpoint`): the safetensors files
(`SafetensorsCheckpoint`, load_format "auto" / "safetensors"), or random tensors made on the device
(engine/rank/dummy_weights.py, load_format "dummy"); both go through the same plan and copies.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from moelink.kernels.fp8 import FP8_DTYPE, block_quantize
from moelink.moe.expert_weights import QuantizeOnLoad
from moelink.moe.weight_plan import Rearranged, WeightPlan

from ..config.checkpoint_files import HeaderBounds, glob_files, index_of
from ..config.checkpoint_headers import text_model_name
from ..config.model import ModelConfig
from ..config.worker_config import LOAD_FORMATS
from ..models.registry import MoEDecoderForCausalLM, arch_spec
from ..spec.heads import mtp_checkpoint_names
from ..tp.group import TensorParallel
from .dummy_weights import DummyCheckpoint
from .fp8_linears import fp8_linear_plan
from .int4_linears import int4_linear_plan
from .nvfp4_linears import nvfp4_linear_plan

logger = logging.getLogger(__name__)


def _open_file(fname: Path):
    """safe_open on one checkpoint file; a file safetensors cannot read (cut short, corrupt: EngineArgs' header check
    refuses those first, this is for a file changed since or a caller that skips it) is one error naming it."""
    try:
        return safe_open(str(fname), framework="pt")
    except SafetensorError as e:
        raise ValueError(f"checkpoint file {str(fname)!r} is truncated or corrupt: safetensors cannot read its header "
                         f"({e}).") from None


def checkpoint_index(model_dir: str | Path, bounds: HeaderBounds | None = None) -> dict[str, Path]:
    """Tensor name → safetensors file, from model.safetensors.index.json or the files themselves; every file a plain
    name inside the directory (engine/config/checkpoint_files.checkpoint_file). `bounds`: a checkpoint a request
    named (a weight update), its index's size bounded and its files confined to the directory, checked here again
    (the driver checked them; they may have changed since)."""
    path = Path(model_dir)
    mapped = index_of(path, bounds)
    if mapped is not None:
        return mapped
    files = glob_files(path, bounds)
    if not files:
        raise ValueError(f"model={str(path)!r} has no *.safetensors files: moelink loads safetensors checkpoints only.")
    index: dict[str, Path] = {}
    for f in files:
        with _open_file(f) as st:
            for name in st.keys():
                index[name] = f
    return index


class SafetensorsCheckpoint:
    """A checkpoint directory's safetensors files: tensor name → file (`checkpoint_index`), opened one file at a
    time by `open`. `text_prefix`: a multimodal checkpoint's text model lives under it ("model.language_model."
    for Qwen3.5-MoE): its tensors are named as the text model's own ("model.layers..."), the other towers' are
    not listed (ModelConfig.text_weights_prefix)."""

    def __init__(self, model_dir: str | Path, text_prefix: str = "", bounds: HeaderBounds | None = None):
        index = checkpoint_index(model_dir, bounds)
        self._real: dict[str, str] = {}  # name as the model plans it -> name in the file, where they differ
        if text_prefix:
            full, index = index, {}
            for real, f in full.items():
                name = text_model_name(real, text_prefix)
                if name is not None:
                    index[name] = f
                    if name != real:
                        self._real[name] = real
        self.index = index

    def keys(self) -> Iterable[str]:
        return self.index.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def open(self, names: Iterable[str]) -> Iterator[tuple[Any, list[str]]]:  # (a safe_open handle or _Renamed, names)
        """(safe_open handle, the names it holds) per file, each file open only while its names are read."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.index[name], []).append(name)
        for fname, group in by_file.items():
            with _open_file(fname) as st:
                yield (_Renamed(st, self._real) if self._real else st), group


class _Renamed:
    """A safe_open handle read by the text model's names (SafetensorsCheckpoint's `text_prefix`)."""

    def __init__(self, st, real: dict[str, str]):
        self._st, self._real = st, real

    def get_tensor(self, name: str):
        return self._st.get_tensor(self._real.get(name, name))

    def get_slice(self, name: str):
        return self._st.get_slice(self._real.get(name, name))


Checkpoint = SafetensorsCheckpoint | DummyCheckpoint


def open_checkpoint(cfg: ModelConfig, load_format: str, device: torch.device,
                    model_dir: str | Path | None = None, mtp_layers: int = 0) -> Checkpoint:
    """Where `cfg`'s weights come from: the safetensors files of `model_dir` (default cfg.model), or random
    tensors made on `device` (load_format "dummy", engine/rank/dummy_weights.py; with `mtp_layers` MTP modules'
    tensors too)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format={load_format!r} is invalid: choose from {', '.join(map(repr, LOAD_FORMATS))}.")
    if load_format == "dummy":
        return DummyCheckpoint.for_model(cfg, device, mtp_layers)
    return SafetensorsCheckpoint(cfg.model if model_dir is None else model_dir, cfg.text_weights_prefix)


def load_model(cfg: ModelConfig, kernels, device: torch.device, ep=None,
               progress: bool = False, load_format: str = "auto", tp: TensorParallel | None = None,
               read_bytes: dict[str, int] | None = None) -> MoEDecoderForCausalLM:
    """Build the model for `cfg.architecture` on `device` and fill every parameter from the checkpoint (random
    tensors for load_format "dummy"). tp: the rank's TensorParallel (engine/tp/group.py; None: no TP): the
    model holds, and reads, this rank's shard of each split tensor. read_bytes: filled with the bytes read per
    checkpoint tensor (tests and the TP benchmark)."""
    spec = arch_spec(cfg.architecture)
    checkpoint = open_checkpoint(cfg, load_format, device)
    names = frozenset(checkpoint.keys())  # they pick the experts' on-disk layout, which FP8 experts are built for
    model = MoEDecoderForCausalLM(cfg, spec, kernels, device, ep, names, tp=tp)
    plan = model_plan(model, cfg, names)
    check_complete(plan, checkpoint, cfg, cfg.model)
    # The MTP layers (num_nextn_predict_layers) are expected and left unread here: only the speculative drafter
    # reads them (engine/spec/proposer/mtp.py, method "mtp"). Any other tensor the plan does not list is not read.
    unread = mtp_checkpoint_names(cfg, names)
    if unread:
        logger.info("checkpoint %s: %d tensors of %d MTP layer(s) not part of the main model (read only by "
                    "speculative method 'mtp').", cfg.model, len(unread), cfg.num_nextn_predict_layers)
    ignored = [n for n in names if spec.unread_prefixes and n.startswith(spec.unread_prefixes)]
    if ignored:  # MiMo-V2-Flash's own MTP layers (model.mtp.*): a layout the engine does not build
        logger.info("checkpoint %s: %d tensors under %s not read (layers %s does not run; transformers ignores "
                    "them too).", cfg.model, len(ignored), ", ".join(spec.unread_prefixes), cfg.architecture)
    load_plan(checkpoint, plan, device, progress, read_bytes)
    model.process_weights_after_loading()
    return model.eval()


def model_plan(model: MoEDecoderForCausalLM, cfg: ModelConfig, names: frozenset[str]) -> WeightPlan:
    """The plan the loader reads `model`'s weights by from a checkpoint holding `names` (also a weight update's,
    engine/rl/weights.py): the model's own, NVFP4 / INT4 linears outside the experts dequantized as they load, and FP8
    weights of the linears moelink holds float (engine/rank/fp8_linears.py)."""
    plan = model.weight_plan(names)
    q = cfg.quantization
    if getattr(q, "method", None) == "fp8" and not q.online:  # FP8 weights of float-held linears: float at load
        plan = fp8_linear_plan(plan, names, q.block)
    if getattr(cfg.quantization, "method", None) == "nvfp4":  # NVFP4 linears outside the experts: float at load
        plan = nvfp4_linear_plan(plan, names)
    if getattr(cfg.quantization, "method", None) == "int4":  # INT4 linears outside the experts: float at load
        plan = int4_linear_plan(plan, names, cfg.quantization)
    return plan


def check_complete(plan: WeightPlan, checkpoint, cfg: ModelConfig, where: str) -> None:
    """Every tensor the plan reads is in the checkpoint, or one error naming the first missing one."""
    missing = [name for name in plan if name not in checkpoint]
    if missing:
        raise ValueError(
            f"checkpoint {where!r} is missing tensor {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f": every {cfg.architecture} weight must be present."
        )


def update_in_place(model: MoEDecoderForCausalLM, cfg: ModelConfig, model_dir: str, device: torch.device,
                    undo=None, bounds: HeaderBounds | None = None) -> int:
    """A weight update from disk (engine/rl/weights.py: the driver checked the tensors are the served ones): the
    rank's own plan over `model_dir`, written into the tensors `model` holds, one at a time (no second copy; CUDA
    graphs keep their addresses); the conversions after a load run again for the parameters written only
    (engine/models/blocks/checkpoint.py). `undo` (engine/rl/rank/rollback.UndoLog): the bytes written are saved to it
    first. `bounds`: the update's (its index bounded, its files inside `model_dir`). Returns the bytes read."""
    checkpoint = SafetensorsCheckpoint(model_dir, cfg.text_weights_prefix, bounds)
    plan = model_plan(model, cfg, frozenset(checkpoint.keys()))
    check_complete(plan, checkpoint, cfg, model_dir)
    if undo is not None:
        undo.save(plan)
    return _write_in_place(model, checkpoint, plan, device)


def update_plan(model: MoEDecoderForCausalLM, cfg: ModelConfig, names: set[str] | None) -> WeightPlan:
    """The plan entries an update of the served tensors `names` writes on this rank (None: all of them), laid out
    as the load laid them out: what its undo log saves (engine/rl/rank/rollback.py)."""
    served = frozenset(SafetensorsCheckpoint(cfg.model, cfg.text_weights_prefix).keys())
    plan = model_plan(model, cfg, served)
    return plan if names is None else {name: entry for name, entry in plan.items() if name in names}


def _write_in_place(model: MoEDecoderForCausalLM, checkpoint, plan: WeightPlan, device: torch.device) -> int:
    """A weight update's write: `plan` from `checkpoint` into the tensors `model` holds, then the after-load
    conversions of the parameters written, and only those; the bytes read."""
    read: dict[str, int] = {}
    written: set[int] = set()
    load_plan(checkpoint, plan, device, read_bytes=read, written=written)
    with torch.no_grad():
        model.process_weights_after_loading(written)
    return sum(read.values())


class TensorsCheckpoint:
    """Named tensors in memory as a checkpoint (a trainer's, engine/rl/weights.py): what the loader reads them by."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def keys(self) -> Iterable[str]:
        return self.tensors.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def open(self, names: Iterable[str]) -> Iterator[tuple["TensorsCheckpoint", list[str]]]:
        yield self, list(names)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def get_slice(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def plan_destinations(model: MoEDecoderForCausalLM, cfg: ModelConfig) -> list[torch.Tensor]:
    """The tensors an update from disk writes (the load plan's destinations): what sleep level 2 drops and the next
    update fills again (engine/rl/rank/sleep_mode.py)."""
    served = frozenset(SafetensorsCheckpoint(cfg.model, cfg.text_weights_prefix).keys())
    out = []
    for param, _, _ in model_plan(model, cfg, served).values():
        dest = getattr(param, "dest", getattr(param, "weight", param))
        if isinstance(dest, torch.Tensor):
            out.append(dest)
    return out


def update_tensors_in_place(model: MoEDecoderForCausalLM, cfg: ModelConfig, tensors: dict[str, torch.Tensor],
                            device: torch.device, undo=None) -> int:
    """A weight update from named tensors (engine/rl/weights.py checked them against the served checkpoint): each
    one this rank holds part of (its experts, its TP shard) written in place, the others left to their ranks; the
    conversions after a load run again for the parameters written only. `undo` (engine/rl/rank/rollback.UndoLog): the
    bytes written are saved to it first. Returns the bytes read."""
    plan = update_plan(model, cfg, set(tensors))  # the layout the load chose
    if undo is not None:
        undo.save(plan)
    return _write_in_place(model, TensorsCheckpoint(tensors), plan, device)


def load_plan(checkpoint: Checkpoint, plan: WeightPlan, device: torch.device, progress: bool = False,
              read_bytes: dict[str, int] | None = None, written: set[int] | None = None) -> None:
    """Fill every destination of `plan` (a weight plan or a part of one: elastic EP loads only the experts a
    survivor newly holds, engine/rank/keep_runner.py) from `checkpoint`, one tensor at a time; `read_bytes`
    (when given) gets the bytes read of each tensor; `written` (when given) the ids of the destination parameters
    (a weight update converts those only: engine/models/blocks/checkpoint.py)."""
    bar = _progress(len(plan), progress)
    with torch.no_grad():
        for st, names in checkpoint.open(plan):
            for name in names:
                param, idx, source = plan[name]
                try:
                    src = _read(st, name, source)
                except Exception as exc:  # a file gone or cut short under a weight update: say which tensor
                    raise ValueError(f"reading checkpoint tensor {name!r} failed: {type(exc).__name__}: "
                                     f"{str(exc)[:300]}") from exc
                if read_bytes is not None:
                    read_bytes[name] = src.numel() * src.element_size()
                if written is not None:
                    written.add(id(getattr(param, "dest", getattr(param, "weight", param))))
                if isinstance(param, QuantizeOnLoad):
                    _quantize_into(name, src, param, idx, device)
                elif isinstance(param, Rearranged):  # a TP rank's columns, put in the model's layout after the read
                    param.put(src, device)
                elif not isinstance(param, torch.Tensor):  # a piece rewritten as read (Part, Repack,
                    # a family's own: its `put`)
                    param.put(src, device)
                else:
                    _copy_into(name, src, param[idx] if idx else param, device)
                bar.update(1)
    bar.close()


def _check_shape(name: str, src: torch.Tensor, dest: torch.Tensor) -> None:
    if tuple(src.shape) != tuple(dest.shape):
        raise ValueError(
            f"checkpoint tensor {name!r} has shape {tuple(src.shape)}, expected {tuple(dest.shape)} from config.json."
        )


def _check_values(name: str, src: torch.Tensor) -> None:
    """A float weight holding NaN or inf would load and then answer garbage (or NaN logits) for every request."""
    if src.is_floating_point() and src.dtype != FP8_DTYPE and not torch.isfinite(src).all():  # host sync: load time
        nan = int(torch.isnan(src).sum())
        what = f"{nan} NaN value(s)" if nan else f"{int(torch.isinf(src).sum())} infinite value(s)"
        raise ValueError(f"checkpoint tensor {name!r} holds {what} of {src.numel()}: the checkpoint is corrupt.")


def _copy_into(name: str, src: torch.Tensor, dest: torch.Tensor, device) -> None:
    """FP8 values are copied as they are (a cast would turn them into wrong numbers, their scales apart);
    float tensors, scales included (float32), take the destination's dtype."""
    if src.dim() != dest.dim() and src.numel() == 1 and dest.numel() == 1:
        src = src.reshape(dest.shape)  # a per-tensor scale, stored as [] or [1] (NVFP4's weight_scale_2)
    _check_shape(name, src, dest)
    _check_values(name, src)
    if (src.dtype == FP8_DTYPE) != (dest.dtype == FP8_DTYPE):
        raise ValueError(f"checkpoint tensor {name!r} is {src.dtype}, but the model holds it as {dest.dtype}: "
                         f"FP8 weights need config.json's quantization_config (and float weights none for this module).")
    dest.copy_(src.to(device=device, dtype=dest.dtype))


def _quantize_into(name: str, src: torch.Tensor, target: QuantizeOnLoad, idx: tuple, device) -> None:
    """Online FP8 (`quantization="fp8"` on a float checkpoint): block-quantize the tensor as it is read, so
    only one float tensor is ever held beside the FP8 model. A stacked piece starts on a block boundary
    (expert_weights.scale_index), so quantizing it alone gives its own blocks in the stacked weight."""
    if src.dtype == FP8_DTYPE:
        raise ValueError(f"checkpoint tensor {name!r} is already float8_e4m3fn: quantization='fp8' quantizes a "
                         f"float checkpoint; this one needs its quantization_config in config.json.")
    dest = target.weight[idx] if idx else target.weight
    _check_shape(name, src, dest)
    _check_values(name, src)
    wq, scale = block_quantize(src.to(device=device, dtype=torch.float32), target.block)
    s_dest = target.scale[target.scale_index] if target.scale_index else target.scale
    _check_shape(name + " (its block scales)", scale, s_dest)
    dest.copy_(wq)
    s_dest.copy_(scale)


def _read(st, name: str, src_idx: tuple) -> torch.Tensor:
    """The checkpoint tensor, or the rows `src_idx` picks (slices are read alone, without the rest). Leading
    slices before an advanced index (a rank's contiguous experts, then MXFP4's gate/up row order) are read
    alone too, and the rest of the index applied to what they read: the same tensor as `full[src_idx]`."""
    if not src_idx:
        return st.get_tensor(name)
    first = src_idx[0]
    if isinstance(first, torch.Tensor) and first.dim() == 1 and len(first) and len(src_idx) == 1:
        # A row order over a contiguous range (a TP shard of MLA's de-interleaved q_b rows): read the range alone.
        lo, hi = int(first.min()), int(first.max()) + 1  # host ints of a load-time index, no device sync
        if hi - lo == len(first):
            return st.get_slice(name)[lo:hi][first - lo]
    if all(isinstance(i, slice) for i in src_idx):
        return st.get_slice(name)[src_idx]
    *lead, last = src_idx
    if all(isinstance(i, slice) for i in lead) and isinstance(last, torch.Tensor) and last.dim() == 1 and len(last):
        # Rows made of a few contiguous runs (a TP rank's gate and up rows of fused experts): each run read alone.
        runs, start = [], 0
        for k in range(1, len(last) + 1):
            if k == len(last) or int(last[k]) != int(last[k - 1]) + 1:  # host ints of a load-time index
                runs.append(slice(int(last[start]), int(last[k - 1]) + 1))
                start = k
        if len(runs) <= 8:
            sl = st.get_slice(name)
            return torch.cat([sl[tuple(lead) + (r,)] for r in runs], dim=len(lead))
    n = next(k for k, i in enumerate(src_idx) if not isinstance(i, slice))
    if n:
        return st.get_slice(name)[src_idx[:n]][(slice(None),) * n + tuple(src_idx[n:])]
    return st.get_tensor(name)[src_idx]


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="Loading weights", unit="tensor")
