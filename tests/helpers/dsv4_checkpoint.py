"""A tiny DeepSeek-V4 checkpoint built and saved by transformers itself (DeepseekV4ForCausalLM, float64): the builder
lives in the package (engine/models/deepseek_v4/tiny.py, what `moelink make-tiny-model --arch deepseek_v4` writes).

Small enough to run in a test, shaped so every V4 part is exercised by prompts of 1..150 tokens: one layer of each
attention kind (sliding only, compressed sparse attention at rate 2 with an indexer top-4 (16 index heads keep exact
ties of the index scores, a key every head scores 0, out of the top-k boundary), heavily compressed attention at rate
8), a window of 6 tokens (shorter than most prompts), three hyper-connection streams, two hash-routed MoE layers with a
random token-id table, sqrtsoftplus routing with a correction bias after them, a shared expert, and SwiGLU clamped at
a limit the random weights reach. What transformers initialises to constants is randomised.
"""
from pathlib import Path

from moelink.engine.models.deepseek_v4.tiny import (CSA_RATE, DSV4_TINY, HCA_RATE,  # noqa: F401
                                                    build_dsv4_model, dsv4_config, save_dsv4_checkpoint)
from moelink.engine.tools.tiny_families import MAX_POS, VOCAB, save_tokenizer  # noqa: F401


def _save_tokenizer(out: Path) -> None:
    save_tokenizer(out)
