"""ModelConfig: what the engine needs to know about a checkpoint, read from config.json and validated.

config.json is read by transformers' own config classes (the library that writes these files owns their
aliases and defaults); this module maps that object onto moelink's fields and refuses, with one sentence
naming the field, any value moelink cannot run.
"""
from __future__ import annotations

import dataclasses
import importlib

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moelink.moe.router_config import RouterConfig

from .awaited import awaited_refusal
from ..models.gated_deltanet_config import LinearAttentionConfig
from ..models.mamba1_config import Mamba1Config
from ..models.mamba2_config import Mamba2Config
from ..models.short_conv_config import ShortConvConfig
from .architectures import (CONFIG_ONLY_ARCHITECTURES, MODEL_TYPE_ALIASES, MTP_ARCHITECTURES, OWN_CONFIGS, REGISTRY,  # noqa: F401
                            SUPPORTED_ARCHITECTURES, TEXT_MODEL_OF, TEXT_WEIGHTS_PREFIX)
from ..models.compressed_attention_config import resolve_compressed_cache
from ..models.hyper_connections_config import HyperConnectionConfig
from .hf_readers import read_fields
from .quantization import (QuantConfig, check_architecture, read_hf_quant_config, read_quantization,
                           resolve_quantization)
from ..models.dsa_config import resolve_index_cache
from ..models.rope_config import ROPE_TYPES, RopeConfig  # noqa: F401 (ModelConfig's parts)
from .layer_configs import AttentionConfig
from ..models.gqa_config import GQAConfig
from ..models.blocks.ffn_config import MoEConfig

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}

# Architectures moelink can run, and those whose config.json it reads (routing included) but whose model it
# cannot build yet: views of the one registry (engine/config/architectures.py), read here at call time.
KNOWN_ARCHITECTURES = SUPPORTED_ARCHITECTURES + CONFIG_ONLY_ARCHITECTURES


def parse_dtype(value, checkpoint_dtype: str | None = None) -> torch.dtype:
    """'auto' → the checkpoint's dtype (float32 when it says nothing); names or torch dtypes otherwise."""
    if isinstance(value, torch.dtype):
        if value in _DTYPES.values():
            return value
        raise ValueError(f"dtype={value} is not supported: choose from float32, bfloat16, float16, float64 or 'auto'.")
    if value == "auto":
        return _DTYPES.get(str(checkpoint_dtype or "float32"), torch.float32)
    if value not in _DTYPES:
        raise ValueError(f"dtype={value!r} is not supported: choose from float32, bfloat16, float16, float64 or 'auto'.")
    return _DTYPES[value]


# --kv-cache-dtype values, as vLLM names them. e5m2 is not offered: e4m3 with a scale is what every peer
# defaults to for fp8 KV, and one format keeps one set of kernels.
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}


def parse_kv_cache_dtype(value: str) -> torch.dtype | None:
    """'auto' → None (the model's dtype); 'fp8' / 'fp8_e4m3' → float8_e4m3fn."""
    if value not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype={value!r} is invalid: choose from {', '.join(map(repr, KV_CACHE_DTYPES))}.")
    return KV_CACHE_DTYPES[value]


@dataclass
class ModelConfig:
    """Shape and routing of a MoE decoder, from a local Hugging Face directory.

    `moe` holds the routing scheme and the MoE layout; a ModelConfig built by hand without one gets
    softmax top-k routing over num_experts (renormalised when norm_topk_prob). `attention` is the attention
    kind (models/gqa_config.GQAConfig or mla_config.MLAConfig: the layers' shape, rope, and what the KV cache holds per
    token); built by hand without one it is GQA over num_heads / num_kv_heads / head_dim with plain RoPE.
    num_kv_heads and head_dim are GQA's; an MLA model reads its shape from `attention` alone. `hf_config`
    is the config as transformers reads it (`PretrainedConfig.to_dict()`: aliases resolved, defaults filled).
    """

    model: str
    dtype: torch.dtype
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    max_model_len: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    intermediate_size: int  # dense MLP layers (Qwen3 `mlp_only_layers`, DeepSeek `first_k_dense_replace`)
    norm_topk_prob: bool
    sparse_layers: tuple[int, ...]
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    hf_config: dict = field(repr=False, default_factory=dict)
    moe: MoEConfig | None = None
    attention: AttentionConfig | None = None
    # The Hugging Face repo id `model` (then a cache snapshot directory) was resolved from; None for a
    # directory the user gave. What the user knows the model by: see `name`.
    model_id: str | None = None
    # FP8 block-scaled weights or MXFP4 experts (engine/config/quantization.py): the checkpoint's quantization_config,
    # or FP8 made at load from a float checkpoint (`online`); None runs float weights in `dtype`.
    quantization: QuantConfig | None = None
    # The KV cache's element type (`--kv-cache-dtype`): None = `dtype`; float8_e4m3fn stores K/V (or MLA's
    # latent rows) in one byte with a per-layer scale (kernels/attention.py), half a bf16 cache's bytes.
    kv_cache_dtype: torch.dtype | None = None
    # DeepSeek Sparse Attention's indexer key cache (`--index-cache-dtype`, sparse_attention.INDEX_CACHE_DTYPES):
    # "auto" = fp8 keys with a float32 scale per 128 values when the KV cache is fp8, else the model's dtype.
    index_cache_dtype: str = "auto"
    # Next-n prediction (MTP) layers stored after the main ones, as `model.layers.{num_layers + i}.*`
    # (DeepSeek-V3/R1, Kimi K2, GLM-4.5: config.json's num_nextn_predict_layers, read for MTP_ARCHITECTURES), or
    # as `mtp.*` (Qwen3-Next, Qwen3.5-MoE: config.json's mtp_num_hidden_layers; engine/spec/heads/qwen_mtp.py).
    # The main model never runs them; a speculative drafter builds them (engine/spec/heads/mtp.py). 0: none.
    num_nextn_predict_layers: int = 0
    # Each layer's attention config when the layers differ within their kind (MiMo-V2-Flash's sliding layers: kv
    # heads, sinks, rope of their own), one per layer; () = every layer runs `attention`. Per-layer questions go
    # through `attention_for`; `attention` stays the model's kind and its model-wide facts (the sliding layers).
    layer_attention: tuple = ()
    # Added to every RMSNorm weight of the decoder (layer norms, the final norm, q/k norms) at load: Qwen3-Next's
    # norms are zero-centred, weight stored as w with the norm multiplying by (1 + w). 0: weights as stored.
    norm_weight_offset: float = 0.0
    # A multimodal checkpoint served as its text model (architectures.TEXT_WEIGHTS_PREFIX): where the text model's
    # "model." tensors live in the files ("model.language_model." for Qwen3.5-MoE); "" for a text checkpoint.
    text_weights_prefix: str = ""
    # The MoE layers that route by a fixed token-id table (DeepSeek-V4's hash_moe layers), and the hyper-connections
    # (engine/models/hyper_connections_config.py: hc_mult residual streams); () and None for a model without them.
    hash_layers: tuple[int, ...] = ()
    hyper_connections: HyperConnectionConfig | None = None

    @property
    def cache_dtype(self) -> torch.dtype:
        return self.kv_cache_dtype if self.kv_cache_dtype is not None else self.dtype

    def __post_init__(self) -> None:
        _check_dims(self)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"config.json num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}.")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"config.json num_experts_per_tok={self.top_k} must be in [1, num_experts={self.num_experts}].")
        if not 1 <= self.max_model_len <= self.max_position_embeddings:
            raise ValueError(
                f"max_model_len={self.max_model_len} is invalid: must be in [1, max_position_embeddings={self.max_position_embeddings}]."
            )
        n = self.num_nextn_predict_layers
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"config.json num_nextn_predict_layers={n!r} is invalid: must be an integer >= 0 (the "
                             "checkpoint's MTP layers; 0 = none).")
        if self.attention is None:
            self.attention = GQAConfig(self.num_heads, self.num_kv_heads, self.head_dim,
                                       RopeConfig(self.head_dim, self.rope_theta))
        self.layer_attention = tuple(self.layer_attention)
        if self.layer_attention:
            if len(self.layer_attention) != self.num_layers:
                raise ValueError(f"ModelConfig layer_attention has {len(self.layer_attention)} configs for "
                                 f"num_hidden_layers={self.num_layers} layers.")
            # Linear-attention layers (engine/models/gated_deltanet_config.py: gated DeltaNet, KDA), Mamba1 layers
            # (Jamba's, mamba1_config.py), Mamba2 layers (mamba2_config.py) and short-conv layers (LFM2's,
            # short_conv_config.py) sit beside the model's attention kind.
            stateful = (LinearAttentionConfig, Mamba1Config, Mamba2Config, ShortConvConfig)
            kinds = {a.kind for a in self.layer_attention if not isinstance(a, stateful)}
            if kinds != {self.attention.kind}:
                raise ValueError(f"ModelConfig layer_attention holds {sorted(kinds)} attention, but the model's is "
                                 f"{self.attention.kind!r}.")
        # Every indexer's key cache layout, from the flag and the dtypes (a no-op for models without one).
        self.attention, self.layer_attention = resolve_index_cache(self.attention, self.layer_attention, self.dtype,
                                                                   self.cache_dtype, self.index_cache_dtype)
        # Compressed attention's window ring in fp8 rows under an fp8 KV cache, as its entries (a no-op elsewhere).
        self.attention, self.layer_attention = resolve_compressed_cache(self.attention, self.layer_attention,
                                                                        self.cache_dtype)
        if self.moe is None:
            self.moe = MoEConfig(RouterConfig(self.num_experts, self.top_k, norm_topk_prob=bool(self.norm_topk_prob)))
        r = self.moe.router
        # The router scores the routed experts and the zero-computation ones (MoEConfig.zero_experts).
        routed = self.num_experts + self.moe.zero_experts
        if (r.num_experts, r.top_k, r.norm_topk_prob) != (routed, self.top_k, self.norm_topk_prob):
            raise ValueError(f"ModelConfig moe.router (num_experts={r.num_experts}, top_k={r.top_k}, norm_topk_prob="
                             f"{r.norm_topk_prob}) disagrees with num_experts={self.num_experts} (+ "
                             f"{self.moe.zero_experts} zero-computation), top_k={self.top_k}, "
                             f"norm_topk_prob={self.norm_topk_prob}.")

    def attention_for(self, layer_idx: int) -> AttentionConfig:
        """Layer `layer_idx`'s attention config: its own from `layer_attention`, else the model's (MTP layers,
        stored after the main ones, run the model's)."""
        if self.layer_attention and layer_idx < len(self.layer_attention):
            return self.layer_attention[layer_idx]
        return self.attention

    @property
    def state_layers(self) -> tuple[int, ...]:
        """The layers with per-sequence state in a slot of the hybrid cache manager (their config has
        `state_shapes`): linear attention, and DeepSeek-V4's window and compressor rows; () for most models."""
        return tuple(i for i, a in enumerate(self.layer_attention) if hasattr(a, "state_shapes"))

    @property
    def linear_layers(self) -> tuple[int, ...]:
        """The layers that keep per-sequence state instead of KV (linear attention); () for most models."""
        return tuple(i for i, a in enumerate(self.layer_attention) if isinstance(a, LinearAttentionConfig))

    def kv_layer_pairs(self) -> tuple[tuple[int, int], ...] | None:
        """(full, sliding) layer pairs that share one set of cache tensors (models/gqa_config.GQAConfig.kv_layer_pairs),
        or None. Layers pair only when their caches have one shape: a pair whose layers differ (MiMo-V2-Flash's
        sliding layers hold twice the kv heads) keeps a tensor set per layer and the one shared block table."""
        pairs = self.attention.kv_layer_pairs(self.num_layers)
        if pairs is None or not self.layer_attention:
            return pairs
        if any(self.attention_for(f).cache_shapes(1, 1) != self.attention_for(s).cache_shapes(1, 1) for f, s in pairs):
            return None
        return pairs

    @property
    def name(self) -> str:
        """The model as the user named it: its repo id, else the directory's name (a snapshot's is a hash)."""
        return self.model_id or Path(self.model).name

    @classmethod
    def from_pretrained(cls, model: str, dtype="auto", max_model_len: int | None = None, *,
                        require_runnable: bool = True, quantization: str | None = None,
                        fp8_block_size: tuple[int, int] | None = None, kv_cache_dtype: str = "auto",
                        index_cache_dtype: str = "auto") -> "ModelConfig":
        """Read `model`/config.json through transformers' own config class (so every alias and default
        transformers knows applies) and validate it. Architectures in CONFIG_ONLY_ARCHITECTURES are read
        only with require_runnable=False; otherwise they are refused here, before any engine work."""
        path = Path(model)
        if not path.is_dir():
            raise ValueError(f"model={model!r} is not a directory: pass a local Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json); EngineArgs resolves a Hugging Face repo id to one.")
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ValueError(f"model={model!r} has no config.json: a Hugging Face checkpoint directory is required.")
        try:
            raw = json.loads(cfg_file.read_text())
        except ValueError as e:
            raise ValueError(f"model={model!r}: config.json is not valid JSON ({e}).") from None
        # The architecture is checked on the file first: transformers would fail on an unknown model_type
        # with a message about its own registry rather than about what moelink runs.
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in KNOWN_ARCHITECTURES), None)
        whole_file = True
        text_prefix = ""
        if arch is None and any(a in TEXT_MODEL_OF for a in archs):
            wrapper = next(a for a in archs if a in TEXT_MODEL_OF)
            raw, arch = _text_model_raw(raw, wrapper)
            whole_file = False
            text_prefix = TEXT_WEIGHTS_PREFIX.get(wrapper, "")
            if require_runnable and not text_prefix:
                raise ValueError(f"config.json architectures={archs!r} is a multimodal checkpoint: its text model "
                                 f"({arch}) is read, but serving it from this checkpoint is not in this build.")
        if arch is None:
            raise ValueError(awaited_refusal(raw) or f"config.json architectures={archs!r} is not supported: moelink "
                                                     f"runs {', '.join(SUPPORTED_ARCHITECTURES)}.")
        if max_model_len is not None and (not isinstance(max_model_len, int) or isinstance(max_model_len, bool)):
            raise ValueError(f"max_model_len={max_model_len!r} is invalid: must be a positive integer.")
        hf = _auto_config(path, raw, arch, whole_file=whole_file)
        fields = read_fields(arch, hf)
        if fields.get("quantization") is None:  # ModelOpt's older exports: the quantization in a file of its own
            hf_quant = read_hf_quant_config(path)
            if hf_quant is not None:
                fields["quantization"] = read_quantization(hf_quant)
                check_architecture(fields["quantization"], arch)
        # transformers' DeepSeek-V3 / GLM-4-MoE configs default num_nextn_predict_layers to 1 (the full models'
        # value) whether or not the file has the field: what the checkpoint holds is what its file says.
        # Qwen3-Next / Qwen3.5 name the count mtp_num_hidden_layers (their MTP modules: engine/spec/heads/qwen_mtp.py).
        if arch in MTP_ARCHITECTURES:
            fields["num_nextn_predict_layers"] = (raw.get("num_nextn_predict_layers")
                                                  or raw.get("mtp_num_hidden_layers") or REGISTRY[arch].mtp_unstated)
        fields["quantization"] = resolve_quantization(fields.get("quantization"), quantization, fp8_block_size)
        if text_prefix and getattr(fields["quantization"], "method", None) == "int4":
            # its target / ignore names may be spelled as the files name the text model ("language_model.model.")
            fields["quantization"] = dataclasses.replace(fields["quantization"], text_prefix=text_prefix)
        checkpoint_dtype = str(hf.dtype).removeprefix("torch.") if getattr(hf, "dtype", None) else raw.get("torch_dtype")
        cfg = cls(
            model=str(path), dtype=parse_dtype(dtype, checkpoint_dtype), architecture=arch,
            max_model_len=max_model_len if max_model_len is not None else fields["max_position_embeddings"],
            hf_config=hf.to_dict(), kv_cache_dtype=parse_kv_cache_dtype(kv_cache_dtype),
            text_weights_prefix=text_prefix, index_cache_dtype=index_cache_dtype, **fields,
        )
        if require_runnable and arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"architecture {arch}: config read, model definition not available in this build "
                             f"(moelink runs {', '.join(SUPPORTED_ARCHITECTURES)}).")
        return cfg


# What config.json may say before anything is allocated from it. The bounds are far above any released model
# (vocabularies to 262k, hidden sizes to 18k, 128 layers, 384 experts, 10M positions) and far below what a typo
# or a hostile file asks for (a 16 TB embedding, a 4 TB rope table).
_DIMS = (  # (field, what config.json calls it, least, most)
    ("vocab_size", "vocab_size", 1, 1 << 22),
    ("hidden_size", "hidden_size", 1, 1 << 17),
    ("num_layers", "num_hidden_layers", 1, 1 << 12),
    ("num_heads", "num_attention_heads", 1, 1 << 12),
    ("num_kv_heads", "num_key_value_heads", 1, 1 << 12),
    ("head_dim", "head_dim", 1, 1 << 12),
    ("num_experts", "num_experts (n_routed_experts, num_local_experts)", 0, 1 << 14),
    ("moe_intermediate_size", "moe_intermediate_size", 0, 1 << 18),
    ("intermediate_size", "intermediate_size", 0, 1 << 18),
    ("max_position_embeddings", "max_position_embeddings", 1, 1 << 24),
)


def _check_dims(cfg: "ModelConfig") -> None:
    """One error naming the config.json field when a dimension is not an integer in its range."""
    for attr, name, least, most in _DIMS:
        v = getattr(cfg, attr)
        if isinstance(v, bool) or not isinstance(v, int) or not least <= v <= most:
            raise ValueError(f"config.json {name}={v!r} is invalid: must be an integer in [{least}, {most}].")


def _text_model_raw(raw: dict, wrapper: str) -> tuple[dict, str]:
    """The text model's config.json fields of a multimodal checkpoint (architectures.TEXT_MODEL_OF), and its
    architecture. The top level's quantization applies to the text model when its own config has none."""
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise ValueError(f"config.json architectures=[{wrapper!r}] needs a text_config object (the text model's "
                         f"config); got {type(text).__name__}.")
    arch = TEXT_MODEL_OF[wrapper]
    text = {**text, "architectures": [arch]}
    if "quantization_config" in raw and "quantization_config" not in text:
        text["quantization_config"] = raw["quantization_config"]
    return text, arch


def _auto_config(path: Path, raw: dict, arch: str, *, whole_file: bool = True):
    """transformers' config object for `path`; it owns config.json's aliases (Qwen3-MoE's num_experts is
    written num_local_experts by transformers 5), defaults and the rope_scaling → rope_parameters rewrite.

    A checkpoint's own Python code is never run (trust_remote_code=False, and transformers is never left to
    ask on stdin). Which config class reads the file never depends on which transformers is installed: a
    published alias (architectures.MODEL_TYPE_ALIASES: Kimi K2's `kimi_k2`) and a `model_type` transformers does
    not know, on an architecture moelink runs, are read through the model_type the registry names for it.
    `whole_file` False: `raw` is part of config.json (a multimodal checkpoint's text_config), read from the dict."""
    from transformers import AutoConfig  # ~1 s to import: paid when a model is read, not by every CLI start
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    file_type = raw.get("model_type")
    model_type = MODEL_TYPE_ALIASES.get(file_type) if isinstance(file_type, str) else None
    try:
        if isinstance(file_type, str) and file_type in OWN_CONFIGS:  # the family reads it (transformers' class or its own)
            return importlib.import_module(OWN_CONFIGS[file_type]).read_config(
                raw, file_type in CONFIG_MAPPING_NAMES, str(path))
        if model_type is None and file_type in CONFIG_MAPPING_NAMES:
            if whole_file:
                return AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
            model_type = file_type
        if model_type is None:
            model_type = REGISTRY[arch].model_type if arch in REGISTRY else ""
            if not model_type:
                raise ValueError(f"model_type={file_type!r} is unknown to transformers")
        fields = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map")}
        return AutoConfig.for_model(model_type, **fields)
    except Exception as e:  # noqa: BLE001  (transformers raises ValueError, OSError and strict-dataclass errors)
        raise ValueError(f"model={str(path)!r}: transformers could not read config.json: {e}") from None
