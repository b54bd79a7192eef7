"""The config.json of an EAGLE-3 draft head: a checkpoint of its own beside the target's (engine/spec/heads/eagle3.py
builds the head; engine/spec/proposer/eagle3_loader.py loads it). Read as plain JSON and validated here, one sentence naming
the field for anything moelink cannot run.

The format is the one the public EAGLE-3 heads for Llama and Qwen3 use (EAGLE's own training code, SpecForge and
their exports): a Llama config with `architectures` ["LlamaForCausalLMEagle3"] (vLLM registers the same model as
"Eagle3LlamaForCausalLM"), `num_hidden_layers` 1, `vocab_size` the target's, and
    draft_vocab_size      the head's own (smaller) vocabulary; absent: vocab_size (vLLM's default)
    target_hidden_size    the target's hidden width, when it differs from the head's hidden_size
    norm_before_residual  vLLM's switch: the layer's residual is hidden_norm(h) rather than h (absent: False)
    eagle_config          {"use_aux_hidden_state": true, "eagle_aux_hidden_state_layer_ids": [...]} (optional)
rope as any Llama config (`rope_theta`, `rope_scaling` / `rope_parameters`; EAGLE's own Llama-3.1 head has none,
so theta 10000). Nothing in the file says which target it was trained for.

Which target states feed the head (`eagle3_aux_layers`): the residual stream (the layer's input, hidden +
residual, before its input_layernorm) after 2, L//2 and L-3 of the target's L layers, vLLM's and SGLang's default
(both capture "the input of layers 2, L//2, L-3"). A file may name its own: SpecForge writes
`eagle_config.eagle_aux_hidden_state_layer_ids` as layer *outputs* (e.g. [1, 29, 57] for DeepSeek-V3's 61 layers:
the default's states) and SGLang reads them so (+1); vLLM reads the same list (or a top-level
`eagle_aux_hidden_state_layer_ids`, the speculators converter's) as layer inputs, one layer earlier. moelink
follows the trainer: ids are layer outputs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..models.rope_config import ROPE_TYPES, RopeConfig
from ..models.gqa_config import GQAConfig

EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")


def _invalid(name: str, value, allowed: str) -> ValueError:
    return ValueError(f"EAGLE-3 head config.json {name}={value!r} is invalid: {allowed}.")


def _positive_int(raw: dict, name: str, default: int | None = None) -> int:
    """raw[name] (null or absent: `default`; no default: required), a positive integer."""
    value = raw.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"EAGLE-3 head config.json has no {name}: it is required.")
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _invalid(name, value, "must be a positive integer")
    return value


def _flag(raw: dict, name: str) -> bool:
    value = raw.get(name, False)
    if not isinstance(value, bool):
        raise _invalid(name, value, "must be true or false")
    return value


@dataclass(frozen=True)
class Eagle3Config:
    """One EAGLE-3 head (module docstring): D = hidden_size, Dt = target_hidden_size."""

    hidden_size: int
    target_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    vocab_size: int  # the target's vocabulary (embed_tokens rows, t2d)
    draft_vocab_size: int  # lm_head rows, d2t
    max_position_embeddings: int
    rope: RopeConfig
    architecture: str = EAGLE3_ARCHITECTURES[0]
    attention_bias: bool = False  # q/k/v and o biases (vLLM: attention_bias)
    norm_before_residual: bool = False
    tie_word_embeddings: bool = False
    # Layer outputs named by the file (module docstring), None: the default rule.
    aux_layer_ids: tuple[int, ...] | None = None
    checkpoint_dtype: str | None = None
    # The file as read (with a model_type), for rope types computed by transformers (engine/models/rope.py).
    hf_config: dict = field(default_factory=dict, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.architecture not in EAGLE3_ARCHITECTURES:
            raise _invalid("architectures", [self.architecture], f"allowed: {', '.join(EAGLE3_ARCHITECTURES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"EAGLE-3 head config.json num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}.")
        if self.draft_vocab_size > self.vocab_size:
            raise _invalid("draft_vocab_size", self.draft_vocab_size, f"must be at most vocab_size={self.vocab_size}")
        if self.head_dim % 2:
            raise _invalid("head_dim", self.head_dim, "must be even (rotary pairs)")
        if not self.rms_norm_eps > 0:
            raise _invalid("rms_norm_eps", self.rms_norm_eps, "must be > 0")
        ids = self.aux_layer_ids
        if ids is not None and (len(ids) != 3 or any(isinstance(i, bool) or not isinstance(i, int) or i < 0
                                                      for i in ids)):
            raise _invalid("eagle_aux_hidden_state_layer_ids", list(ids),
                           "must be three layer indices >= 0 (fc takes three target states)")
        if self.tie_word_embeddings and self.draft_vocab_size != self.vocab_size:
            raise _invalid("tie_word_embeddings", True, f"a tied head needs draft_vocab_size == vocab_size "
                           f"({self.draft_vocab_size} != {self.vocab_size})")

    @property
    def attention(self) -> GQAConfig:
        """The head's attention: Llama GQA over the [embedding | hidden] concatenation, rope over every head dim."""
        return GQAConfig(self.num_heads, self.num_kv_heads, self.head_dim, self.rope,
                         qkv_bias=self.attention_bias, o_bias=self.attention_bias)


def eagle3_aux_layers(cfg: Eagle3Config, num_target_layers: int) -> tuple[int, int, int]:
    """(low, mid, high): for each, the number of target layers after which the residual stream (hidden +
    residual, before the next layer's input_layernorm; the target's last output before its final norm for L) is
    the state to capture; its first entry feeds `h_low` of `Eagle3Head.combine_hidden`. The file's
    eagle_aux_hidden_state_layer_ids (layer outputs) + 1, else 2, L//2, L-3 (module docstring)."""
    L = num_target_layers
    after = tuple(i + 1 for i in cfg.aux_layer_ids) if cfg.aux_layer_ids is not None else (2, L // 2, L - 3)
    if not all(0 <= a <= L for a in after):
        raise ValueError(f"EAGLE-3 head: target states after layers {list(after)} do not exist in a target of "
                         f"{L} layers (config.json eagle_aux_hidden_state_layer_ids="
                         f"{list(cfg.aux_layer_ids) if cfg.aux_layer_ids is not None else None}).")
    return after


def check_eagle3_target(cfg: Eagle3Config, vocab_size: int, hidden_size: int, num_layers: int
                        ) -> tuple[int, int, int]:
    """Refuse a head that cannot draft for a target of this vocabulary, hidden width and depth (one sentence
    naming the field); returns its `eagle3_aux_layers` for the target."""
    if cfg.vocab_size != vocab_size:
        raise ValueError(f"speculative_config.model: the EAGLE-3 head's config.json vocab_size={cfg.vocab_size} "
                         f"differs from the served model's vocab_size={vocab_size}: the head drafts target ids, "
                         "so it must be trained for this model.")
    if cfg.target_hidden_size != hidden_size:
        raise ValueError(f"speculative_config.model: the EAGLE-3 head's config.json target_hidden_size="
                         f"{cfg.target_hidden_size} differs from the served model's hidden_size={hidden_size}: its "
                         "fc reads three of the served model's hidden states.")
    return eagle3_aux_layers(cfg, num_layers)


def _aux_layer_ids(raw: dict) -> tuple[int, ...] | None:
    eagle = raw.get("eagle_config") or {}
    if not isinstance(eagle, dict):
        raise _invalid("eagle_config", eagle, "must be an object")
    if eagle.get("use_aux_hidden_state", True) is not True:
        raise _invalid("eagle_config.use_aux_hidden_state", eagle.get("use_aux_hidden_state"),
                       "must be true (moelink runs EAGLE-3 heads, whose fc takes three target states)")
    ids = eagle.get("eagle_aux_hidden_state_layer_ids", raw.get("eagle_aux_hidden_state_layer_ids"))
    if ids is None:
        return None
    if not isinstance(ids, list):
        raise _invalid("eagle_aux_hidden_state_layer_ids", ids, "must be a list of three layer indices")
    return tuple(ids)


def _rope(raw: dict, head_dim: int) -> RopeConfig:
    """rope_parameters (transformers 5), else rope_scaling + rope_theta (older files); none: plain rope, 10000."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise _invalid("rope_scaling", params, "must be null or an object")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise _invalid("rope_scaling.rope_type", rope_type, f"allowed: {', '.join(ROPE_TYPES)}")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise _invalid("rope_theta", theta, "must be a number > 0")
    if raw.get("partial_rotary_factor", 1.0) != 1.0:
        raise _invalid("partial_rotary_factor", raw["partial_rotary_factor"], "must be 1.0 (Llama rotates every dim)")
    return RopeConfig(head_dim, float(theta), rope_type, "neox")


def read_eagle3_config(path: str | Path) -> Eagle3Config:
    """The head's config.json in directory `path` (or the file itself), validated."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"EAGLE-3 head {str(path)!r} has no config.json.")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"EAGLE-3 head {str(file)!r} is not valid JSON: {e}.") from None
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in EAGLE3_ARCHITECTURES), None)
    if arch is None:
        raise _invalid("architectures", archs, f"allowed: {', '.join(EAGLE3_ARCHITECTURES)}")
    if raw.get("num_hidden_layers", 1) != 1:
        raise _invalid("num_hidden_layers", raw["num_hidden_layers"], "must be 1 (one midlayer, as published)")
    if raw.get("hidden_act", "silu") != "silu":
        raise _invalid("hidden_act", raw["hidden_act"], "must be 'silu'")
    if raw.get("mlp_bias", False):
        raise _invalid("mlp_bias", raw["mlp_bias"], "must be false")
    D = _positive_int(raw, "hidden_size")
    heads = _positive_int(raw, "num_attention_heads")
    head_dim = _positive_int(raw, "head_dim", D // heads)
    vocab = _positive_int(raw, "vocab_size")
    eps = raw.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise _invalid("rms_norm_eps", eps, "must be a number > 0")
    dtype = raw.get("dtype", raw.get("torch_dtype"))
    return Eagle3Config(
        hidden_size=D, target_hidden_size=_positive_int(raw, "target_hidden_size", D),
        num_heads=heads, num_kv_heads=_positive_int(raw, "num_key_value_heads", heads),
        head_dim=head_dim, intermediate_size=_positive_int(raw, "intermediate_size"), rms_norm_eps=float(eps),
        vocab_size=vocab, draft_vocab_size=_positive_int(raw, "draft_vocab_size", vocab),
        max_position_embeddings=_positive_int(raw, "max_position_embeddings", 2048),
        rope=_rope(raw, head_dim), architecture=arch, attention_bias=_flag(raw, "attention_bias"),
        norm_before_residual=_flag(raw, "norm_before_residual"), tie_word_embeddings=_flag(raw, "tie_word_embeddings"),
        aux_layer_ids=_aux_layer_ids(raw), checkpoint_dtype=str(dtype) if dtype is not None else None,
        hf_config={"model_type": "llama", **raw})
