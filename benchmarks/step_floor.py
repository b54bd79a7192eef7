"""What a step must read and compute at least, from a model's config.json alone (no weights, no device).

Used before anything is built (`engine_decode.pick_layers`: how many layers fit) and to put a measured step beside
its floor where the benchmark runs the whole engine and cannot count what it built (`spec_decode`: the verify step
against the decode step it replaces, both against their memory floors).

Routed experts a step touches: each token picks top_k of E experts; under routing that is uniform and independent
across tokens (random weights, which every shape benchmark uses) an expert is left out by one token with
probability 1 - top_k / E, so T tokens touch E * (1 - (1 - top_k / E) ** T) on average. Trained routers are less
uniform (fewer distinct experts), so this is the floor's upper end for a given T.
"""
from __future__ import annotations


def num_experts(hf: dict) -> int:
    return hf.get("num_experts") or hf["n_routed_experts"]


def _layer_params(hf: dict) -> dict:
    """One MoE layer's parameter counts by part, from config.json (norms apart: a few hidden-wide vectors)."""
    D, N = hf["hidden_size"], hf["num_attention_heads"]
    if "kv_lora_rank" in hf:  # MLA
        C, P, Dn, Dv, Q = hf["kv_lora_rank"], hf["qk_rope_head_dim"], hf["qk_nope_head_dim"], hf["v_head_dim"], hf["q_lora_rank"]
        q = D * N * (Dn + P) if Q is None else D * Q + Q * N * (Dn + P)
        attn = q + D * (C + P) + C * N * (Dn + Dv) + N * Dv * D
    else:
        K, H = hf["num_key_value_heads"], hf.get("head_dim") or D // N
        attn = D * (N + 2 * K) * H + N * H * D
    expert = 3 * D * hf["moe_intermediate_size"]
    return dict(attention=attn, shared=expert * (hf.get("n_shared_experts") or 0), router=num_experts(hf) * D,
                expert=expert)


def estimate_layer_bytes(hf: dict, elem: int = 2) -> tuple[int, int]:
    """(bytes of one layer but its routed experts, bytes of one routed expert), from config.json alone: an upper
    bound where the first layers are dense (every layer counted as a MoE layer)."""
    p = _layer_params(hf)
    # The DeepSeek family's router weight is held in float32 (moe/layer.py: its logits are float32, as in transformers).
    router = p["router"] * (4 if str(hf.get("model_type", "")).startswith("deepseek") else elem)
    return (p["attention"] + p["shared"] + 4 * hf["hidden_size"]) * elem + router, p["expert"] * elem


def active_params_per_token(hf: dict, layers: int) -> int:
    """The layer parameters one token multiplies: attention projections, router, shared and top_k routed experts of
    every layer (each counted as a MoE layer), the embedding and the LM head apart."""
    p = _layer_params(hf)
    return layers * (p["attention"] + p["shared"] + p["router"] + hf["num_experts_per_tok"] * p["expert"])


def generate_flops(hf: dict, layers: int, requests: int, input_len: int, output_len: int) -> dict:
    """FLOPs of generating `output_len` tokens after `input_len`-token prompts, `requests` of them: the layers'
    products by their weights (`linear`: 2 x active parameters a token, every token the layers see), causal
    attention's scores and sums (`attention`: 2 x 2 x context x heads x head width a token and layer, the prefill's
    unabsorbed form for MLA) and the LM head for each generated token."""
    D, N = hf["hidden_size"], hf["num_attention_heads"]
    if "kv_lora_rank" in hf:
        width = hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"] + hf["v_head_dim"]
    else:
        width = 2 * (hf.get("head_dim") or D // N)
    seen = input_len + output_len - 1  # the last generated token is never fed back
    contexts = seen * (seen + 1) // 2  # sum of the context each token attends to, itself included
    parts = dict(linear=2 * active_params_per_token(hf, layers) * requests * seen,
                 attention=2 * layers * N * width * contexts * requests,
                 lm_head=2 * hf["vocab_size"] * D * requests * output_len)
    return dict(parts, total=sum(parts.values()))


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's datasheets, by device-name substring (first
# match): what `engine_e2e` divides the prefill rows' FLOP rates by.
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GB200", 2500.0),
                    ("B200", 2250.0))


def bf16_peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in BF16_PEAK_TFLOPS if k in device_name), None)


def kv_bytes_per_token(hf: dict, elem: int = 2) -> int:
    """One layer's cache bytes for one token (GQA: K and V per kv head; MLA: the latent and the rope key)."""
    if "kv_lora_rank" in hf:
        return elem * (hf["kv_lora_rank"] + hf["qk_rope_head_dim"])
    return elem * 2 * hf["num_key_value_heads"] * (hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])


def expected_experts_touched(hf: dict, tokens: int) -> float:
    """Distinct routed experts `tokens` tokens touch in one layer under uniform, independent routing."""
    E, k = num_experts(hf), hf["num_experts_per_tok"]
    return E * (1.0 - (1.0 - k / E) ** tokens)


def step_floor_bytes(hf: dict, layers: int, tokens: int, kv_tokens: int, elem: int = 2) -> dict:
    """The bytes one forward of `tokens` new tokens over `layers` layers must read at least: every layer's weights but
    its routed experts, the experts the tokens touch (expected), the cache of `kv_tokens` tokens in all (every
    sequence's context, the new tokens included), the embedding rows and the LM head once."""
    dense, expert = estimate_layer_bytes(hf, elem)
    touched = expected_experts_touched(hf, tokens)
    D = hf["hidden_size"]
    parts = dict(weights_but_experts=layers * dense, routed_experts=round(layers * touched * expert),
                 kv=layers * kv_tokens * kv_bytes_per_token(hf, elem), head=(hf["vocab_size"] + tokens) * D * elem)
    return dict(parts, total=sum(parts.values()), experts_touched_per_layer=touched, tokens=tokens, layers=layers)
