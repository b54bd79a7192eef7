"""A peft LoRA adapter as published (adapter_config.json + adapter_model.safetensors), read and checked against
the served checkpoint before any rank holds it.

Why not peft's LoraConfig at run time: peft is a test dependency (the tests' oracle: they make adapters with it and
read them back with `LoraConfig.from_pretrained`), not one of the engine's; the fields moelink runs are few, so
adapter_config.json is read into a validated dataclass here, and every field that changes the math and is not run
is refused by name rather than ignored.

Legend: r the adapter's rank, K a target's in features, N its out features.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..config.checkpoint_headers import checkpoint_tensors
from ..config.lora import LoRAConfig
from ..contract.lora import LoRARequest

CONFIG_FILE = "adapter_config.json"
# The fused expert tensors an adapter's target_parameters may name (transformers 5's MoE experts).
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
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


def experts_name(m: re.Match) -> str:
    """The name an adapter gives the experts of an EXPERT_NAME match: transformers 5's module, which peft wraps.
    Mixtral's per-expert w1 / w3 / w2 under `block_sparse_moe` are one `mlp.experts` there (gate_up_proj = [w1; w3]
    [E, 2I, D], down_proj = w2 [E, D, I]: Qwen's layout, under another name)."""
    p = m.group("p")
    if m.group("w") in ("w1", "w3", "w2") and p.endswith(".block_sparse_moe.experts"):
        return p[: -len(".block_sparse_moe.experts")] + ".mlp.experts"
    return p


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of adapter_config.json moelink runs. scale = lora_alpha / r (lora_alpha / sqrt(r) with
    use_rslora), as peft scales B A x."""

    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str
    use_rslora: bool = False
    base_model_name_or_path: str | None = None
    # transformers 5's fused expert tensors an adapter targets (per-expert A / B: peft's ParamWrapper), and the
    # per-module rank and alpha peft writes for them (a gate_proj + up_proj target becomes gate_up_proj at 2r).
    target_parameters: tuple[str, ...] = ()
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"adapter_config.json r={self.r!r} is invalid: must be an integer >= 1.")
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool):
            raise ValueError(f"adapter_config.json lora_alpha={self.lora_alpha!r} is invalid: must be a number.")

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def rank_alpha(self, target: str) -> tuple[int, float]:
        """(r, lora_alpha) of one target ("model.layers.1.mlp.experts.gate_up_proj"), peft's patterns first (a key
        matches a target ending in it, as peft's get_pattern_key)."""
        def find(pattern, default):
            for key, value in pattern:
                if re.fullmatch(rf"(.*\.)?({key})", target):
                    return value
            return default
        return int(find(self.rank_pattern, self.r)), float(find(self.alpha_pattern, self.lora_alpha))

    def target_scale(self, target: str) -> float:
        r, alpha = self.rank_alpha(target)
        return alpha / (math.sqrt(r) if self.use_rslora else r)

    @classmethod
    def from_json(cls, raw: dict) -> "AdapterConfig":
        """From adapter_config.json's fields; a field that changes the math and is not run here is refused."""
        if raw.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"adapter_config.json peft_type={raw.get('peft_type')!r} is invalid: only 'LORA' "
                             "adapters are served.")
        refused = {"use_dora": False, "bias": "none", "fan_in_fan_out": False, "lora_bias": False}
        for field, plain in refused.items():
            if raw.get(field, plain) not in (plain, None):
                raise ValueError(f"adapter_config.json {field}={raw[field]!r} is not supported: moelink serves "
                                 f"plain LoRA ({field}={plain!r}).")
        for field in ("modules_to_save", "layers_to_transform", "trainable_token_indices", "layer_replication"):
            if raw.get(field):
                raise ValueError(f"adapter_config.json {field}={raw[field]!r} is not supported yet: moelink serves "
                                 "LoRA on the attention and dense linears (docs/lora.md#limits).")
        targets = raw.get("target_modules")
        if isinstance(targets, list):
            targets = tuple(targets)
        params = tuple(raw.get("target_parameters") or ())
        if not isinstance(targets, (tuple, str)) or not (targets or params):
            raise ValueError(f"adapter_config.json target_modules={targets!r} is invalid: must name the modules.")
        bad = [p for p in params if not isinstance(p, str) or p.rsplit(".", 1)[-1] not in EXPERT_PARAMETERS]
        if bad:
            raise ValueError(f"adapter_config.json target_parameters={list(params)!r} is not supported: moelink runs "
                             f"per-expert LoRA on {', '.join(EXPERT_PARAMETERS)} (transformers 5's fused experts).")
        patterns = {}
        for field in ("rank_pattern", "alpha_pattern"):
            value = raw.get(field) or {}
            if not isinstance(value, dict):
                raise ValueError(f"adapter_config.json {field}={value!r} is invalid: must map module patterns to "
                                 "values.")
            patterns[field] = tuple(value.items())
        return cls(r=raw.get("r"), lora_alpha=raw.get("lora_alpha", 8), target_modules=targets,
                   use_rslora=bool(raw.get("use_rslora", False)),
                   base_model_name_or_path=raw.get("base_model_name_or_path"), target_parameters=params,
                   rank_pattern=patterns["rank_pattern"], alpha_pattern=patterns["alpha_pattern"])


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
    path = Path(req.lora_path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise ValueError(f"LoRARequest.lora_path={req.lora_path!r} is invalid: it holds no {name} (a peft "
                             "adapter directory, as save_pretrained writes it).")
    return path / CONFIG_FILE, path / WEIGHTS_FILE


def read_config(req: LoRARequest, limits: LoRAConfig) -> AdapterConfig:
    cfg_file, _ = _files(req)
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"LoRARequest.lora_path={req.lora_path!r}: {CONFIG_FILE} is not readable JSON ({e}).") from e
    cfg = AdapterConfig.from_json(raw)
    if cfg.r > limits.max_lora_rank:
        raise ValueError(f"adapter {req.lora_name!r}: adapter_config.json r={cfg.r} is over max_lora_rank="
                         f"{limits.max_lora_rank}: start the engine with max_lora_rank >= {cfg.r} (--max-lora-rank).")
    return cfg


def read_adapter(req: LoRARequest, limits: LoRAConfig, model: ModelTargets, load: bool = True) -> Adapter:
    """The adapter of `req`, read and checked against the served checkpoint's targets (`model`: `model_targets`):
    ValueError naming the field for a missing file, a rank over the limit, a target module the model lacks, or
    tensors of another base model's shapes. load False: the same checks on the tensors' headers alone (meta
    tensors of their shapes: the driver's check reads no weights)."""
    cfg = read_config(req, limits)
    _, weights_file = _files(req)
    names = set(model.linears)
    if isinstance(cfg.target_modules, tuple):
        for t in cfg.target_modules:
            if not any(n == t or n.endswith("." + t) for n in names):
                raise ValueError(f"adapter {req.lora_name!r}: adapter_config.json target_modules lists {t!r}, which "
                                 f"this model has no LoRA-able linear of (it has: "
                                 f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in names}))}).")
    if cfg.target_parameters and not model.experts:
        raise ValueError(f"adapter {req.lora_name!r}: adapter_config.json target_parameters="
                         f"{list(cfg.target_parameters)!r}, but this model has no float routed experts (LoRA on "
                         "quantized experts is not run yet: docs/lora.md#limits).")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(weights_file), "pt") as f:
        for key in f.keys():
            m = _KEY.match(key)
            if m is None:
                raise ValueError(f"adapter {req.lora_name!r}: {WEIGHTS_FILE} holds {key!r}, not a LoRA A or B "
                                 "weight of a module (target_modules, modules_to_save).")
            module = m.group("module")
            if module not in model.linears and _experts_of(module) not in model.experts:
                raise ValueError(f"adapter {req.lora_name!r}: target_modules reach {module!r}, which this model has "
                                 "no LoRA-able linear of (LoRA runs on attention, dense linears and routed experts: "
                                 "docs/lora.md).")
            parts.setdefault(module, {})[m.group("ab")] = (
                f.get_tensor(key) if load else torch.empty(f.get_slice(key).get_shape(), device="meta"))
    weights, scales = {}, {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"adapter {req.lora_name!r}: {WEIGHTS_FILE} holds lora_{''.join(ab)} of {module!r} "
                             "without its pair.")
        if module in model.linears:
            name, a, b = module, ab["A"], ab["B"]
            n, k = model.linears[module]
            r = cfg.rank_alpha(name)[0]
            ok = a.dim() == 2 and b.dim() == 2 and a.shape == (r, k) and b.shape == (n, r)
            want = f"[{n}, {k}] at rank r={r}"
        else:
            name, a, b, want = _expert_factors(module, ab["A"], ab["B"], model, cfg)
            ok = name is not None
            r = a.shape[1] if ok else 0
        if not ok:
            raise ValueError(f"adapter {req.lora_name!r}: base_model_name_or_path={cfg.base_model_name_or_path!r} "
                             f"does not match the served model: {module!r} has A {tuple(ab['A'].shape)} and B "
                             f"{tuple(ab['B'].shape)}, the model's is {want}.")
        if r > limits.max_lora_rank:
            raise ValueError(f"adapter {req.lora_name!r}: {name!r} has rank {r} (adapter_config.json r / "
                             f"rank_pattern), over max_lora_rank={limits.max_lora_rank}: start the engine with "
                             f"max_lora_rank >= {r} (--max-lora-rank).")
        weights[name], scales[name] = (a, b), cfg.target_scale(name)
    if not weights:
        raise ValueError(f"adapter {req.lora_name!r}: {WEIGHTS_FILE} holds no LoRA weights.")
    return Adapter(req, cfg, weights, scales)


def _experts_of(module: str) -> str:
    """peft's module of a fused expert tensor's LoRA, nested once per targeted parameter ("...experts.base_layer"),
    as the experts' name ("...experts")."""
    while module.endswith(".base_layer"):
        module = module[: -len(".base_layer")]
    return module


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
