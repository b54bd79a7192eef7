"""ERNIE-4.5-MoE's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

from moelink.moe.router_config import RouterConfig

from ..blocks.ffn_config import MoEConfig
from ...config.refusals import unsupported
from ...config.reader_parts import gqa, rope_config


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """ERNIE-4.5-MoE as transformers 5.24 builds it (Ernie4_5_MoeForCausalLM): GQA whose rope rotates interleaved
    pairs (2i, 2i + 1) over the whole head (run as neox on rows de-interleaved at load: GQAConfig's rope style
    "interleaved"); layer i routed when (i + 1) % moe_layer_interval == 0 and moe_layer_start_index <= i <=
    moe_layer_end_index (-1: the last layer), else a dense MLP of intermediate_size. A routed layer: a float32
    router, softmax over every expert, the top-k of softmax + e_score_correction_bias, weighted by the unbiased
    probabilities divided by max(their sum, moe_norm_min), plus moe_num_shared_experts x moe_intermediate_size of
    shared MLP. use_bias (biases on every linear, the MLPs' too) is refused: the published models have none."""
    if getattr(hf, "use_bias", False):
        raise unsupported("use_bias", True, (False,), f" for {arch} (moelink's MLPs have no biases)")
    layers, E, k = c["num_layers"], int(hf.moe_num_experts), c["top_k"]
    start, end, every = (getattr(hf, n) for n in ("moe_layer_start_index", "moe_layer_end_index",
                                                  "moe_layer_interval"))
    for name, v in (("moe_layer_start_index", start), ("moe_layer_end_index", end)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise unsupported(name, v, "an integer >= 0 (moe_layer_end_index -1: the last layer)")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise unsupported("moe_layer_interval", every, "an integer >= 1")
    sparse = tuple(i for i in range(layers) if (i + 1) % every == 0 and start <= i <= end)
    if not sparse:
        raise unsupported("moe_layer_start_index", start, f"a range with at least one routed layer "
                                                          f"(moe_layer_end_index={end}, moe_layer_interval={every})")
    # The top-k of E softmax probabilities sum to at least k / E, so a floor below that never binds: the weights
    # are renormalised. A floor that could bind divides by it instead, which moelink's routers do not.
    norm_min = getattr(hf, "moe_norm_min", 1e-12)
    if isinstance(norm_min, bool) or not isinstance(norm_min, (int, float)) or not 0 <= norm_min < k / E:
        raise unsupported("moe_norm_min", norm_min, f"a number in [0, num_experts_per_tok / num_experts = {k / E}) "
                                                    f"(a floor the top-k weights' sum can reach is not implemented)")
    shared = getattr(hf, "moe_num_shared_experts", 0) or 0
    if isinstance(shared, bool) or not isinstance(shared, int) or shared < 0:
        raise unsupported("moe_num_shared_experts", shared, "an integer >= 0")
    # transformers: the router's linear and softmax in float32 (autocast off), selection on softmax + bias.
    router = RouterConfig(E, k, "softmax", "noaux_tc", 1, 1, norm_topk_prob=True, float32_logits=True)
    return dict(num_experts=E, moe_intermediate_size=int(hf.moe_intermediate_size),
                intermediate_size=int(hf.intermediate_size), norm_topk_prob=True, sparse_layers=sparse,
                moe=MoEConfig(router, n_shared_experts=shared),
                attention=gqa(c, rope_config(rope, c, c["head_dim"], style="interleaved")))


__all__ = ["read"]
