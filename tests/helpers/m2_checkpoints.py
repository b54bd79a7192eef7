"""Tiny MiniMax-M2 and MiMo-V2-Flash checkpoints built and saved by transformers itself (its own model classes,
`save_pretrained`), with the tiny tokenizer beside them: the builders live in the package
(engine/tools/tiny_families.py, what `moelink make-tiny-model --arch minimax_m2 / mimo_v2_flash` writes).

What each exercises: M2_TINY's comments there. Every parameter transformers initialises to a constant gets random values
(norm weights, biases, sinks, the correction bias), so a weight loaded into the wrong place shows.
"""
from moelink.engine.tools.tiny_families import (M2_TINY, MAX_POS, VOCAB, WINDOW, m2_config,  # noqa: F401
                                                save_m2_checkpoint)
