"""DeepSeek-V4.1's tiny checkpoint: `moelink make-tiny-model --arch deepseek_v41`. The locked transformers cannot
build V4.1, so the family draws the weights itself (seeded normal draws, what transformers initialises to constants
drawn too), in transformers' names and layout (what DeepseekV41ForCausalLM.save_pretrained writes: the config.json
flat, model_type `deepseek_v41_text`), beside the tiny tokenizer; the Engram tables are sized from the tokenizer's
normalised vocabulary as the published ones are. The test suite's parity checkpoint (tests/fixtures/deepseek_v41/) is
the one transformers' main-branch classes wrote, with the same config (V41_TINY).

Every V4.1 mechanism at least once, at sizes the fake-quantization points act on (head_dim 64: the window's FP8
blocks of 32, the entries' FP4 blocks of 16; index_head_dim 32: the indexer's FP4 blocks of 32): a sliding-only layer
(0), a rate-2 group (source 1: compressor and indexer; 2 and 3 reuse its entries and picks), a rate-1 group (source 4,
the two-level top-k's candidate source; 5 reuses; 6 re-indexes inside the candidates; 7 reuses 6's picks), Engram
tables at layers 1 and 5 (3-grams, 2 heads), three hyper-connection streams, yarn on the compress rope, a window of
6 tokens and an index top-4 over 16 index heads (an entry every head scores 0 ties with others: with few heads such
ties reach the top-k boundary, where transformers and moelink may keep different ones); experts 32 wide (the
published FP4 format packs 32 values a scale).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

from ...tools.file_modes import umask_mode
from ...tools.tiny_families import MAX_POS, VOCAB, TinyArch, save_tokenizer

V41_TINY = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=1, head_dim=64,
    q_lora_rank=16, qk_rope_head_dim=16, rope_theta=10000.0, compress_rope_theta=40000.0,
    rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32, "beta_slow": 1,
                  "original_max_position_embeddings": 128},
    max_position_embeddings=MAX_POS, sliding_window=6, compress_ratios=[0, 2, 2, 2, 1, 1, 1, 1],
    kv_source_layer_ids=[1, 4], index_source_layer_ids=[1, 4, 6], candidate_source_layer_id=4,
    candidate_topk_blocks=2, candidate_block_size=4, index_n_heads=16, index_head_dim=32, index_topk=4,
    o_groups=2, o_lora_rank=8, moe_intermediate_size=32, n_routed_experts=6, n_shared_experts=1,
    num_experts_per_tok=2, routed_scaling_factor=1.5, swiglu_limit=0.6, hc_mult=3, hc_sinkhorn_iters=6,
    engram_layer_ids=[1, 5], engram_vocab_size=40, engram_max_ngram_size=3, engram_n_heads=2, engram_head_dim=32,
    engram_pad_id=2, num_nextn_predict_layers=0, dspark_noise_token_id=VOCAB - 1, rms_norm_eps=1e-6,
    initializer_range=0.1, eos_token_id=None,
)


def shapes(hf) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint `hf` (the flat text config) describes, by transformers' name."""
    from .reader import layer_roles

    g = hf.get
    D, V, N, H, Q = g("hidden_size"), g("vocab_size"), g("num_attention_heads"), g("head_dim"), g("q_lora_rank")
    G, O, n, Im, E = g("o_groups"), g("o_lora_rank"), g("hc_mult"), g("moe_intermediate_size"), g("n_routed_experts")
    nI, I = g("index_n_heads"), g("index_head_dim")
    out: dict[str, tuple[int, ...]] = {"model.embed.weight": (V, D), "lm_head.weight": (V, D), "model.norm.weight": (D,)}
    engram = list(g("engram_layer_ids") or [])
    cols = (g("engram_max_ngram_size") - 1) * g("engram_n_heads") * g("engram_head_dim")
    for i, role in enumerate(layer_roles(hf, g("num_hidden_layers"))):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.attn."
        out.update({a + "wq_a.weight": (Q, D), a + "q_norm.weight": (Q,), a + "wq_b.weight": (N * H, Q),
                    a + "wkv.weight": (H, D), a + "kv_norm.weight": (H,), a + "wo_a.weight": (G * O, N * H // G),
                    a + "wo_b.weight": (D, G * O), a + "attn_sink": (N,), p + "attn_norm.weight": (D,),
                    p + "ffn_norm.weight": (D,), p + "ffn.gate.weight": (E, D), p + "ffn.gate.bias": (E,),
                    p + "ffn.gate.bias_vl": (E,)})
        if role["source"] == i:
            out.update({a + "compressor.wkv.weight": (H, D), a + "compressor.norm.weight": (H,)})
            if role["compress_rate"] > 1:
                out[a + "compressor.wgate.weight"] = (H, D)
        if role["index"] in ("keys", "reindex"):
            out.update({a + "indexer.wq_b.weight": (nI * I, Q), a + "indexer.weights_proj.weight": (nI, D)})
        if role["index"] == "keys":
            out.update({a + "indexer.wk.weight": (I, H), a + "indexer.k_norm.weight": (I,)})
        for site in ("attn", "ffn"):
            out.update({f"{p}hc_{site}_fn": ((2 + n) * n, n * D), f"{p}hc_{site}_base": ((2 + n) * n,),
                        f"{p}hc_{site}_scale": (3,)})
        for e in [*(f"experts.{e}" for e in range(E)), "shared_experts"]:
            out.update({f"{p}ffn.{e}.w1.weight": (Im, D), f"{p}ffn.{e}.w3.weight": (Im, D),
                        f"{p}ffn.{e}.w2.weight": (D, Im)})
        if i in engram:
            rows, hd = g("engram_num_embeddings")[engram.index(i)], g("engram_head_dim")
            out.update({p + "engram.embed.weight": (rows, hd), p + "engram.embed.scale": (rows, hd // 32),
                        p + "engram.wkv.weight": (D * (n + 1), cols), p + "engram.q_weight": (n, D),
                        p + "engram.k_weight": (n, D)})
    return out


def _draw(name: str, shape: tuple[int, ...], g: torch.Generator, std: float) -> torch.Tensor:
    """A seeded draw: around 1 for the norms, scales and the Engram weights' factors, around 0 elsewhere."""
    r = torch.randn(shape, generator=g, dtype=torch.float64)
    leaf = name.rsplit(".", 1)[-1] if not name.endswith(".weight") else name.rsplit(".", 2)[-2]
    if "norm" in leaf or leaf in ("hc_attn_scale", "hc_ffn_scale", "q_weight", "k_weight", "scale"):
        return 1.0 + 0.1 * r
    if leaf in ("attn_sink", "hc_attn_base", "hc_ffn_base"):
        return 0.5 * r
    if leaf in ("bias", "bias_vl"):
        return 0.05 * r
    return std * r


def write_tiny(out: Path, *, seed: int = 0, dtype: torch.dtype = torch.float64, fmt: str = "float",
               overrides: Mapping = {}) -> str:
    """The tiny V4.1 (module docstring) into `out`: config.json, model.safetensors, the tiny tokenizer."""
    from safetensors.torch import save_file

    from .reader import EngramLayout, compressed_token_map, read_config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fields = {**V41_TINY, **overrides}
    save_tokenizer(out, type("Cfg", (), {"vocab_size": fields["vocab_size"],
                                         "max_position_embeddings": fields["max_position_embeddings"]})())
    _, vocab = compressed_token_map(out / "tokenizer.json")
    fields["engram_compressed_vocab_size"] = vocab
    if fields.get("engram_layer_ids"):
        layout = EngramLayout.from_config(fields, vocab)
        fields["engram_num_embeddings"] = [sum(p for per in layer for p in per) for layer in layout.primes]
    raw = {"architectures": ["DeepseekV41ForCausalLM"], "model_type": "deepseek_v41_text", "dtype": str(dtype)[6:],
           **fields}
    hf = read_config(raw, False, str(out)).to_dict()
    g = torch.Generator().manual_seed(seed)
    tensors = {name: _draw(name, s, g, float(fields["initializer_range"])).to(dtype)
               for name, s in shapes(hf).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    umask_mode([out / "model.safetensors"])
    return str(out)


ARCHS = {
    "deepseek_v41": TinyArch("DeepseekV41ForCausalLM", "DeepSeek-V4.1 (Flash)", ("float",), write=write_tiny),
}

__all__ = ["ARCHS", "V41_TINY", "shapes", "write_tiny"]
