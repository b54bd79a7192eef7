"""Images into a multimodal MoE checkpoint (Qwen3.5-MoE; docs/multimodal.md), one feature package with a typed seam:

- driver side (`processor.py`): the checkpoint's own transformers processor turns a prompt and its images into
  token ids (placeholders expanded), pixel patches, grids, per-image hashes and Qwen's 3-D rotary positions, one
  `MultimodalInputs` (`inputs.py`) that travels with the request to its rank (scheduler NewRequestData.multimodal);
  its hashes salt the prefix cache (Request.cache_salt).
- rank side (`encoder.py`, `rank_side.py`): transformers' own vision module of the checkpoint (its `visual`
  submodule's class, built from vision_config and loaded with the checkpoint's model.visual.* tensors: the
  reference and the CPU path) encodes each image once (an LRU cache by image hash, bounded in bytes); each step
  gets the rows to splice over the image placeholders and every token's 3-D positions (models/layers.ImageSplice).

Must not import: benchmarks, engine, engine.api, engine.cluster, engine.core, engine.kv_transfer, engine.lora, engine.models, engine.rank, engine.rl, engine.server, engine.spec, engine.spec.heads, engine.state, engine.tools.
"""
