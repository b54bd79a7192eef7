"""A peft adapter's adapter_config.json, read into a validated dataclass (`AdapterConfig`).

Why not peft's LoraConfig at run time: peft is a test dependency (the tests' oracle: they make adapters with it and
read them back with `LoraConfig.from_pretrained`), not one of the engine's; the fields moelink runs are few, so the
config is read here, every field that changes the math and is not run is refused by name rather than ignored, and
every scalar is bounded so that no value reaches a step it would overflow (issue 76). The tensors are read by
adapter.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config.lora import MAX_LORA_RANK_LIMIT
from ..contract.safe_text import shown
from .patterns import MatchBudget, PatternKey, compile_pattern

# The fused expert tensors an adapter's target_parameters may name (transformers 5's MoE experts).
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
MAX_TARGET_NAMES = 4096  # names in target_modules / target_parameters
MAX_NAME_CHARS = 512  # of one of those names (a module's full name is ~60)
# |lora_alpha / r| (peft's scaling) at most: published adapters use ~0.5 to ~64; past this the delta overflows the
# half-precision activations it is added to.
MAX_LORA_SCALE = 1e4


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v) -> bool:
    """A real number whose float is finite (an int of 400 digits is not: float() overflows)."""
    try:
        return _real(v) and math.isfinite(float(v))
    except OverflowError:
        return False


def _rank_ok(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_LORA_RANK_LIMIT


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of adapter_config.json moelink runs. scale = lora_alpha / r (lora_alpha / sqrt(r) with
    use_rslora), as peft scales B A x. Every scalar is bounded here (ranks in [1, MAX_LORA_RANK_LIMIT], alphas finite,
    every scale within MAX_LORA_SCALE): a value a step would overflow on (a float32 slot scale of 1e308) never
    reaches a rank."""

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
    # The patterns' keys compiled (engine/lora/patterns.py: matched by RE2, without backtracking).
    _rank_keys: tuple[PatternKey, ...] = field(default=(), init=False, repr=False, compare=False)
    _alpha_keys: tuple[PatternKey, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _rank_ok(self.r):
            raise ValueError(f"adapter_config.json r={shown(self.r)} is invalid: must be an integer in "
                             f"[1, {MAX_LORA_RANK_LIMIT}].")
        if not _finite(self.lora_alpha):
            raise ValueError(f"adapter_config.json lora_alpha={shown(self.lora_alpha)} is invalid: must be a finite "
                             "number.")
        _check_scale(self.lora_alpha, self.r, self.use_rslora, "lora_alpha / r")
        for key, value in self.rank_pattern:
            if not _rank_ok(value):
                raise ValueError(f"adapter_config.json rank_pattern[{shown(key)}]={shown(value)} is invalid: must be "
                                 f"an integer in [1, {MAX_LORA_RANK_LIMIT}].")
        for key, value in self.alpha_pattern:
            if not _finite(value):
                raise ValueError(f"adapter_config.json alpha_pattern[{shown(key)}]={shown(value)} is invalid: must "
                                 "be a finite number.")
        object.__setattr__(self, "_rank_keys", compile_pattern("rank_pattern", self.rank_pattern))
        object.__setattr__(self, "_alpha_keys", compile_pattern("alpha_pattern", self.alpha_pattern))

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def rank_alpha(self, target: str, budget: MatchBudget | None = None) -> tuple[int, float]:
        """(r, lora_alpha) of one target ("model.layers.1.mlp.experts.gate_up_proj"), peft's patterns first (the
        first key, in the config's order, matching a dot-delimited suffix of the target: peft's get_pattern_key).
        `budget`: the matching work left to this adapter (a fresh MAX_MATCH_STEPS when None)."""
        budget = budget if budget is not None else MatchBudget()

        def find(field, keys, pattern, default):
            budget.field = field
            for compiled, (_, value) in zip(keys, pattern):
                if compiled.matches(target, budget):
                    return value
            return default
        return (int(find("rank_pattern", self._rank_keys, self.rank_pattern, self.r)),
                float(find("alpha_pattern", self._alpha_keys, self.alpha_pattern, self.lora_alpha)))

    def target_scale(self, target: str, budget: MatchBudget | None = None) -> float:
        r, alpha = self.rank_alpha(target, budget)
        return _check_scale(alpha, r, self.use_rslora, f"the scale of {target!r} (lora_alpha / alpha_pattern over "
                                                     "r / rank_pattern)")

    @classmethod
    def from_json(cls, raw: object) -> "AdapterConfig":
        """From adapter_config.json's fields; a field that changes the math and is not run here is refused."""
        if not isinstance(raw, dict):
            raise ValueError(f"adapter_config.json is invalid: must be a JSON object (peft's LoraConfig), not "
                             f"{type(raw).__name__}.")
        if raw.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"adapter_config.json peft_type={shown(raw.get('peft_type'))} is invalid: only 'LORA' "
                             "adapters are served.")
        refused = {"use_dora": False, "bias": "none", "fan_in_fan_out": False, "lora_bias": False}
        for field_, plain in refused.items():
            if raw.get(field_, plain) not in (plain, None):
                raise ValueError(f"adapter_config.json {field_}={shown(raw[field_])} is not supported: moelink serves "
                                 f"plain LoRA ({field_}={plain!r}).")
        for field_ in ("modules_to_save", "layers_to_transform", "trainable_token_indices", "layer_replication"):
            if raw.get(field_):
                raise ValueError(f"adapter_config.json {field_}={shown(raw[field_])} is not supported yet: moelink "
                                 "serves LoRA on the attention and dense linears (docs/lora.md#limits).")
        targets = raw.get("target_modules")
        if isinstance(targets, list):
            targets = _names("target_modules", targets)
        elif isinstance(targets, str) and len(targets) > MAX_NAME_CHARS:
            raise ValueError(f"adapter_config.json target_modules={shown(targets)} is invalid: at most "
                             f"{MAX_NAME_CHARS} characters.")
        params = raw.get("target_parameters") or []
        if not isinstance(params, list):
            raise ValueError(f"adapter_config.json target_parameters={shown(params)} is invalid: must be a list of "
                             "parameter names.")
        params = _names("target_parameters", params)
        if not isinstance(targets, (tuple, str)) or not (targets or params):
            raise ValueError(f"adapter_config.json target_modules={shown(targets)} is invalid: must name the "
                             "modules.")
        bad = [p for p in params if p.rsplit(".", 1)[-1] not in EXPERT_PARAMETERS]
        if bad:
            raise ValueError(f"adapter_config.json target_parameters={shown(list(params))} is not supported: moelink "
                             f"runs per-expert LoRA on {', '.join(EXPERT_PARAMETERS)} (transformers 5's fused "
                             "experts).")
        patterns = {}
        for field_ in ("rank_pattern", "alpha_pattern"):
            value = raw.get(field_) or {}
            if not isinstance(value, dict):
                raise ValueError(f"adapter_config.json {field_}={shown(value)} is invalid: must map module patterns "
                                 "to values.")
            patterns[field_] = tuple(value.items())
        base = raw.get("base_model_name_or_path")
        return cls(r=raw.get("r"), lora_alpha=raw.get("lora_alpha", 8), target_modules=targets,
                   use_rslora=bool(raw.get("use_rslora", False)),
                   base_model_name_or_path=base if isinstance(base, str) else None, target_parameters=params,
                   rank_pattern=patterns["rank_pattern"], alpha_pattern=patterns["alpha_pattern"])


def _names(field_: str, values: list) -> tuple[str, ...]:
    """A list of module / parameter names from adapter_config.json, bounded in count and length."""
    if len(values) > MAX_TARGET_NAMES or not all(isinstance(v, str) and 0 < len(v) <= MAX_NAME_CHARS for v in values):
        raise ValueError(f"adapter_config.json {field_}={shown(values)} is invalid: must be a list of at most "
                         f"{MAX_TARGET_NAMES} names of at most {MAX_NAME_CHARS} characters.")
    return tuple(values)


def _check_scale(alpha: float, r: int, rslora: bool, what: str) -> float:
    """alpha / r (/ sqrt(r) with use_rslora), refused outside [-MAX_LORA_SCALE, MAX_LORA_SCALE]."""
    scale = float(alpha) / (math.sqrt(r) if rslora else r)
    if not math.isfinite(scale) or abs(scale) > MAX_LORA_SCALE:
        raise ValueError(f"adapter_config.json {what} is {shown(scale)}: must be within [-{MAX_LORA_SCALE:g}, "
                         f"{MAX_LORA_SCALE:g}] (peft's scaling of B A x; larger overflows the step's half-precision "
                         "arithmetic).")
    return scale
