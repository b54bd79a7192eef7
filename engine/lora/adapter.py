"""A peft LoRA adapter as published (adapter_config.json + adapter_model.safetensors), read and checked against
the served checkpoint before any rank holds it: its config (adapter_config.py's `AdapterConfig`) and its tensors,
every value finite and bounded, read within bounds on what the files may make the check read and hold.

Legend: r the adapter's rank, K a target's in features, N its out features.
"""
from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..config.checkpoint_headers import checkpoint_tensors, read_header
from ..config.lora import LoRAConfig
from ..contract.lora import LoRARequest
from ..contract.safe_text import shown
from .adapter_config import EXPERT_PARAMETERS, MAX_NAME_CHARS, AdapterConfig
from .patterns import MatchBudget

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# peft saves "base_model.model." + the module's name in the base model + ".lora_A.weight" / ".lora_B.weight".
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
# Linears that are not LoRA targets as linears: the experts (their tensors are targets of their own:
# target_parameters), the router's gate, the embedding, the LM head, and MLA's kv_b_proj (absorbed into the query
# and the output, never applied to activations: docs/lora.md#limits).
_UNSUPPORTED = re.compile(r"(\.experts\.|\.mlp\.gate$|embed_tokens|lm_head|kv_b_proj$)")
# The weights LoRA runs beside: a float linear or an FP8 block-scaled one (the delta is float matmuls on its input);
# routed experts float only (the experts' LoRA path runs float GEMMs: docs/lora.md#limits).
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_LINEAR_DTYPES = _FLOAT_DTYPES + ("F8_E4M3",)
EXPERT_NAME = re.compile(r"^(?P<p>.+\.experts)\.(?:(?P<e>\d+)\.(?P<w>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight|"
                     r"(?P<fused>gate_up_proj|down_proj))$")
_DOWN = ("down_proj", "w2")  # a per-expert down projection's name: Qwen's, Mixtral's
# Bounds on what an adapter's files may make the check read and hold (a published adapter is far inside each).
MAX_CONFIG_BYTES = 4 << 20  # adapter_config.json (peft's EVA writes a rank_pattern key per module)
MAX_HEADER_BYTES = 16 << 20  # adapter_model.safetensors' JSON header (~150 bytes a tensor)
# |value| of an A or B tensor at most: float16's largest finite value, so its cast to any served dtype is finite.
MAX_WEIGHT_ABS = 65504.0


# vLLM's packed modules: one runtime linear holding several checkpoint linears (vLLM's packed_modules_mapping), whose
# names --lora-target-modules may give for their pieces, and the pieces' for them.
PACKED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj"),
                  "fused_qkv_a_proj": ("q_a_proj", "kv_a_proj_with_mqa")}


def in_target_modules(module: str, targets: tuple[str, ...] | None) -> bool:
    """Whether LoRA runs on `module` (a checkpoint linear's name, or an MoE layer's experts "...mlp.experts") under
    --lora-target-modules `targets`: vLLM's is_in_target_modules. None: every module; else its name or its last part
    is listed, or a packed module holding it (`qkv_proj` for q_proj), or one of the pieces a packed name holds."""
    if targets is None:
        return True
    suffix = module.rsplit(".", 1)[-1]
    if suffix in targets or module in targets:
        return True
    if any(child in targets for child in PACKED_MODULES.get(suffix, ())):
        return True
    return any(suffix in children and parent in targets for parent, children in PACKED_MODULES.items())


def check_target_modules(targets: tuple[str, ...] | None, model: "ModelTargets") -> None:
    """Each --lora-target-modules entry names a LoRA-able module of the served model (a name there that matches
    nothing is a typo: refused naming it, where vLLM would run LoRA on nothing)."""
    if targets is None:
        return
    modules = list(model.linears) + list(model.experts)
    for t in targets:
        if not any(in_target_modules(m, (t,)) for m in modules):
            names = sorted({m.rsplit(".", 1)[-1] for m in modules})
            raise ValueError(f"lora_target_modules lists {shown(t)}, which names no LoRA-able module of this model "
                             f"(it has: {', '.join(names)}; vLLM's packed names {', '.join(PACKED_MODULES)} too).")


def experts_name(m: re.Match) -> str:
    """The name an adapter gives the experts of an EXPERT_NAME match: transformers 5's module, which peft wraps.
    Mixtral's per-expert w1 / w3 / w2 under `block_sparse_moe` are one `mlp.experts` there (gate_up_proj = [w1; w3]
    [E, 2I, D], down_proj = w2 [E, D, I]: Qwen's layout, under another name)."""
    p = m.group("p")
    if m.group("w") in ("w1", "w3", "w2") and p.endswith(".block_sparse_moe.experts"):
        return p[: -len(".block_sparse_moe.experts")] + ".mlp.experts"
    return p


@dataclass(frozen=True)
class ModelTargets:
    """What of the served model an adapter may target: `linears`, module name → (N, K) (the attention and dense
    linears); `experts`, an MoE layer's experts ("model.layers.1.mlp.experts") → (E, D, I)."""

    linears: dict[str, tuple[int, int]]
    experts: dict[str, tuple[int, int, int]]
    # Experts held as gpt-oss holds them (gate_up_proj [E, D, 2I] with gate and up interleaved on the last dim,
    # down_proj [E, I, D]): an adapter's gate_up B rows are read in the load's de-interleaving order.
    interleaved: frozenset[str] = frozenset()


@dataclass
class Adapter:
    """A read adapter: its config; per target linear (the checkpoint's module name) its A [r, K] and B [N, r]; per
    target expert tensor ("model.layers.1.mlp.experts.gate_up_proj") its per-expert A [E, r, K] and B [E, N, r];
    each target's scale."""

    request: LoRARequest
    config: AdapterConfig
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scales: dict[str, float]

    @property
    def scale(self) -> float:
        return self.config.scale


def _files(req: LoRARequest) -> tuple[Path, Path]:
    """The adapter's two files. One error for every way a path is not an adapter's (missing, not a directory,
    unreadable, a file missing or not a regular file): the answer must not tell a client which directories exist."""
    path = req.lora_path
    files = []
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            st = os.stat(os.path.join(path, name))
            ok = stat.S_ISREG(st.st_mode) and os.access(os.path.join(path, name), os.R_OK)
        except (OSError, ValueError):  # ENOENT, EACCES, ENAMETOOLONG, ...; a NUL byte
            ok = False
        if not ok:
            raise ValueError(f"LoRARequest.lora_path={shown(path)} is invalid: not a readable peft adapter directory "
                             f"(one holding {CONFIG_FILE} and {WEIGHTS_FILE}, as save_pretrained writes them).")
        files.append(Path(path) / name)
    return files[0], files[1]


def read_config(req: LoRARequest, limits: LoRAConfig) -> AdapterConfig:
    cfg_file, _ = _files(req)
    try:
        with open(cfg_file, "rb") as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
    except OSError:
        raise ValueError(f"LoRARequest.lora_path={shown(req.lora_path)} is invalid: not a readable peft adapter "
                         f"directory (one holding {CONFIG_FILE} and {WEIGHTS_FILE}).") from None
    if len(text) > MAX_CONFIG_BYTES:
        raise ValueError(f"adapter {shown(req.lora_name)}: {CONFIG_FILE} is over {MAX_CONFIG_BYTES} bytes.")
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: JSON nested past the parser's depth
        why = "nested too deeply" if isinstance(e, RecursionError) else shown(str(e), quote=False)
        raise ValueError(f"adapter {shown(req.lora_name)}: {CONFIG_FILE} is not readable JSON ({why}).") from None
    cfg = AdapterConfig.from_json(raw)
    if cfg.r > limits.max_lora_rank:
        raise ValueError(f"adapter {shown(req.lora_name)}: adapter_config.json r={cfg.r} is over max_lora_rank="
                         f"{limits.max_lora_rank}: start the engine with max_lora_rank >= {cfg.r} (--max-lora-rank).")
    return cfg


def _weights_header(req: LoRARequest, weights_file: Path, model: ModelTargets) -> dict:
    """adapter_model.safetensors' header, checked before safetensors opens the file: bounded (MAX_HEADER_BYTES, at
    most as many tensors as the model has LoRA targets' A and B), every tensor's bytes inside the file (a file cut
    short is refused here, not in safetensors' reader), every tensor a float."""
    name = shown(req.lora_name)
    try:
        with open(weights_file, "rb") as f:
            raw = f.read(8)
    except OSError:
        raise ValueError(f"LoRARequest.lora_path={shown(req.lora_path)} is invalid: not a readable peft adapter "
                         f"directory (one holding {CONFIG_FILE} and {WEIGHTS_FILE}).") from None
    if len(raw) == 8 and struct.unpack("<Q", raw)[0] > MAX_HEADER_BYTES:
        raise ValueError(f"adapter {name}: {WEIGHTS_FILE}'s header is over {MAX_HEADER_BYTES} bytes.")
    try:
        header = read_header(weights_file)
    except ValueError as e:  # names the file: truncated, not safetensors, a header that is not JSON
        raise ValueError(f"adapter {name}: {WEIGHTS_FILE} is not a whole safetensors file "
                         f"({shown(str(e).split(': ', 1)[-1], quote=False)})") from None
    most = 2 * len(model.linears) + 8 * len(model.experts)  # A and B per target (experts nested per parameter)
    if len(header) > most:
        raise ValueError(f"adapter {name}: {WEIGHTS_FILE} holds {len(header)} tensors; this model has LoRA targets "
                         f"for at most {most}.")
    for key, entry in header.items():
        if len(key) > MAX_NAME_CHARS:
            raise ValueError(f"adapter {name}: {WEIGHTS_FILE} tensor {shown(key)} has a name over {MAX_NAME_CHARS} "
                             "characters: no module of this model has one.")
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"adapter {name}: {WEIGHTS_FILE} tensor {shown(key)} is {shown(dtype)}: LoRA weights "
                             f"are floats ({', '.join(_FLOAT_DTYPES)}).")
    return header


def _check_values(req: LoRARequest, key: str, t: torch.Tensor) -> None:
    """An A or B tensor's values: every one finite and within MAX_WEIGHT_ABS. One NaN in a B would make every row of
    its adapter NaN, and a value past float16's range an inf once cast to the served dtype."""
    if t.numel() == 0:
        return
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"adapter {shown(req.lora_name)}: {WEIGHTS_FILE} tensor {shown(key)} holds a non-finite "
                         "value (NaN or inf): refused.")
    if float(t.abs().max()) > MAX_WEIGHT_ABS:
        raise ValueError(f"adapter {shown(req.lora_name)}: {WEIGHTS_FILE} tensor {shown(key)} holds a value over "
                         f"{MAX_WEIGHT_ABS:g} in magnitude (float16's range): refused.")


def read_adapter(req: LoRARequest, limits: LoRAConfig, model: ModelTargets, load: bool = True) -> Adapter:
    """The adapter of `req`, read and checked against the served checkpoint's targets (`model`: `model_targets`):
    ValueError naming the field for a missing file, a rank over the limit, a target module the model lacks, or
    tensors of another base model's shapes, a value that is not finite or past MAX_WEIGHT_ABS, a file cut short.
    load False: the same checks, each tensor's values read for them and dropped (meta tensors of their shapes are
    returned: the driver's check keeps no weights). Only ValueError for anything in the adapter's files."""
    cfg = read_config(req, limits)
    _, weights_file = _files(req)
    header = _weights_header(req, weights_file, model)
    budget = MatchBudget()  # all of this adapter's pattern matching (engine/lora/patterns.py)
    names = set(model.linears)
    if isinstance(cfg.target_modules, tuple):
        # Every dot-delimited suffix of the model's linears ("q_proj", "self_attn.q_proj", ...): a target is one.
        suffixes = {n.split(".", i)[-1] for n in names for i in range(n.count(".") + 1)}
        for t in cfg.target_modules:
            if t not in suffixes:
                raise ValueError(f"adapter {shown(req.lora_name)}: adapter_config.json target_modules lists "
                                 f"{shown(t)}, which this model has no LoRA-able linear of (it has: "
                                 f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in names}))}).")
    if cfg.target_parameters and not model.experts:
        raise ValueError(f"adapter {shown(req.lora_name)}: adapter_config.json target_parameters="
                         f"{shown(list(cfg.target_parameters))}, but this model has no float routed experts (LoRA on "
                         "quantized experts is not run yet: docs/lora.md#limits).")
    keys: dict[str, tuple[str, str]] = {}  # safetensors key -> (module, "A" / "B")
    for key in header:  # names first: nothing is read of an adapter for another model
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"adapter {shown(req.lora_name)}: {WEIGHTS_FILE} holds {shown(key)}, not a LoRA A or B "
                             "weight of a module (target_modules, modules_to_save).")
        module = m.group("module")
        if module not in model.linears and _experts_of(module) not in model.experts:
            raise ValueError(f"adapter {shown(req.lora_name)}: target_modules reach {shown(module)}, which this "
                             "model has no LoRA-able linear of (LoRA runs on attention, dense linears and routed "
                             "experts: docs/lora.md).")
        keys[key] = (module, m.group("ab"))
    # Shapes next, from the header (meta tensors): nothing is read of an adapter of another model's shapes.
    meta: dict[str, dict[str, torch.Tensor]] = {}
    for key, (module, ab) in keys.items():
        meta.setdefault(module, {})[ab] = torch.empty(header[key]["shape"], device="meta")
    weights, scales = _assemble(req, cfg, meta, limits, model, budget)
    # Then the values, one tensor at a time: each finite and bounded (_check_values); kept only with `load`.
    parts: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights_file), "pt") as f:
            for key, (module, ab) in keys.items():
                t = f.get_tensor(key)
                _check_values(req, key, t)
                if load:
                    parts.setdefault(module, {})[ab] = t
                del t
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001  (safetensors' own error for a file it cannot read: changed meanwhile)
        raise ValueError(f"adapter {shown(req.lora_name)}: {WEIGHTS_FILE} could not be read "
                         f"({type(e).__name__}).") from None
    if load:
        weights, scales = _assemble(req, cfg, parts, limits, model, budget)
    return Adapter(req, cfg, *_kept(req, weights, scales, limits, model))


def _kept(req: LoRARequest, weights: dict, scales: dict, limits: LoRAConfig, model: ModelTargets
          ) -> tuple[dict, dict]:
    """The targets LoRA runs on under --lora-target-modules (`limits.target_modules`): the adapter's others are
    skipped, as vLLM wraps only the listed modules; an adapter left with none is refused (it would change
    nothing: never served as if it applied)."""
    targets = limits.target_modules
    if targets is None:
        return weights, scales
    keep = [n for n in weights if in_target_modules(n.rsplit(".", 1)[0] if n.rsplit(".", 1)[0] in model.experts
                                                    else n, targets)]
    if not keep:
        raise ValueError(f"adapter {shown(req.lora_name)}: none of its targets ({shown(sorted(weights))}) is among "
                         f"--lora-target-modules {shown(list(targets))}: it would change nothing.")
    return {n: weights[n] for n in keep}, {n: scales[n] for n in keep}


def _assemble(req: LoRARequest, cfg: AdapterConfig, parts: dict[str, dict[str, torch.Tensor]], limits: LoRAConfig,
              model: ModelTargets, budget: MatchBudget) -> tuple[dict, dict[str, float]]:
    """Each target's (A, B) and scale from the file's tensors by module (`read_adapter`'s), checked against the
    model's shapes and the rank limit."""
    weights, scales = {}, {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"adapter {shown(req.lora_name)}: {WEIGHTS_FILE} holds lora_{''.join(ab)} of "
                             f"{shown(module)} without its pair.")
        if module in model.linears:
            name, a, b = module, ab["A"], ab["B"]
            n, k = model.linears[module]
            r = cfg.rank_alpha(name, budget)[0]
            ok = a.dim() == 2 and b.dim() == 2 and a.shape == (r, k) and b.shape == (n, r)
            want = f"[{n}, {k}] at rank r={r}"
        else:
            name, a, b, want = _expert_factors(module, ab["A"], ab["B"], model, cfg)
            ok = name is not None
            r = a.shape[1] if ok else 0
        if not ok:
            raise ValueError(f"adapter {shown(req.lora_name)}: base_model_name_or_path="
                             f"{shown(cfg.base_model_name_or_path)} does not match the served model: {shown(module)} "
                             f"has A {tuple(ab['A'].shape)} and B {tuple(ab['B'].shape)}, the model's is {want}.")
        if r > limits.max_lora_rank:
            raise ValueError(f"adapter {shown(req.lora_name)}: {name!r} has rank {r} (adapter_config.json r / "
                             f"rank_pattern), over max_lora_rank={limits.max_lora_rank}: start the engine with "
                             f"max_lora_rank >= {r} (--max-lora-rank).")
        weights[name], scales[name] = (a, b), cfg.target_scale(name, budget)
    if not weights:
        raise ValueError(f"adapter {shown(req.lora_name)}: {WEIGHTS_FILE} holds no LoRA weights.")
    return weights, scales


def _experts_of(module: str) -> str:
    """peft's module of a fused expert tensor's LoRA, nested once per targeted parameter ("...experts.base_layer"),
    as the experts' name ("...experts")."""
    end = len(module)
    while module.endswith(".base_layer", 0, end):  # an index, not a copy per level: linear in the name
        end -= len(".base_layer")
    return module[:end]


def _expert_factors(module: str, a: torch.Tensor, b: torch.Tensor, model: ModelTargets, cfg: AdapterConfig):
    """peft's ParamWrapper factors of one fused expert tensor as (target name, A [E, r, K], B [E, N, r], what the
    model holds): A is [r E, K] (expert e's rows e r .. e r + r), B [N, r E] (expert e's columns r_i E + e). Which
    tensor it is, gate_up_proj or down_proj, its shapes say (the nesting order is peft's). ParamWrapper's in / out
    are the tensor's last two dims as transformers holds them: Qwen's [E, 2I, D] / [E, D, I] are out, in (peft
    swaps them), gpt-oss's `is_transposed` [E, D, 2I] / [E, I, D] in, out; either way K is the input's width and N
    the output's, so A and B are the same shapes. gpt-oss's gate_up output interleaves gate and up (2i gate, 2i + 1
    up): B's rows are read in the load's order [gate; up] (moe/expert_weights.py gate_up_order), as w13's are."""
    experts = _experts_of(module)
    E, D, I = model.experts[experts]
    held = (f"gate_up_proj [{E}, {D}, {2 * I}] or down_proj [{E}, {I}, {D}]" if experts in model.interleaved else
            f"gate_up_proj [{E}, {2 * I}, {D}] or down_proj [{E}, {D}, {I}]")
    want = f"{held} with A [r * {E}, in], B [out, r * {E}]"
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] % E:
        return None, a, b, want
    r = a.shape[0] // E
    for param, (n, k) in (("gate_up_proj", (2 * I, D)), ("down_proj", (D, I))):
        if a.shape[1] == k and b.shape[0] == n and any(t.rsplit(".", 1)[-1] == param for t in cfg.target_parameters):
            a_ERK = a.reshape(E, r, k)
            if param == "gate_up_proj" and experts in model.interleaved:
                b = b.index_select(0, torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2)]))
            b_ENR = b.reshape(n, r, E).permute(2, 0, 1).contiguous()
            return f"{experts}.{param}", a_ERK, b_ENR, want
    return None, a, b, want


def model_targets(model_dir: str) -> ModelTargets:
    """The checkpoint's targets, from its safetensors headers alone (the driver checks adapters before a rank reads
    them): `lora_targets`' linears, and each MoE layer's experts, per-expert or fused on disk."""
    tensors = checkpoint_tensors(model_dir)
    experts: dict[str, dict] = {}
    for name, entry in tensors.items():
        m = EXPERT_NAME.match(name)
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if m is None or not isinstance(shape, list) or entry.get("dtype") not in _FLOAT_DTYPES:
            continue
        seen = experts.setdefault(experts_name(m), {"ids": set()})
        if m.group("fused") in ("down_proj", "gate_up_proj") and len(shape) == 3:
            seen[m.group("fused")] = tuple(int(n) for n in shape)
        elif m.group("w") in _DOWN and len(shape) == 2:  # [D, I] per expert
            seen["ids"].add(int(m.group("e")))
            seen["di"] = (shape[0], shape[1])
    dims, interleaved = {}, set()
    for p, v in experts.items():
        if "down_proj" in v:
            E, d1, d2 = v["down_proj"]
            # gpt-oss's gate_up_proj [E, D, 2I] beside down_proj [E, I, D] (a Qwen-style [E, 2I, D] beside
            # [E, D, I] never matches: it would need I = 2I).
            if v.get("gate_up_proj", (0, 0, 0))[1:] == (d2, 2 * d1):
                dims[p] = (E, d2, d1)
                interleaved.add(p)
            else:
                dims[p] = (E, d1, d2)
        elif "di" in v:
            dims[p] = (len(v["ids"]), *v["di"])
    return ModelTargets(lora_targets(model_dir, tensors), dims, frozenset(interleaved))


def lora_targets(model_dir: str, tensors: dict | None = None) -> dict[str, tuple[int, int]]:
    """The checkpoint's linears LoRA may target: module name → (N, K), from the safetensors headers alone."""
    out = {}
    for name, entry in (tensors if tensors is not None else checkpoint_tensors(model_dir)).items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not name.endswith(".weight") or not isinstance(shape, list) or len(shape) != 2 or \
                entry.get("dtype") not in _LINEAR_DTYPES:
            continue
        module = name[: -len(".weight")]
        if _UNSUPPORTED.search(module) is None:
            out[module] = (int(shape[0]), int(shape[1]))
    return out
