"""Tiny DeepSeek-V3 / V2, GLM-4-MoE, Qwen3-Next, Qwen3.5-MoE, DeepSeek-V3.2 and GLM-5 checkpoints built and saved by
transformers itself: the builders live in the package (engine/tools/tiny_families.py, what `moelink make-tiny-model`
writes); this module names them for the tests.

Each is transformers' own model class on a tiny config (hidden 32-48, 2-5 layers), randomly initialised with a fixed
seed, made float64 and written by `save_pretrained`, with the tiny tokenizer beside it. Together the HF_TINY configs
cover what issue 13 asks of each architecture (module docstring of tiny_families.py).
"""
from moelink.engine.tools.tiny_families import (HF_DSA, HF_DSA_FP8, HF_HYBRID, HF_TINY, MAX_POS, VOCAB,  # noqa: F401
                                                hf_config, save_hf_checkpoint)
