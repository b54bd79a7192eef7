"""`--load-format dummy`: a checkpoint of random tensors made on the device from config.json alone (vLLM's
`load_format="dummy"`), so a full-size model can be benchmarked without downloading its weights.

`DummyCheckpoint` stands where the safetensors files stand: it answers the loader's questions (`keys`, and a
handle with `get_tensor` / `get_slice`) with tensors generated on request, so engine/rank/loader.py fills the model
by its own weight plan exactly as from files: stacking, rope row orders, MXFP4's gate/up de-interleave, online
FP8 quantization (`--quantization fp8` quantizes the random float tensors) and `process_weights_after_loading`
(MLA's absorbed kv_b_proj) all run on the random tensors, and the runtime path is the one real weights take.

Which tensors, in which shapes: the names and shapes of the model's own weight plan at one rank (the model
built again on the meta device, no memory), each shape read back through the plan entry's checkpoint index
(`checkpoint_shape`): no second description of any architecture.

Values (by checkpoint name; the outputs are meaningless):
- float weights and embeddings: uniform in [-WEIGHT_RANGE, WEIGHT_RANGE]; biases, attention sinks and router
  correction biases in [-BIAS_RANGE, BIAS_RANGE] (the same for every token, they would otherwise drown what
  differs between tokens in a narrow model: each token of a 32-wide gpt-oss would get the same logits);
  norm weights: 1;
- FP8 (float8_e4m3fn) weights: uniform over the e4m3 range, with float32 `*_scale_inv` in
  [0.5, 1] * WEIGHT_RANGE / 448, so the dequantized weights are in the float range;
- MXFP4 `*_blocks`: uniform random bytes (every nibble is an e2m1 code), `*_scales`: E8M0 exponents putting the
  largest value (6 x 2^(s - 127)) between WEIGHT_RANGE / 2 and 2 x WEIGHT_RANGE;
- INT4 (compressed-tensors / GPTQ / AWQ experts): int32 words uniform (every nibble a value; zero points too),
  group scales in [0.5, 1] * WEIGHT_RANGE / 8, so a symmetric weight's largest is about WEIGHT_RANGE;
- NVFP4 (ModelOpt's experts): `weight` uniform random bytes, `weight_scale` e4m3 in [224, 448], `weight_scale_2`
  WEIGHT_RANGE / (6 x 448), so the largest value is between WEIGHT_RANGE / 2 and WEIGHT_RANGE; `input_scale` 1.
Why 0.02 and not vLLM's 1e-3: at 1e-3 every layer adds ~1e-6 to a residual of ~1e-3 (the embedding), so the
tokens are embedding x lm_head alone, every architecture of one width emits the same ones, and a check of the
experts (EP against one rank) sees nothing. 0.02 (these models' initializer_range) keeps each linear's gain at
most ~1 for fan-ins up to ~8k, behind pre-norms: on a 48-layer, hidden-2048 Qwen3-MoE shape the residual grows
from 0.01 to 0.15 in bf16, every layer counts, and nothing nears a float16 / bfloat16 limit.

Determinism: every tensor has its own generator, seeded by a stable hash of its checkpoint name, and is made
whole before the plan indexes it (as a rank reads its rows of a file): a rank under expert parallelism gets the
same expert weights the single rank gets, so an EP run gives the tokens of the one-rank run. The same device
type always makes the same values (CPU and CUDA generators differ from each other).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from moelink.kernels.fp8 import FP8_DTYPE, FP8_MAX
from moelink.kernels.mxfp4 import FP4_MAX, SCALE_BIAS
from moelink.kernels.ops import ReferenceKernels
from moelink.moe.expert_weights import QuantizeOnLoad
from moelink.moe.weight_plan import PlanEntry, Rearranged

from ..config.model import ModelConfig
from ..models.registry import MoEDecoderForCausalLM, arch_spec
from ..spec.heads import make_mtp_layer

WEIGHT_RANGE = 0.02  # float weights uniform in [-0.02, 0.02] (module docstring: why not vLLM's 1e-3)
BIAS_RANGE = 1e-3  # biases and sinks: vLLM's range
# E8M0 exponents of the MXFP4 scales: FP4_MAX * 2^(s - 127) in [WEIGHT_RANGE / 2, 2 * WEIGHT_RANGE].
_E8M0_LOW = SCALE_BIAS + math.floor(math.log2(WEIGHT_RANGE / FP4_MAX))
_E8M0_HIGH = _E8M0_LOW + 1


def tensor_seed(name: str) -> int:
    """A stable 63-bit seed for the checkpoint tensor `name` (the same in every process, unlike hash())."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 1


@dataclass(frozen=True)
class TensorSpec:
    """A checkpoint tensor's shape and dtype, as the files would hold it; an integer table of ids (DeepSeek-V4's
    hash-routing `gate.tid2eid`) also the number of ids its rows draw from (`ids`)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    ids: int | None = None


def checkpoint_shape(read_shape: tuple[int, ...], src_idx: tuple) -> tuple[int, ...]:
    """The shape of the checkpoint tensor that the plan's checkpoint index `src_idx` turns into `read_shape`, for
    the indices a one-rank plan makes: full slices, and integer tensors covering their dimension (a row order:
    MLA's rope de-interleave, gpt-oss's experts read transposed with gate/up de-interleaved). A tensor's dim is
    its largest entry + 1; the other dims are those of `read_shape` that the tensors' broadcast does not make
    (numpy's rule: it stands where the tensors stand when they are adjacent, else first)."""
    if not src_idx:
        return tuple(read_shape)
    tensors = [j for j, i in enumerate(src_idx) if isinstance(i, torch.Tensor)]
    if not tensors:
        # Slices and integers (an integer drops a dim of size >= it + 1: Qwen3-Next's conv1d.weight [C, 1, W] read as
        # [C, W], its shared_expert_gate [1, D] read as [D]).
        rest = iter(read_shape)
        shape = [i + 1 if isinstance(i, int) else next(rest) for i in src_idx] + list(rest)
        if tuple(torch.empty(shape, device="meta")[src_idx].shape) != tuple(read_shape):
            raise ValueError(f"load_format='dummy': cannot tell the checkpoint shape of a tensor read as "
                             f"{tuple(read_shape)} through its weight plan's index")
        return tuple(shape)
    bcast = torch.broadcast_shapes(*(src_idx[j].shape for j in tensors))
    at = tensors[0] if tensors == list(range(tensors[0], tensors[-1] + 1)) else 0
    rest = iter(list(read_shape[:at]) + list(read_shape[at + len(bcast):]))
    shape = [int(i.max()) + 1 if isinstance(i, torch.Tensor) else next(rest) for i in src_idx] + list(rest)
    if tuple(torch.empty(shape, device="meta")[src_idx].shape) != tuple(read_shape):
        raise ValueError(f"load_format='dummy': cannot tell the checkpoint shape of a tensor read as "
                         f"{tuple(read_shape)} through its weight plan's index")
    return tuple(shape)


def _spec(entry: PlanEntry, cfg: ModelConfig) -> TensorSpec:
    param, idx, source = entry
    if isinstance(param, torch.Tensor) and param.dtype == torch.long:  # V4's token-id -> expert table
        return TensorSpec(checkpoint_shape(tuple((param[idx] if idx else param).shape), source), param.dtype,
                          ids=cfg.num_experts)
    if isinstance(param, QuantizeOnLoad):  # online FP8: the checkpoint is float, quantized as it loads
        dest, dtype = param.weight, cfg.dtype
    elif isinstance(param, Rearranged):
        if param.source is not None:  # a tensor the plan reshapes after the read (V4's wo_a scales)
            return TensorSpec(*param.source)
        dest, dtype = param.dest, param.dest.dtype
    elif not isinstance(param, torch.Tensor):  # a piece rewritten as it loads, which states the checkpoint's own
        # (shape, dtype): INT4's Repack; V4's FP4 experts' PackedBytes, [N, K/2] e2m1 pairs or [N, K/32] E8M0 scales
        return TensorSpec(*param.source)
    else:
        dest, dtype = param, param.dtype
    read = dest[idx] if idx else dest
    return TensorSpec(checkpoint_shape(tuple(read.shape), source), dtype)


def random_tensor(name: str, spec: TensorSpec, device: torch.device) -> torch.Tensor:
    """The dummy value of checkpoint tensor `name` (module docstring), made on `device` from its own seed."""
    gen = torch.Generator(device=device)
    gen.manual_seed(tensor_seed(name))
    shape, dtype = spec.shape, spec.dtype
    if dtype == torch.uint8:  # MXFP4 / V4's FP4: E8M0 scales, or e2m1 pairs (any byte is two valid codes)
        low, high = (_E8M0_LOW, _E8M0_HIGH + 1) if name.endswith(("_scales", ".scale")) else (0, 256)
        return torch.randint(low, high, shape, dtype=dtype, device=device, generator=gen)
    if dtype == torch.int32:  # INT4 words (every nibble a valid value) and packed zero points
        return torch.randint(-(2**31), 2**31 - 1, shape, dtype=dtype, device=device, generator=gen)
    if spec.ids is not None:  # V4's hash routing: each token's k distinct experts, at random
        order = torch.rand(*shape[:-1], spec.ids, device=device, generator=gen).argsort(dim=-1)
        return order[..., : shape[-1]].to(dtype)
    if name.endswith((".weight_scale", ".scales")) and dtype != FP8_DTYPE:  # INT4 group scales: |(u - z) s| < 16 s
        x = torch.empty(shape, dtype=torch.float32, device=device).uniform_(0.5, 1.0, generator=gen)
        return x.mul_(WEIGHT_RANGE / 8).to(dtype)
    if dtype == FP8_DTYPE and name.endswith(".weight_scale"):  # NVFP4 block scales: positive, in e4m3's top octave
        x = torch.empty(shape, dtype=torch.float32, device=device).uniform_(FP8_MAX / 2, FP8_MAX, generator=gen)
        return x.to(FP8_DTYPE)
    if dtype == FP8_DTYPE:
        x = torch.empty(shape, dtype=torch.float32, device=device).uniform_(-FP8_MAX, FP8_MAX, generator=gen)
        return x.to(FP8_DTYPE)
    if name.endswith(".weight_scale_2"):  # NVFP4 global scale: 6 x 448 x it = WEIGHT_RANGE
        return torch.full(shape, WEIGHT_RANGE / (FP4_MAX * FP8_MAX), dtype=dtype, device=device)
    if name.endswith(".input_scale"):
        return torch.ones(shape, dtype=dtype, device=device)
    if name.endswith(("_scale_inv", ".scale")):  # FP8 block scales (V4's `.scale` too): positive, into float range
        x = torch.empty(shape, dtype=dtype, device=device).uniform_(0.5, 1.0, generator=gen)
        return x.mul_(WEIGHT_RANGE / FP8_MAX)
    if name.removesuffix(".weight").endswith("norm"):  # RMSNorm weights (layernorm, q_norm, kv_a_layernorm, ...)
        return torch.ones(shape, dtype=dtype, device=device)
    r = BIAS_RANGE if name.endswith(("bias", "sinks", "attn_sink")) else WEIGHT_RANGE
    return torch.empty(shape, dtype=dtype, device=device).uniform_(-r, r, generator=gen)


class DummyCheckpoint:
    """Random tensors under the names and shapes of the model's one-rank weight plan, behind the interface the
    loader reads a checkpoint through (engine/rank/loader.py: `keys`, `in`, `open`; the handle's `get_tensor` /
    `get_slice`). Nothing is held: each tensor is made when the loader asks for it."""

    def __init__(self, specs: dict[str, TensorSpec], device: torch.device):
        self.specs, self.device = specs, torch.device(device)

    @classmethod
    def for_model(cls, cfg: ModelConfig, device: torch.device, mtp_layers: int = 0) -> "DummyCheckpoint":
        """Every tensor a checkpoint of `cfg` holds (per-expert layout where the architecture has one), from the
        plan of the model built at one rank on the meta device; with `mtp_layers`, the first MTP modules' too
        (engine/spec/heads/mtp.py; sharing the main embedding and head, as a checkpoint without copies does)."""
        meta, spec = torch.device("meta"), arch_spec(cfg.architecture)
        shapes_only = MoEDecoderForCausalLM(cfg, spec, ReferenceKernels(), meta)
        plan = shapes_only.weight_plan(None)
        for i in range(mtp_layers):
            plan.update(make_mtp_layer(cfg, spec, i, ReferenceKernels(), meta, embed_tokens=shapes_only.embed_tokens,
                                       lm_head=shapes_only.lm_head).weight_plan(None))
        specs = {name: _spec(entry, cfg) for name, entry in plan.items()}
        return cls(specs, device)

    def keys(self) -> Iterable[str]:
        return self.specs.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.specs

    def open(self, names: Iterable[str]) -> Iterator[tuple["DummyCheckpoint", list[str]]]:
        """One group: every tensor comes from this object (the files' loader opens one handle per file)."""
        yield self, list(names)

    def get_tensor(self, name: str) -> torch.Tensor:
        return random_tensor(name, self.specs[name], self.device)

    def get_slice(self, name: str) -> torch.Tensor:
        # Made whole, then indexed by the caller: a rank's rows are the rows a single rank would read.
        return self.get_tensor(name)


__all__ = ["BIAS_RANGE", "DummyCheckpoint", "TensorSpec", "WEIGHT_RANGE", "checkpoint_shape", "random_tensor",
           "tensor_seed"]
