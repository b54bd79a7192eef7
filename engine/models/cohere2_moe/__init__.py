"""Cohere2-MoE (Cohere2MoeForCausalLM): its architecture entry (config.py), config reader (reader.py) and block
kinds (kinds.py: the parallel decoder layer behind one norm, the shared "parallel" residual kind with Cohere's
LayerNorm where config.json names no rms_norm_eps; the final norm the same; the checkpoint kind folding logit_scale
and the "average" shared-expert combination into weights). Its attention: GQA with Cohere's interleaved rope on the
sliding-window layers, the full-attention layers without rotary (NoPE) but for the dense prefix layers
transformers rotates (force_rope); routed experts (top-k of the logits, softmax or sigmoid over those k) and
optional shared experts. Imports nothing: engine/config reads the family's config modules
(engine/config/families.py). Its tiny checkpoints (`moelink make-tiny-model --arch`): tiny.py."""
