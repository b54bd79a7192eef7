"""Speculative decoding's draft heads: the layers a device drafter runs, built from the model's own parts. The
checkpoint's next-n prediction (MTP) modules: DeepSeek's (`mtp.py`: `model.layers.{L + i}.*`), Qwen3-Next's and
Qwen3.5's (`qwen_mtp.py`: `mtp.*`), a family's own layout's from its package (engine/models/blocks/mtp.py: DeepSeek-V4's
`mtp.{i}.*`); `mtp.make_mtp_layer` picks by the registry's `mtp_layout`; and an EAGLE-3 head from a checkpoint of its own (`eagle3.py`). A floor of their own, below
the rank: the rank's loader leaves the MTP tensors of a checkpoint unread (`mtp_checkpoint_names`) and its dummy
checkpoints make them (`make_mtp_layer`), while the proposers that run them (engine/spec/proposer/) sit above it.
Must not import: benchmarks, engine, engine.api, engine.cluster, engine.core, engine.grammar, engine.kv_transfer, engine.lora.rank, engine.multimodal, engine.prompt_logprobs, engine.rank, engine.rl, engine.server, engine.spec, engine.tools.
"""
from __future__ import annotations

from .eagle3 import Eagle3Head
from .mtp import MTPLayer, make_mtp_layer, mtp_checkpoint_names
from .qwen_mtp import QwenMTPLayer

__all__ = ["Eagle3Head", "MTPLayer", "QwenMTPLayer", "make_mtp_layer", "mtp_checkpoint_names"]
