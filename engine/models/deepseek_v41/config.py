"""DeepSeek-V4.1's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import ArchSpec, Architecture

ARCHITECTURES = (
    # DeepSeek-V4.1 (Flash; reader.py): V4's latent shared-KV attention with sinks and a grouped output projection,
    # its compressed KV produced once per group of layers (CSA2: a KV-source layer's compressor and indexer, the
    # layers after it reusing its entries and its top-k, a two-level candidate top-k), hyper-connections whose
    # collapse uses the previous site's mix (lagged), Engram n-gram memory at some layers, V4's MoE block. Its
    # checkpoint names are transformers' (model.layers.{i}.attn.wq_a, ffn.experts.{e}.w1, hc_attn_fn, model.embed,
    # lm_head) or DeepSeek's (the same without `model.`, embed, head). The vision tower (vision.*, aligner.*) is
    # not read; the DSpark draft layers (mtp.*) are read by speculative method "dspark" alone (dspark.py).
    Architecture("DeepseekV41ForCausalLM", ArchSpec("shared_compressed", moe_prefix="ffn",
                                                    expert_names=("w1", "w3", "w2"), correction_bias="gate.bias",
                                                    residual="lagged_hyper", ffn="token_routed",
                                                    embedding="hc_lagged", head="hc_lagged_head", checkpoint="v41",
                                                    unread_prefixes=("mtp.", "model.mtp.", "vision.", "aligner.")),
                 model_type="deepseek_v41_text"),
)
# Both config.json shapes (the released composite, transformers' flat text config) are read by reader.read_config.
OWN_CONFIGS = {"deepseek_v41": "reader", "deepseek_v41_text": "reader"}
