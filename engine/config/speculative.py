"""SpeculativeConfig: which drafter proposes tokens and how many, as vLLM's `--speculative-config` names them.

    --speculative-config '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}'
    --speculative-config '{"method": "mtp", "num_speculative_tokens": 2}'
    --speculative-config '{"method": "eagle3", "model": "/path/to/eagle3-head", "num_speculative_tokens": 3}'
    --speculative-config '{"method": "dspark", "num_speculative_tokens": 5}'
    --speculative-config '{"method": "dspark", "model": "/path/to/dspark-draft", "num_speculative_tokens": 7}'

Methods: "ngram" (prompt lookup: no weights), "mtp" (the checkpoint's own next-n layers, DeepSeek-V3/R1, GLM-4.5,
Kimi K2, or MTP module, Qwen3-Next and Qwen3.5-MoE; "deepseek_mtp" is accepted as vLLM's older name), "eagle3" (a
separate EAGLE-3 head checkpoint), "dspark" (DSpark's block-drafting layers with a Markov head,
engine/config/dspark.py: the ones the served checkpoint bundles, DeepSeek-V4 / V4.1's dspark_* fields, or a
DFlash-format draft checkpoint named by `model`; k is the block width). Every
key is checked here, where the config is made: an unknown key, a wrong type or a value out of range is one
ValueError naming the key and what is allowed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Callable, Optional

from moelink.scheduler.config import SchedulerConfig

if TYPE_CHECKING:  # typing only (tests/test_layering.py TYPING_SEAMS)
    from ..contract.spec_decoding import HostDrafter

from .architectures import REGISTRY
from .dspark import bundles_dspark, read_bundled_dspark, read_dspark_draft
from .eagle3 import check_eagle3_target, read_eagle3_config
from .model_source import resolve_model_dir

METHODS = ("ngram", "mtp", "eagle3", "dspark")
_ALIASES = {"deepseek_mtp": "mtp"}
# The most tokens one step may draft per request: each costs a verified query row and a KV slot.
MAX_SPECULATIVE_TOKENS = 8


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    # ngram: the longest and shortest suffix n-gram looked up in the request's own tokens.
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    # eagle3: the head's checkpoint directory (or a Hugging Face repo id); dspark: a DFlash-format draft's (None:
    # the stages the served checkpoint bundles).
    model: Optional[str] = None
    # The Python API only (tests, benchmarks): a callable returning a HostDrafter (engine/contract/spec_decoding.py)
    # used instead of the method's own; picklable when the ranks are Ray workers.
    drafter_factory: Optional[Callable[[], HostDrafter]] = None
    # How much verify work drafts may cost (the scheduler's, scheduler/draft_control.py; SchedulerConfig.spec_*):
    # a request verifies its i-th draft only while its estimated per-draft acceptance p has p**i >=
    # min_draft_acceptance (0: every draft), so drafts that keep failing stop costing everyone a verify row each;
    # a step's drafts take at most max_verify_fraction of its token budget; a request at draft length 0 tries one
    # draft again after draft_probe_interval steps (doubling while it fails).
    min_draft_acceptance: float = SchedulerConfig.spec_min_draft_acceptance
    max_verify_fraction: float = SchedulerConfig.spec_max_verify_fraction
    draft_probe_interval: int = SchedulerConfig.spec_probe_interval

    def __post_init__(self) -> None:
        method = _ALIASES.get(self.method, self.method)
        if method not in METHODS:
            raise ValueError(f"speculative_config.method={self.method!r} is invalid: choose from "
                             f"{', '.join(METHODS)}.")
        object.__setattr__(self, "method", method)
        _int_in("num_speculative_tokens", self.num_speculative_tokens, 1, MAX_SPECULATIVE_TOKENS)
        _int_in("prompt_lookup_max", self.prompt_lookup_max, 1, 64)
        _int_in("prompt_lookup_min", self.prompt_lookup_min, 1, self.prompt_lookup_max)
        _int_in("draft_probe_interval", self.draft_probe_interval, 1, 1 << 20)
        _number_in("min_draft_acceptance", self.min_draft_acceptance, "[0, 1) (0: verify every draft)",
                   lambda v: 0 <= v < 1)
        _number_in("max_verify_fraction", self.max_verify_fraction, "(0, 1]", lambda v: 0 < v <= 1)
        if self.drafter_factory is not None and not callable(self.drafter_factory):
            raise ValueError(f"speculative_config.drafter_factory={self.drafter_factory!r} is invalid: must be a "
                             "callable returning a drafter (Python API only).")
        if method == "eagle3":
            if not isinstance(self.model, str) or not self.model:
                raise ValueError("speculative_config.model is required for method 'eagle3': the EAGLE-3 head's "
                                 "checkpoint directory or Hugging Face repo id.")
        elif self.model is not None and (method != "dspark" or not isinstance(self.model, str) or not self.model):
            raise ValueError(f"speculative_config.model={self.model!r} is invalid for method {method!r}: it names a "
                             "draft checkpoint directory for 'eagle3' or 'dspark' only; 'ngram' needs no weights and "
                             "'mtp' reads the served checkpoint's own layers.")

    @property
    def runs_mtp(self) -> bool:
        """Whether the ranks run the checkpoint's MTP layer (engine/spec/proposer/mtp.py): method "mtp" without a
        drafter_factory in its place."""
        return self.method == "mtp" and self.drafter_factory is None

    @property
    def runs_eagle3(self) -> bool:
        """Whether the ranks run an EAGLE-3 head (engine/spec/proposer/eagle3.py): method "eagle3" without a
        drafter_factory in its place."""
        return self.method == "eagle3" and self.drafter_factory is None

    @property
    def runs_dspark(self) -> bool:
        """Whether the ranks run DSpark draft layers (engine/spec/proposer/dspark.py): method "dspark" without a
        drafter_factory in its place."""
        return self.method == "dspark" and self.drafter_factory is None

    @property
    def runs_on_device(self) -> bool:
        """Whether the drafter drafts in the step's device work (a layer of weights: MTP, an EAGLE-3 head, DSpark)."""
        return self.runs_mtp or self.runs_eagle3 or self.runs_dspark

    def draft_kv_bytes_per_token(self, model_cfg) -> int:
        """What one token stores in the drafter's KV cache layer beside the model's, on the same block ids (KV
        sizing counts it): the MTP layer's is a main layer's; an EAGLE-3 head's is its own GQA shape (its
        config.json) in the main cache's dtype; host drafters keep none. `model` must be resolved already
        (`resolve_draft_model`)."""
        if self.runs_mtp:
            return model_cfg.attention.kv_bytes_per_token(model_cfg.cache_dtype)
        if self.runs_eagle3:
            return read_eagle3_config(self.model).attention.kv_bytes_per_token(model_cfg.cache_dtype)
        if self.runs_dspark and self.model is not None:  # each stage keeps [2, K, H] a token, in the model dtype
            _, g = read_dspark_draft(self.model)
            return g.num_layers * 2 * g.num_kv_heads * g.head_dim * model_cfg.dtype.itemsize
        if self.runs_dspark:  # DeepSeek's bundled stages: one shared KV head (MQA) of head_dim values a token each
            raw = model_cfg.hf_config.get("text_config") or model_cfg.hf_config
            stages = read_bundled_dspark(model_cfg.hf_config).num_stages
            return stages * int(raw.get("head_dim") or model_cfg.hidden_size) * model_cfg.dtype.itemsize
        return 0

    def check_model(self, num_nextn_predict_layers: int, architecture: str, hf_config: dict | None = None) -> None:
        """Refuse method "mtp" for a checkpoint without MTP layers (config.json's num_nextn_predict_layers), or for
        an architecture whose published MTP module moelink cannot build faithfully (Architecture.mtp_refused)."""
        refused = REGISTRY[architecture].mtp_refused if architecture in REGISTRY else ""
        if self.runs_mtp and refused:
            raise ValueError(f"speculative_config.method='mtp' is not supported for {architecture}: {refused} "
                             "Use method 'ngram' (or 'eagle3' with a head trained for it).")
        if self.runs_dspark and self.model is None and not bundles_dspark(hf_config or {}):
            raise ValueError(f"speculative_config.method='dspark' needs speculative_config.model (a DSpark draft "
                             f"checkpoint) for {architecture}: its config.json carries no dspark_* fields (the "
                             "draft layers DeepSeek-V4 / V4.1 bundle).")
        if self.runs_dspark and self.model is None:
            read_bundled_dspark(hf_config or {})  # its fields validated before anything is sized
        if self.runs_mtp and bundles_dspark(hf_config or {}):
            raise ValueError(f"speculative_config.method='mtp' is invalid for this checkpoint: its next-n layers "
                             f"(mtp.*) are DSpark stages ({architecture}'s config.json has dspark_* fields), not MTP "
                             "modules; use method 'dspark'.")
        if self.runs_mtp and num_nextn_predict_layers < 1:
            raise ValueError(f"speculative_config.method='mtp' is invalid for this checkpoint: its config.json has "
                             f"num_nextn_predict_layers={num_nextn_predict_layers} ({architecture}: no MTP layers to "
                             "draft with; Qwen3-Next / Qwen3.5 name it mtp_num_hidden_layers); use 'ngram', or a "
                             "checkpoint that ships them (DeepSeek-V3/R1, GLM-4.5, Qwen3-Next, Qwen3.5-MoE).")

    def resolve_draft_model(self, model_cfg, download_dir: str | None = None,
                            weights: bool = True) -> "SpeculativeConfig":
        """Method "eagle3": this config with `model` the head's local directory (a Hugging Face repo id is fetched
        like the served model), its config.json read and checked against the served model (vocabulary, hidden
        width, the layers its states come from); any error names speculative_config.model. Others: unchanged."""
        if not (self.runs_eagle3 or (self.runs_dspark and self.model is not None)):
            return self
        try:
            path = resolve_model_dir(self.model, None, download_dir, weights=weights)
        except ValueError as exc:
            raise ValueError(f"speculative_config.{exc}") from None
        if self.runs_dspark:
            return replace(self, model=os.path.abspath(_checked_dspark(self.model, path, model_cfg)))
        try:
            head = read_eagle3_config(path)
        except ValueError as exc:
            raise ValueError(f"speculative_config.model={self.model!r}: {exc}") from None
        check_eagle3_target(head, model_cfg.vocab_size, model_cfg.hidden_size, model_cfg.num_layers)
        return replace(self, model=os.path.abspath(path))  # workers (Ray actors) may run in another directory

    @classmethod
    def parse(cls, value: "str | dict[str, Any] | SpeculativeConfig | None") -> "SpeculativeConfig | None":
        """From the flag's JSON text, a dict (the Python API), a config, or None (off)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        from_json = isinstance(value, str)
        if from_json:
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"speculative_config is not valid JSON ({exc.msg} at character {exc.pos}): "
                                 "give an object such as '{\"method\": \"ngram\", \"num_speculative_tokens\": 3}'."
                                 ) from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {type(value).__name__}.")
        known = {f.name for f in fields(cls)} - ({"drafter_factory"} if from_json else set())
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown key(s) {', '.join(unknown)}: allowed are "
                             f"{', '.join(sorted(known))}.")
        for key in ("method", "num_speculative_tokens"):
            if key not in value:
                raise ValueError(f"speculative_config.{key} is required.")
        if not isinstance(value["method"], str):
            raise ValueError(f"speculative_config.method={value['method']!r} is invalid: choose from "
                             f"{', '.join(METHODS)}.")
        return cls(**value)


def _checked_dspark(name: str, path: str, model_cfg) -> str:
    """A DSpark draft directory's config.json read and checked against the served model; errors name
    speculative_config.model."""
    try:
        dspark, g = read_dspark_draft(path)
        dspark.check_target(model_cfg.vocab_size)
        dspark.tap_counts(model_cfg.num_layers)
    except ValueError as exc:
        raise ValueError(f"speculative_config.model={name!r}: {exc}") from None
    if g.hidden_size != model_cfg.hidden_size or g.vocab_size != model_cfg.vocab_size:
        raise ValueError(f"speculative_config.model={name!r}: the DSpark draft's hidden_size={g.hidden_size}, "
                         f"vocab_size={g.vocab_size} differ from the served model's ({model_cfg.hidden_size}, "
                         f"{model_cfg.vocab_size}): its stages share the served model's embedding and LM head.")
    return path


def _number_in(name: str, value, allowed: str, ok: Callable[[float], bool]) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or not ok(value):
        raise ValueError(f"speculative_config.{name}={value!r} is invalid: must be a number in {allowed}.")


def _int_in(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"speculative_config.{name}={value!r} is invalid: must be an integer in [{low}, {high}].")
