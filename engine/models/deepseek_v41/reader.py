"""DeepSeek-V4.1's config.json reader (engine/config/hf_readers.py calls `read`): its layers' attention
(attention_config.py, one per layer: who owns the compressed entries, who indexes, who reuses), its hyper-connections,
its MoE facts (V4's block: sqrtsoftplus routing with a correction bias, one shared expert, SwiGLU clamped at
swiglu_limit) and its Engram layers. What moelink cannot run is refused naming the field. Counted in engine/config's
floor (tests/test_layering.py): no model code, no device. `hf`: the flat text config (hf_config.read_config), or
its to_dict() (ModelConfig.hf_config).
"""
from __future__ import annotations

from moelink.moe.router_config import RouterConfig

from ..blocks.ffn_config import MoEConfig
from ..compressed_attention_config import positive_int
from ..hyper_connections_config import HyperConnectionConfig
from ..rope_config import ROPE_TYPES, RopeConfig
from ...config.refusals import unsupported
from .attention_config import SharedCompressedAttentionConfig


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
    """Per layer: its rate, its KV source, its index and candidate roles (attention_config.py's docstring)."""
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
    if c.get("quantization") is not None:
        raise unsupported("quantization_config", getattr(c["quantization"], "method", "?"), ("absent",),
                          f": {arch}'s published FP8 / FP4 files are not read yet; a float (bf16) checkpoint is")
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


__all__ = ["layer_roles", "read", "rope"]
