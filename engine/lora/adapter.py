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
WEIGHTS_FILE = "adapter_model.safetensors"
# peft saves "base_model.model." + the module's name in the base model + ".lora_A.weight" / ".lora_B.weight".
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
# Linears LoRA is not applied to here: the experts (routed LoRA is not run yet: docs/lora.md#limits), the
# router's gate, the embedding and the LM head.
_UNSUPPORTED = re.compile(r"(\.experts\.|\.mlp\.gate$|embed_tokens|lm_head)")


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of adapter_config.json moelink runs. scale = lora_alpha / r (lora_alpha / sqrt(r) with
    use_rslora), as peft scales B A x."""

    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str
    use_rslora: bool = False
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"adapter_config.json r={self.r!r} is invalid: must be an integer >= 1.")
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool):
            raise ValueError(f"adapter_config.json lora_alpha={self.lora_alpha!r} is invalid: must be a number.")

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

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
        for field in ("modules_to_save", "target_parameters", "rank_pattern", "alpha_pattern", "layers_to_transform",
                      "trainable_token_indices", "layer_replication"):
            if raw.get(field):
                raise ValueError(f"adapter_config.json {field}={raw[field]!r} is not supported yet: moelink serves "
                                 "LoRA on the attention and dense linears (docs/lora.md#limits).")
        targets = raw.get("target_modules")
        if isinstance(targets, list):
            targets = tuple(targets)
        if not targets or not isinstance(targets, (tuple, str)):
            raise ValueError(f"adapter_config.json target_modules={targets!r} is invalid: must name the modules.")
        return cls(r=raw.get("r"), lora_alpha=raw.get("lora_alpha", 8), target_modules=targets,
                   use_rslora=bool(raw.get("use_rslora", False)),
                   base_model_name_or_path=raw.get("base_model_name_or_path"))


@dataclass
class Adapter:
    """A read adapter: its config and, per target module (the checkpoint's name, "model.layers.0.self_attn.q_proj"),
    its A [r, K] and B [N, r] on the host."""

    request: LoRARequest
    config: AdapterConfig
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]

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


def read_adapter(req: LoRARequest, limits: LoRAConfig, model_tensors: dict[str, tuple[int, int]]) -> Adapter:
    """The adapter of `req`, read and checked against the served checkpoint's target linears (`model_tensors`:
    module name → (N, K), `lora_targets`): ValueError naming the field for a missing file, a rank over the
    limit, a target module the model lacks, or tensors of another base model's shapes."""
    cfg = read_config(req, limits)
    _, weights_file = _files(req)
    names = set(model_tensors)
    if isinstance(cfg.target_modules, tuple):
        for t in cfg.target_modules:
            if not any(n == t or n.endswith("." + t) for n in names):
                raise ValueError(f"adapter {req.lora_name!r}: adapter_config.json target_modules lists {t!r}, which "
                                 f"this model has no LoRA-able linear of (it has: "
                                 f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in names}))}).")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(weights_file), "pt") as f:
        for key in f.keys():
            m = _KEY.match(key)
            if m is None:
                raise ValueError(f"adapter {req.lora_name!r}: {WEIGHTS_FILE} holds {key!r}, not a LoRA A or B "
                                 "weight of a module (target_modules, modules_to_save).")
            module = m.group("module")
            if module not in model_tensors:
                raise ValueError(f"adapter {req.lora_name!r}: target_modules reach {module!r}, which this model has "
                                 "no LoRA-able linear of (LoRA runs on attention and dense linears: docs/lora.md).")
            parts.setdefault(module, {})[m.group("ab")] = f.get_tensor(key)
    weights = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"adapter {req.lora_name!r}: {WEIGHTS_FILE} holds lora_{''.join(ab)} of {module!r} "
                             "without its pair.")
        a_RK, b_NR = ab["A"], ab["B"]
        n, k = model_tensors[module]
        if a_RK.dim() != 2 or b_NR.dim() != 2 or a_RK.shape != (cfg.r, k) or b_NR.shape != (n, cfg.r):
            raise ValueError(f"adapter {req.lora_name!r}: base_model_name_or_path={cfg.base_model_name_or_path!r} "
                             f"does not match the served model: {module!r} has A {tuple(a_RK.shape)} and B "
                             f"{tuple(b_NR.shape)}, the model's linear is [{n}, {k}] at rank r={cfg.r}.")
        weights[module] = (a_RK, b_NR)
    if not weights:
        raise ValueError(f"adapter {req.lora_name!r}: {WEIGHTS_FILE} holds no LoRA weights.")
    return Adapter(req, cfg, weights)


def lora_targets(model_dir: str) -> dict[str, tuple[int, int]]:
    """The checkpoint's linears LoRA may target: module name → (N, K), from the safetensors headers alone (the
    driver checks adapters before a rank reads them)."""
    out = {}
    for name, entry in checkpoint_tensors(model_dir).items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not name.endswith(".weight") or not isinstance(shape, list) or len(shape) != 2:
            continue
        module = name[: -len(".weight")]
        if _UNSUPPORTED.search(module) is None:
            out[module] = (int(shape[0]), int(shape[1]))
    return out
