"""Tiny gpt-oss checkpoints built and saved by transformers itself (GptOssForCausalLM + `save_pretrained`): the builder
lives in the package (engine/models/gpt_oss/tiny.py, what `moelink make-tiny-model --arch gpt_oss` writes).

The config exercises what gpt-oss adds: layer_types alternating sliding / full attention with a 6-token window (so
prompts of 1-40 tokens run past it), q/k/v/o biases, per-head sinks, a router bias, expert biases, the clamped SwiGLU
with a small swiglu_limit (0.6, so the clamps engage on these activations), YaRN rope with `truncate: false`, GQA (4
heads over 2 kv heads), 5 experts (not a power of two), top-2. Every parameter is drawn there.
"""
from moelink.engine.models.gpt_oss.tiny import GPT_OSS_YARN as YARN  # noqa: F401
from moelink.engine.models.gpt_oss.tiny import gpt_oss_config, save_gpt_oss  # noqa: F401
from moelink.engine.tools.tiny_families import MAX_POS, VOCAB, WINDOW  # noqa: F401
