"""Gemma 4's MoE text model (google/gemma-4-26B-A4B and its -it release), text only: its architecture entries
(config.py: Gemma4ForCausalLM, and the text model of the published Gemma4ForConditionalGeneration under
model.language_model., its vision and audio towers not read), config reader (reader.py) and block kinds (kinds.py:
the residual kind "gemma4" with its four sandwich norms and per-layer scalar, the FFN kind "gemma4_moe" (a dense
GELU-tanh MLP beside the routed experts in every layer, each behind norms of its own; the router's weightless norm,
its scale and per-expert scale), the embedding kind "gemma4" (x sqrt(hidden)) and the head kind "gemma4" (the final
logit softcapping)). Its attention is GQA with Gemma 4's options as GQAConfig facts: q/k norms with weights, the
weightless value norm (v_norm), softmax scale 1, sliding-window and full layers of their own head width and kv
heads, the full layers' values read from k_proj (value_from_key: attention_k_eq_v) and their "proportional" rope.
Imports nothing: engine/config reads the family's config modules (engine/config/families.py).
Its tiny checkpoints (`moelink make-tiny-model --arch`): tiny.py."""
