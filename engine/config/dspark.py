"""DSpark draft layers: their configuration, read and validated here (one sentence naming the field for anything
moelink cannot run). engine/spec/heads/dspark.py builds them; engine/spec/proposer/dspark.py drafts with them.

What DSpark is (DeepSeek's inference/model.py `DSparkBlock`, SGLang's `deepseek_v4_dspark` / `dspark`, vLLM's
`DSparkSpeculator`): semi-autoregressive block drafting. Each step, for a request whose last emitted token (the
anchor) sits at position P:
- context: for every token the target computed, the target's hidden states at `target_layer_ids` (the input of
  those layers for DeepSeek's own fields, the mean over its hyper-connection streams; the output of those layers
  for a DFlash-format checkpoint) are concatenated and projected, `main_norm(main_proj(.))` (`fc` and
  `hidden_norm` in a DFlash-format file), and every draft stage keeps the K/V of that projection at the token's
  position in its own KV cache;
- a block of `block_size` tokens, [anchor, mask, ..., mask] at positions P .. P + block_size - 1, goes through the
  stages, each attending over the context K/V before P (a sliding window, where the stages have one) and over the
  whole block (bidirectional inside the block); the last stage's output through the target's final head gives
  base logits for every slot, slot i predicting the token at P + i + 1;
- a Markov head then drafts left to right: logits_i = base_i + W2 W1[prev_i], prev_0 the anchor, prev_{i+1} the
  draft at slot i (greedy here: the acceptance rule treats drafts as deterministic, engine/spec/rejection.py).
A confidence head (per-slot acceptance estimate, for ragged verification) may ship too; moelink verifies every
draft and does not read it.

Two published forms:
- bundled with the target: DeepSeek-V4 / V4.1's config.json carries `dspark_block_size`, `dspark_noise_token_id`,
  `dspark_target_layer_ids`, `dspark_markov_rank` (V4.1 also `dspark_n_routed_experts`,
  `dspark_num_experts_per_tok`), and `num_nextn_predict_layers` stages ship as `mtp.{i}.*` in the target's
  checkpoint: each stage a block of the family's own (hyper-connections, its attention with a sliding window, its
  MoE). The family builds those stages (engine/models/blocks/dspark.py's registry, by architecture);
- a checkpoint of its own, DFlash format (SGLang's `DSparkDraftModel` / `Qwen3DSparkModel`): a Qwen3 config.json
  with `block_size`, `dflash_config` {`target_layer_ids`, `mask_token_id`}, `markov_rank`, `markov_head_type`,
  its stages Qwen3 decoder layers (`layers.{i}.*`), `fc`, `hidden_norm`, `norm`, `markov_head.markov_w{1,2}`;
  the target's embedding and LM head are shared. moelink builds these itself (engine/spec/heads/dspark.py).
A checkpoint trained with the speculators library's convention (`speculators_model_type` "dspark": slot i
predicts P + i, slot 0 untrained) is refused, as SGLang refuses it: read with this convention its drafts would be
one position early.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DSPARK_DRAFT_ARCHITECTURES = ("DSparkDraftModel", "Qwen3DSparkModel")
# The fields that mark a target config.json as carrying DeepSeek's bundled DSpark stages.
BUNDLED_FIELDS = ("dspark_block_size", "dspark_markov_rank", "dspark_noise_token_id", "dspark_target_layer_ids")
MARKOV_HEAD_TYPES = ("vanilla",)


def _invalid(where: str, name: str, value, allowed: str) -> ValueError:
    return ValueError(f"{where} {name}={value!r} is invalid: {allowed}.")


def _int(raw: dict, name: str, where: str, low: int = 1, default: int | None = None) -> int:
    value = raw.get(name, default)
    if value is None:
        raise ValueError(f"{where} has no {name}: it is required.")
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _invalid(where, name, value, f"must be an integer >= {low}")
    return value


def _layer_ids(value, name: str, where: str) -> tuple[int, ...]:
    if (not isinstance(value, (list, tuple)) or not value
            or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in value)):
        raise _invalid(where, name, value, "must be a non-empty list of layer indices >= 0")
    return tuple(value)


@dataclass(frozen=True)
class DSparkConfig:
    """The drafting side of DSpark, whichever form ships it (module docstring)."""

    block_size: int  # slots the stages were trained to draft per step
    mask_token_id: int  # the token filling the block's slots after the anchor
    target_layer_ids: tuple[int, ...]  # the target layers whose states feed the context
    # 0: each id names a layer's input (DeepSeek's fields); 1: a layer's output (DFlash format).
    tap_offset: int
    markov_rank: int
    num_stages: int
    markov_head_type: str = "vanilla"
    where: str = "DSpark config"  # how errors name the file

    def __post_init__(self) -> None:
        if self.markov_head_type not in MARKOV_HEAD_TYPES:
            raise _invalid(self.where, "markov_head_type", self.markov_head_type,
                           f"allowed: {', '.join(MARKOV_HEAD_TYPES)} (the gated and rnn heads are not supported)")
        if self.tap_offset not in (0, 1):
            raise ValueError(f"DSparkConfig.tap_offset={self.tap_offset!r} must be 0 or 1.")
        for name in ("block_size", "markov_rank", "num_stages"):
            if getattr(self, name) < 1:
                raise _invalid(self.where, name, getattr(self, name), "must be >= 1")

    def tap_counts(self, num_target_layers: int) -> tuple[int, ...]:
        """For each target layer id, the number of target layers after which the residual stream is the state to
        capture (engine/models/layers.AuxCapture: the input of layer n is the stream after n layers)."""
        counts = tuple(i + self.tap_offset for i in self.target_layer_ids)
        if any(c > num_target_layers or (self.tap_offset == 0 and c >= num_target_layers) for c in counts):
            raise ValueError(f"{self.where} target layer ids {list(self.target_layer_ids)} do not exist in a target "
                             f"of {num_target_layers} layers.")
        return counts

    def check_target(self, vocab_size: int) -> None:
        if self.mask_token_id >= vocab_size:
            raise _invalid(self.where, "mask_token_id", self.mask_token_id,
                           f"must be a token id of the served model (vocab_size={vocab_size})")


@dataclass(frozen=True)
class DSparkGQAConfig:
    """A DFlash-format checkpoint's stages: Qwen3 decoder layers (GQA with per-head q/k norms, full rope, SwiGLU
    MLP), D = hidden_size, the target's."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int
    attention_bias: bool = False

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"DSpark draft config.json num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}.")
        if self.head_dim % 2:
            raise _invalid("DSpark draft config.json", "head_dim", self.head_dim, "must be even (rotary pairs)")


def bundles_dspark(hf_config: Any) -> bool:
    """Whether a target's config.json carries DeepSeek's bundled DSpark stages (module docstring), at its top level
    or in its text_config (a composite file: DeepSeek-V4.1's)."""
    def get(cfg: Any, key: str) -> Any:
        return cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)

    text = get(hf_config, "text_config")
    return any(get(c, k) is not None for c in (hf_config, text) if c is not None for k in BUNDLED_FIELDS)


def read_bundled_dspark(hf_config: dict) -> DSparkConfig:
    """DSpark from a target config.json's dspark_* fields (DeepSeek-V4 / V4.1; their text_config for a composite
    file): the stages are `num_nextn_predict_layers` mtp.* blocks of the family's."""
    raw = hf_config.get("text_config") or hf_config
    where = "the served model's config.json"
    ids = _layer_ids(raw.get("dspark_target_layer_ids"), "dspark_target_layer_ids", where)
    return DSparkConfig(block_size=_int(raw, "dspark_block_size", where),
                        mask_token_id=_int(raw, "dspark_noise_token_id", where, low=0),
                        target_layer_ids=ids, tap_offset=0, markov_rank=_int(raw, "dspark_markov_rank", where),
                        num_stages=_int(raw, "num_nextn_predict_layers", where), where=where)


def _read_json(path: str | Path) -> tuple[dict, Path]:
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"DSpark draft {str(path)!r} has no config.json.")
    try:
        return json.loads(file.read_text()), file
    except json.JSONDecodeError as e:
        raise ValueError(f"DSpark draft {str(file)!r} is not valid JSON: {e}.") from None


def read_dspark_draft(path: str | Path) -> tuple[DSparkConfig, DSparkGQAConfig]:
    """A DFlash-format DSpark checkpoint's config.json (directory `path` or the file), validated (module
    docstring)."""
    raw, file = _read_json(path)
    where = f"DSpark draft config.json ({file})"
    archs = raw.get("architectures") or []
    if not any(a in DSPARK_DRAFT_ARCHITECTURES for a in archs):
        raise _invalid(where, "architectures", archs, f"allowed: {', '.join(DSPARK_DRAFT_ARCHITECTURES)}")
    if raw.get("speculators_model_type") == "dspark":
        raise _invalid(where, "speculators_model_type", "dspark", "moelink runs DeepSpec-trained DSpark drafts "
                       "(slot i predicts the token after anchor + i); a speculators-trained draft predicts one "
                       "position earlier and would be read wrong")
    dflash = raw.get("dflash_config") or {}
    if not isinstance(dflash, dict):
        raise _invalid(where, "dflash_config", dflash, "must be an object")
    if any(t != "full_attention" for t in raw.get("layer_types") or ()):
        raise _invalid(where, "layer_types", raw["layer_types"], "every stage must be 'full_attention' "
                       "(sliding-window DFlash stages are not supported)")
    if raw.get("hidden_act", "silu") != "silu":
        raise _invalid(where, "hidden_act", raw["hidden_act"], "must be 'silu'")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise _invalid(where, "rope_scaling", rope, "only plain rope (rope_type 'default') is supported")
    theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    ids = dflash.get("target_layer_ids", raw.get("target_layer_ids"))
    mask = dflash.get("mask_token_id", raw.get("mask_token_id"))
    D, N = _int(raw, "hidden_size", where), _int(raw, "num_attention_heads", where)
    layers = _int(raw, "num_hidden_layers", where)
    gqa = DSparkGQAConfig(hidden_size=D, num_layers=layers, num_heads=N,
                          num_kv_heads=_int(raw, "num_key_value_heads", where, default=N),
                          head_dim=_int(raw, "head_dim", where, default=D // N),
                          intermediate_size=_int(raw, "intermediate_size", where),
                          rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
                          vocab_size=_int(raw, "vocab_size", where),
                          attention_bias=bool(raw.get("attention_bias", False)))
    dspark = DSparkConfig(block_size=_int(raw, "block_size", where),
                          mask_token_id=_int({"mask_token_id": mask}, "mask_token_id", where, low=0),
                          target_layer_ids=_layer_ids(ids, "dflash_config.target_layer_ids", where), tap_offset=1,
                          markov_rank=_int(raw, "markov_rank", where),
                          markov_head_type=str(raw.get("markov_head_type", "vanilla")).lower(),
                          num_stages=layers, where=where)
    return dspark, gqa


__all__ = ["BUNDLED_FIELDS", "DSPARK_DRAFT_ARCHITECTURES", "DSparkConfig", "DSparkGQAConfig", "bundles_dspark",
           "read_bundled_dspark", "read_dspark_draft"]
