"""LongCat-Flash's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import PROJ, ArchSpec, Architecture

ARCHITECTURES = (
    # LongCat-Flash-Chat / -Thinking: the engine runs each transformers layer as two layers (its two sublayers: MLA
    # + a dense MLP each, the routed experts on the first), so num_hidden_layers (2 * num_layers) layers, each with
    # its own MLA cache, as transformers' cache indexes them; the routed experts per expert under mlp.experts, the
    # router at mlp.router.classifier with its correction bias beside it; its one MTP module (model.mtp.*; config.json
    # names no count) is read by speculative method "mtp" only (engine/models/longcat_flash/mtp.py).
    Architecture("LongcatFlashForCausalLM",
                 ArchSpec("mla", moe_prefix="mlp", expert_names=PROJ, router="router.classifier",
                          correction_bias="router.e_score_correction_bias",
                          residual="shortcut_pair", sublayers=2),
                 model_type="longcat_flash", mtp_layers=True, mtp_layout="longcat", mtp_unstated=1),
)
