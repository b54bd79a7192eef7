"""DeepSeek-V4.1's config.json reader (engine/config/hf_readers.py calls `read`): its layers' attention
(engine/models/shared_compressed_attention_config.py, one per layer: who owns the compressed entries, who indexes,
who reuses), its hyper-connections,
its MoE facts (V4's block: sqrtsoftplus routing with a correction bias, one shared expert, SwiGLU clamped at
swiglu_limit) and its Engram layers. What moelink cannot run is refused naming the field. Counted in engine/config's
floor (tests/test_layering.py): no model code, no device. `hf`: the flat text config (read_config, below), or
its to_dict() (ModelConfig.hf_config).
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moelink.moe.router_config import RouterConfig

from ..blocks.ffn_config import MoEConfig
from ..compressed_attention_config import positive_int
from ..hyper_connections_config import HyperConnectionConfig
from ..rope_config import ROPE_TYPES, RopeConfig
from ...config.refusals import unsupported
from ..shared_compressed_attention_config import SharedCompressedAttentionConfig


def _get(hf, name: str, default=None):
    return hf.get(name, default) if isinstance(hf, dict) else getattr(hf, name, default)


def _int_list(hf, name: str, n: int) -> list[int]:
    v = _get(hf, name)
    if not isinstance(v, (list, tuple)) or any(isinstance(x, bool) or not isinstance(x, int) for x in v):
        raise unsupported(name, v, "a list of layer indices")
    if any(not 0 <= x < n for x in v):
        raise unsupported(name, list(v), f"layer indices in [0, num_hidden_layers={n})")
    return list(v)


def rope(hf, label: str, rotary_dim: int) -> RopeConfig:
    params = (_get(hf, "rope_parameters") or {}).get(label) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise unsupported(f"rope_parameters.{label}.rope_type", rope_type, ROPE_TYPES)
    return RopeConfig(rotary_dim, float(params.get("rope_theta", 10000.0)), rope_type, style="interleaved",
                      layer_type=label)


def layer_roles(hf, n: int) -> list[dict]:
    """Per layer: its rate, its KV source, its index and candidate roles (shared_compressed_attention_config.py)."""
    ratios = _get(hf, "compress_ratios")
    if not isinstance(ratios, (list, tuple)) or len(ratios) < n or any(
            isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in ratios[:n]):
        raise unsupported("compress_ratios", ratios, f"a list of {n} integers >= 0 (one per layer)")
    kv = _int_list(hf, "kv_source_layer_ids", n)
    idx = _int_list(hf, "index_source_layer_ids", n)
    cand = _get(hf, "candidate_source_layer_id", -1)
    cand = -1 if cand is None else cand
    if missing := [i for i in kv if i not in idx]:
        raise unsupported("index_source_layer_ids", idx, f"a list holding every kv_source_layer_ids entry (missing "
                                                          f"{missing}): a group's source publishes its index keys")
    roles, source = [], -1
    for i in range(n):
        rate = ratios[i]
        if i in kv:
            if rate == 0:
                raise unsupported(f"compress_ratios[{i}]", 0, "a rate > 0 at a kv_source_layer_ids layer")
            source = i
        elif rate and (source < 0 or ratios[source] != rate):
            raise unsupported(f"compress_ratios[{i}]", rate, f"the rate of its KV source (layer {source}), "
                                                             "whose entries it reads")
        if i in idx and rate == 0:
            raise unsupported(f"compress_ratios[{i}]", 0, "a rate > 0 at an index_source_layer_ids layer")
        index = "keys" if i in kv else "reindex" if i in idx else "reuse" if rate else "none"
        candidates = "none"
        if i == cand:
            candidates = "publish"
        elif 0 <= cand < i and i in idx:
            if source != next(s for s in reversed(kv) if s <= cand):
                raise unsupported("candidate_source_layer_id", cand, f"a layer of the KV group of every index source "
                                                                     f"after it (layer {i} reads another group)")
            candidates = "use"
        roles.append(dict(compress_rate=rate, source=source if rate else -1, index=index, candidates=candidates))
    if cand >= 0 and cand not in idx:
        raise unsupported("candidate_source_layer_id", cand, f"one of index_source_layer_ids {idx}, or -1")
    return roles


EXPERT_DTYPES = ("fp4", "fp8")


def published_format(arch: str, hf, quant) -> tuple[int, int] | None:
    """The FP8 block of DeepSeek's published files (`quantization_config`: quant_method fp8, block-scaled e4m3
    weights with a `.scale` beside each, ue8m0 or float32), or None for a float checkpoint. moelink dequantizes every
    FP8 tensor as it loads (weights.py); FP4 experts (`expert_dtype` fp4) stay packed (V4's MoE block runs them)."""
    if quant is None:
        return None
    if quant.method != "fp8" or getattr(quant, "online", False):
        raise unsupported("quantization_config.quant_method", quant.method, ("fp8",),
                          f" for {arch}: DeepSeek's FP8 block-scaled files are the quantized format moelink reads")
    if quant.modules_to_not_convert:
        raise ValueError(f"quantization_config.modules_to_not_convert={list(quant.modules_to_not_convert)!r} is not "
                         f"supported for {arch}: which weights are FP8 follows the files (a `.scale` beside a "
                         "weight); leave it unset.")
    raw = _get(hf, "quantization_config") or {}
    raw = raw if isinstance(raw, dict) else (raw.to_dict() if hasattr(raw, "to_dict") else {})
    expert = raw.get("expert_dtype") or _get(hf, "expert_dtype") or "fp8"
    if expert not in EXPERT_DTYPES:
        raise unsupported("quantization_config.expert_dtype", expert, EXPERT_DTYPES,
                          f" for {arch} (FP4 experts held packed, FP8 ones dequantized as they load)")
    return tuple(quant.block)


def _check_moe(arch: str, hf, c: dict) -> MoEConfig:
    if (scoring := _get(hf, "scoring_func", "sqrtsoftplus")) != "sqrtsoftplus":
        raise unsupported("scoring_func", scoring, ("sqrtsoftplus",), f" for {arch}")
    if (method := _get(hf, "topk_method", "noaux_tc")) != "noaux_tc":
        raise unsupported("topk_method", method, ("noaux_tc",), f" for {arch}")
    if float(_get(hf, "gate_temp", 1.0)) != 1.0:
        raise unsupported("gate_temp", _get(hf, "gate_temp"), (1.0,), f" (the published value; {arch}'s router "
                                                                       "divides its logits by it)")
    if not _get(hf, "norm_topk_prob", True):
        raise unsupported("norm_topk_prob", False, (True,), f" for {arch}")
    if int(_get(hf, "n_shared_experts", 1) or 0) != 1:
        raise unsupported("n_shared_experts", _get(hf, "n_shared_experts"), (1,), f" for {arch}")
    limit = float(_get(hf, "swiglu_limit", 10.0))
    if not limit > 0:
        raise unsupported("swiglu_limit", limit, "a number > 0")
    E = _get(hf, "n_routed_experts")
    positive_int("n_routed_experts", E, {"n_routed_experts": 1 << 14})
    router = RouterConfig(E, c["top_k"], scoring_func="sqrtsoftplus", topk_method="noaux_tc", norm_topk_prob=True,
                          routed_scaling_factor=float(_get(hf, "routed_scaling_factor", 1.0) or 1.0))
    return MoEConfig(router, n_shared_experts=1, activation="silu_clamp", swiglu_limit=limit)


def read(arch: str, hf, c: dict, rope_params: dict) -> dict:
    """ModelConfig's fields of a DeepSeek-V4.1 config.json (hf_readers.read_fields' family reader)."""
    n = c["num_layers"]
    if c["num_kv_heads"] != 1:
        raise unsupported("num_key_value_heads", c["num_kv_heads"], (1,), " (V4.1's attention is one shared KV head)")
    if _get(hf, "attention_bias", False):
        raise unsupported("attention_bias", True, (False,), f" for {arch}")
    published_format(arch, hf, c.get("quantization"))
    head_dim = c["head_dim"]
    rotary_dim = int(_get(hf, "qk_rope_head_dim") or 0)
    ropes = {"main": rope(hf, "main", rotary_dim), "compress": rope(hf, "compress", rotary_dim)}
    engram_layers = _int_list(hf, "engram_layer_ids", n) if _get(hf, "engram_layer_ids") else []
    context = int(_get(hf, "engram_max_ngram_size", 0) or 0) - 1 if engram_layers else 0
    sizes = {k: _get(hf, k) for k in ("q_lora_rank", "o_groups", "o_lora_rank", "sliding_window")}
    index = {k: _get(hf, k) for k in ("index_n_heads", "index_head_dim", "index_topk")}
    cand = {k: _get(hf, k) for k in ("candidate_topk_blocks", "candidate_block_size")}
    layers = []
    for i, role in enumerate(layer_roles(hf, n)):
        indexes = role["index"] in ("keys", "reindex")
        layers.append(SharedCompressedAttentionConfig(
            c["num_heads"], head_dim, rope=ropes["compress" if role["compress_rate"] else "main"],
            compress_rope=ropes["compress"], layer_idx=i, **sizes, **role,
            **(index if indexes else {}), **(cand if role["candidates"] != "none" else {}),
            engram_context=context if i in engram_layers else 0, rms_norm_eps=c["rms_norm_eps"]))
    moe = _check_moe(arch, hf, c)
    hc = HyperConnectionConfig(int(_get(hf, "hc_mult")), int(_get(hf, "hc_sinkhorn_iters")), float(_get(hf, "hc_eps")))
    return dict(num_experts=moe.router.num_experts, moe_intermediate_size=int(_get(hf, "moe_intermediate_size")),
                intermediate_size=0, num_nextn_predict_layers=0, norm_topk_prob=True, sparse_layers=tuple(range(n)),
                moe=moe, attention=layers[0], layer_attention=tuple(layers), hash_layers=(), hyper_connections=hc)



# -- config.json as a transformers config ------------------------------------------------------------------------
# DeepSeek-V4.1's config.json as a transformers config object, read by moelink's own class while the locked
# transformers has none (engine/config/model.py asks `read_config` through the family's OWN_CONFIGS), by transformers'
# own once a release defines `deepseek_v41` / `deepseek_v41_text` (its text config then, flat, as the readers expect).
#
# Two shapes of config.json reach here: the released composite one (model_type `deepseek_v41`, the text model under
# `text_config`, the vision tower under `vision_config`, `quantization_config` at the top) and the flat text config
# transformers' `DeepseekV41ForCausalLM.save_pretrained` writes (model_type `deepseek_v41_text`). Either way the result
# is flat: the text model's fields at the top, the composite's quantization_config carried over.
#
# The defaults are the published model's (DeepSeek-V4.1-Flash, as transformers' main branch documents its
# configuration), and the derived fields follow the same rules: a schedule `compress_ratios` when none is given, the
# KV sources (the first layer of each run of equal nonzero ratios) and index sources (the KV sources) when not given,
# the candidate source (the last KV source), and the two ropes: "main" (rope_theta, no scaling) for sliding-only layers
# and "compress" (compress_rope_theta with rope_scaling, yarn's attention factor 1) for the rest.

# The published schedule (40 layers): 2 sliding-only layers, 18 at ratio 2, 20 at ratio 1.
PUBLISHED_RATIOS = [0, 0] + [2] * 18 + [1] * 20
PUBLISHED_KV_SOURCES = [2, 8, 14, 20]
PUBLISHED_INDEX_SOURCES = [2, 8, 14, 20, 24, 28, 32, 36]

DEFAULTS = dict(
    vocab_size=129280, hidden_size=5120, num_hidden_layers=40, num_attention_heads=64, num_key_value_heads=1,
    head_dim=512, q_lora_rank=1280, qk_rope_head_dim=64, rope_theta=10000.0, compress_rope_theta=160000.0,
    rope_parameters=None, rope_scaling=None, max_position_embeddings=1048576, attention_bias=False,
    sliding_window=128, compress_ratios=None, kv_source_layer_ids=None, index_source_layer_ids=None,
    candidate_source_layer_id=None, candidate_topk_blocks=2048, candidate_block_size=8, index_n_heads=32,
    index_head_dim=128, index_topk=512, o_groups=8, o_lora_rank=1024, moe_intermediate_size=2304,
    n_routed_experts=384, n_shared_experts=1, num_experts_per_tok=6, scoring_func="sqrtsoftplus", gate_temp=1.0,
    norm_topk_prob=True, routed_scaling_factor=1.5, topk_method="noaux_tc", swiglu_limit=10.0, hc_mult=4,
    hc_sinkhorn_iters=20, hc_eps=1.0e-6, engram_layer_ids=None, engram_vocab_size=16000000,
    engram_num_embeddings=None, engram_max_ngram_size=4, engram_n_heads=8, engram_head_dim=256, engram_pad_id=2,
    engram_compressed_vocab_size=99092, num_nextn_predict_layers=3, dspark_block_size=5,
    dspark_noise_token_id=128799, dspark_target_layer_ids=None, dspark_markov_rank=256, dspark_n_routed_experts=128,
    dspark_num_experts_per_tok=3, hidden_act="silu", rms_norm_eps=1.0e-20, tie_word_embeddings=False,
    eos_token_id=1,
)


def derive(f: dict, rope_scaling, rope_parameters) -> None:
    """config.json's fields `f` with the derived ones filled (the section above), in place."""
    n, mtp = f["num_hidden_layers"], int(f["num_nextn_predict_layers"] or 0)
    if f["compress_ratios"] is None:
        if n == len(PUBLISHED_RATIOS):
            f["compress_ratios"] = list(PUBLISHED_RATIOS)
        else:  # the published shape scaled to n layers: 2 sliding, half the rest at 2, the others at 1
            slide = min(2, n)
            enc = max(0, (n - slide + 1) // 2)
            f["compress_ratios"] = [0] * slide + [2] * enc + [1] * max(0, n - slide - enc)
    main = list(f["compress_ratios"])[:n]
    if f["kv_source_layer_ids"] is None:
        f["kv_source_layer_ids"] = (list(PUBLISHED_KV_SOURCES) if main == PUBLISHED_RATIOS[:n] else
                                    [i for i, r in enumerate(main) if r > 0 and (i == 0 or main[i - 1] != r)])
    if f["index_source_layer_ids"] is None:
        f["index_source_layer_ids"] = (list(PUBLISHED_INDEX_SOURCES)
                                       if f["kv_source_layer_ids"] == PUBLISHED_KV_SOURCES
                                       else list(f["kv_source_layer_ids"]))
    if f["candidate_source_layer_id"] is None:
        f["candidate_source_layer_id"] = f["kv_source_layer_ids"][-1] if f["kv_source_layer_ids"] else -1
    if f["engram_layer_ids"] is None:
        f["engram_layer_ids"] = []
    if f["engram_num_embeddings"] is None:
        f["engram_num_embeddings"] = [0] * len(f["engram_layer_ids"])
    if f["dspark_target_layer_ids"] is None:
        f["dspark_target_layer_ids"] = sorted(i for i in range(n) if i not in f["kv_source_layer_ids"])[-3:]
    # the draft layers' entries (always sliding-only) past the main layers
    ratios = list(f["compress_ratios"])
    f["compress_ratios"] = ratios[:n] + (ratios[n:n + mtp] + [0] * mtp)[:mtp]
    f["layer_types"] = ["shared_compressed_attention" if i in f["kv_source_layer_ids"] else "sliding_attention"
                        for i in range(n)]
    rp = rope_parameters if isinstance(rope_parameters, dict) else {}
    if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        f["rope_parameters"] = {"main": dict(rp["main"]), "compress": dict(rp["compress"])}
        return
    partial = f["qk_rope_head_dim"] / f["head_dim"]
    scaling = {k: v for k, v in (rope_scaling or rp or {}).items()
               if k not in ("main", "compress", "rope_theta", "partial_rotary_factor")}
    compress = {"rope_type": "default", **scaling, "rope_theta": f["compress_rope_theta"],
                "partial_rotary_factor": partial}
    if compress.get("type") and "rope_type" not in scaling:
        compress["rope_type"] = compress.pop("type")
    if compress["rope_type"] == "yarn":
        compress.setdefault("attention_factor", 1.0)
    f["rope_parameters"] = {"main": {"rope_type": "default", "rope_theta": f["rope_theta"],
                                     "partial_rotary_factor": partial}, "compress": compress}


@functools.cache
def text_config_class() -> type:
    """moelink's DeepseekV41TextConfig (a transformers PreTrainedConfig), made on first use: importing transformers
    costs a second, paid when a V4.1 config is read, not by every config reader's import."""
    from transformers import PreTrainedConfig

    class DeepseekV41TextConfig(PreTrainedConfig):
        """The text model's fields (DEFAULTS, then config.json's), the derived ones filled (module docstring)."""

        model_type = "deepseek_v41_text"

        def __init__(self, **kwargs):
            fields = {**DEFAULTS, **kwargs}
            fields.pop("layer_types", None)  # derived from kv_source_layer_ids (_derive)
            rope_scaling = fields.pop("rope_scaling", None)
            rope_parameters = fields.pop("rope_parameters", None)
            base = {k: fields.pop(k) for k in ("tie_word_embeddings", "eos_token_id") if k in fields}
            for k in ("bos_token_id", "pad_token_id", "dtype", "torch_dtype", "architectures", "quantization_config",
                      "transformers_version", "name_or_path", "_name_or_path", "output_hidden_states", "return_dict"):
                if k in fields:
                    base[k] = fields.pop(k)
            derive(fields, rope_scaling, rope_parameters)
            # the layer types after the base class's checks, whose list of types does not know V4.1's
            self.__dict__.update({k: v for k, v in fields.items() if k != "layer_types"})
            super().__init__(**base)
            self.__dict__.update(fields)

        def validate_layer_type(self) -> None:
            """V4.1's layer types ("shared_compressed_attention") are derived here and read by reader.py, which refuses
            what it cannot run naming the field; the locked transformers' list of types does not know them."""

        def validate_rope(self) -> None:
            """Two ropes by label ("main", "compress"), checked by reader.py as DeepSeek-V4's are."""

        def to_dict(self) -> dict:
            out = copy.deepcopy(self.__dict__)
            out["model_type"] = self.model_type
            return {k: v for k, v in out.items() if not k.startswith("_")}

    return DeepseekV41TextConfig


def read_config(raw: dict, transformers_knows: bool, path: str):
    """The flat text config of config.json `raw` (module docstring): transformers' own classes where
    `transformers_knows` its model_type, else DeepseekV41TextConfig; the composite's top-level quantization_config
    carried into it."""
    text = raw.get("text_config") if raw.get("model_type") == "deepseek_v41" else raw
    if not isinstance(text, dict):
        raise ValueError(f"config.json model_type='deepseek_v41' needs a text_config object (the text model's "
                         f"config); got {type(text).__name__}.")
    quant = raw.get("quantization_config", text.get("quantization_config"))
    fields = {k: v for k, v in text.items() if k not in ("model_type", "auto_map")}
    if transformers_knows:
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False).get_text_config()
    else:
        hf = text_config_class()(**fields)
    if quant is not None and getattr(hf, "quantization_config", None) is None:
        hf.quantization_config = quant
    hf.architectures = raw.get("architectures") or ["DeepseekV41ForCausalLM"]
    return hf


# -- Engram's hashing layout (engram.py runs it; make-tiny-model sizes the tables from it) ----------------------------
def _is_prime(v: int) -> bool:
    if v < 2:
        return False
    if v % 2 == 0:
        return v == 2
    return all(v % d for d in range(3, math.isqrt(v) + 1, 2))


@dataclass(frozen=True)
class EngramLayout:
    """Every Engram layer's primes [(N - 1) x heads], bucket offsets and multipliers [N] (module docstring)."""

    layers: tuple[int, ...]
    primes: tuple[tuple[tuple[int, ...], ...], ...]
    multipliers: tuple[tuple[int, ...], ...]
    max_ngram: int
    heads: int
    head_dim: int
    pad_id: int

    @classmethod
    def from_config(cls, hf: dict, vocab: int) -> "EngramLayout":
        layers = tuple(hf["engram_layer_ids"])
        N, heads, start = int(hf["engram_max_ngram_size"]), int(hf["engram_n_heads"]), int(hf["engram_vocab_size"])
        taken: set[int] = set()
        primes = []
        for _ in layers:
            per_layer = []
            for _ in range(N - 1):
                row, v = [], start - 1
                for _ in range(heads):
                    v += 1
                    while not _is_prime(v) or v in taken:
                        v += 1
                    taken.add(v)
                    row.append(v)
                per_layer.append(tuple(row))
            primes.append(tuple(per_layer))
        bound = max(1, (np.iinfo(np.int64).max // vocab) // 2)
        mults = tuple(tuple(int(x) * 2 + 1 for x in np.random.default_rng(10007 * layer).integers(
            low=0, high=bound, size=(N,), dtype=np.int64)) for layer in layers)
        return cls(layers, tuple(primes), mults, N, heads, int(hf["engram_head_dim"]), int(hf["engram_pad_id"]))

    def columns(self) -> int:
        return (self.max_ngram - 1) * self.heads

    def offsets(self, j: int) -> list[int]:
        flat = [p for per in self.primes[j] for p in per]
        return [sum(flat[:c]) for c in range(len(flat))]


def compressed_token_map(tokenizer_file: Path) -> tuple[list[int], int]:
    """(each token id's normalised id, how many there are): a token decoded alone, NFKC / NFD, accents stripped,
    lowercased, whitespace runs one space, stripped unless it is exactly one space; a token that decodes to a broken
    UTF-8 sequence keyed by its raw form; ids given in order of first appearance."""
    from tokenizers import Regex, Tokenizer, normalizers

    tok = Tokenizer.from_file(str(tokenizer_file))
    keep_space = "\ue000"  # a private-use character holds a lone space through Strip()
    norm = normalizers.Sequence([normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(),
                                 normalizers.Lowercase(), normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
                                 normalizers.Replace(Regex(r"^ $"), keep_space), normalizers.Strip(),
                                 normalizers.Replace(keep_space, " ")])
    ids: dict[str, int] = {}
    out = []
    for i in range(tok.get_vocab_size(with_added_tokens=True)):
        text = tok.decode([i], skip_special_tokens=False)
        key = tok.id_to_token(i) if "\ufffd" in text else (norm.normalize_str(text) or text)
        out.append(ids.setdefault(key, len(ids)))
    return out, len(ids)


# -- what a DSpark drafter reads (engine/spec/; the draft layers' modeling is not in transformers' main branch yet) ---
@dataclass(frozen=True)
class DSparkConfig:
    """V4.1's DSpark draft layers as config.json states them: `num_layers` draft layers (num_nextn_predict_layers,
    their tensors `mtp.{i}.*`, sliding-window attention only: `draft_attention`), drafting `block_size` tokens per
    block from an anchor, the block's other positions filled with `noise_token_id`; conditioned on the attention
    inputs of `target_layers` (each the mean over the hyper-connection streams entering that layer: the decoder's
    `ForwardContext.aux` capture after n layers gives the streams [T, hc_mult * D], blocks.LaggedHyperLayer.capture);
    a Markov head of rank `markov_rank`; an MoE of `n_routed_experts`, top `top_k`."""

    num_layers: int
    block_size: int
    noise_token_id: int
    target_layers: tuple[int, ...]
    markov_rank: int
    n_routed_experts: int
    top_k: int


def read_dspark(hf) -> DSparkConfig | None:
    """The DSpark facts of `hf` (the flat text config or its dict), or None where it has no draft layers."""
    n = int(_get(hf, "num_nextn_predict_layers", 0) or 0)
    if n <= 0:
        return None
    return DSparkConfig(n, int(_get(hf, "dspark_block_size", 5)), int(_get(hf, "dspark_noise_token_id", 0)),
                        tuple(_get(hf, "dspark_target_layer_ids") or ()), int(_get(hf, "dspark_markov_rank", 0)),
                        int(_get(hf, "dspark_n_routed_experts", 0)), int(_get(hf, "dspark_num_experts_per_tok", 0)))


def draft_attention(layers: tuple, i: int) -> SharedCompressedAttentionConfig:
    """Draft layer `i`'s attention (its index past the main layers): sliding only, the "main" rope, the main layers'
    heads, ranks and window (compress_ratios' entries past num_hidden_layers are 0)."""
    a = layers[0]
    main = next((x.rope for x in layers if not x.compress_rate), a.rope)
    return SharedCompressedAttentionConfig(a.num_heads, a.head_dim, a.q_lora_rank, a.o_groups, a.o_lora_rank,
                                           a.sliding_window, main, a.compress_rope, layer_idx=i,
                                           rms_norm_eps=a.rms_norm_eps)


__all__ = ["DEFAULTS", "DSparkConfig", "EXPERT_DTYPES", "published_format", "EngramLayout", "draft_attention", "read_dspark", "compressed_token_map", "layer_roles", "read", "read_config", "rope",
           "text_config_class"]
