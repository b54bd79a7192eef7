"""Images and videos into a multimodal MoE checkpoint (Qwen3.5-MoE, Kimi K2.5; docs/multimodal.md), one feature
package with a typed seam; what differs between families is one VisionSpec each, which the family registers from
its own package (engine/models/<family>/vision.py, into `spec.py`'s VISION_SPECS: the image submodules, their
prefixes, the positions, the pixel layout, whether its videos run):

- driver side (`processor.py`): the checkpoint's own transformers processor turns a prompt and its images into
  token ids (placeholders expanded), pixel patches, grids, per-image hashes and (Qwen) 3-D rotary positions, one
  `MultimodalInputs` (`inputs.py`) that travels with the request to its rank (scheduler NewRequestData.multimodal);
  its hashes salt the prefix cache (Request.cache_salt). The processor's outputs sent with token ids (images, and
  Qwen3.5's videos: its video processor needs torchvision) are checked in `preprocessed.py`.
- rank side (`encoder.py`, `rank_side.py`): transformers' own image modules of the checkpoint (Qwen3.5's `visual`,
  Kimi K2.5's `vision_tower` and `mm_projector`, loaded with the checkpoint's tensors; the model class's own
  get_image_features runs them, get_video_features a video: the reference and the CPU path) encodes each item
  once (an LRU cache by item hash, bounded in bytes); each step gets the rows to splice over the placeholders and,
  for Qwen's 3-D rotary, every token's positions (contract/forward_inputs.ImageSplice).

Must not import: benchmarks, engine, engine.api, engine.cluster, engine.core, engine.grammar, engine.kv_transfer, engine.lora, engine.lora.rank, engine.models, engine.prompt_logprobs, engine.rank, engine.rl, engine.server, engine.spec, engine.spec.heads, engine.state, engine.tools.
"""
