"""Ling's hybrid registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import PROJ, ArchSpec, Architecture

SPEC = ArchSpec("mla", moe_prefix="mlp", expert_names=PROJ, correction_bias="gate.expert_bias", checkpoint="ling")

ARCHITECTURES = (
    # Ling hybrid as published: the embedding at model.word_embeddings, every attention layer (KDA or MLA) under
    # `attention` with its output projection `dense`, the router's correction bias `mlp.gate.expert_bias` (the
    # "ling" checkpoint kind maps the names; kinds.py); experts per expert under mlp.experts; its MTP modules
    # (model.layers.{num_hidden_layers + i}.*, config.json's num_nextn_predict_layers) in the layout "ling" (mtp.py).
    Architecture("BailingHybridForCausalLM", SPEC, model_type="bailing_hybrid", mtp_layers=True, mtp_layout="ling"),
    # Ling 3.0 as vLLM registers it (BailingMoeV3ForCausalLM): the same hybrid (KDA + MLA layers, the grouped
    # sigmoid router with its expert_bias, MTP in Ling's layout) in the same published names; its config.json is
    # read by transformers' BailingHybridConfig whatever model_type the release writes.
    Architecture("BailingMoeV3ForCausalLM", SPEC, model_type="bailing_hybrid", mtp_layers=True, mtp_layout="ling",
                 alias_of="BailingHybridForCausalLM"),
)
