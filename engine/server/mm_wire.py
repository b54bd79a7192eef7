"""smg's gRPC MultimodalInputs (vllm.grpc.engine, GenerateRequest.mm_inputs) read into the Python API's preprocessed
form: {"pixel_values": [P, C] float tensor, "image_grid_thw": [N, 3] int64 tensor} (engine/multimodal/processor.py
ImageProcessor.process_preprocessed checks it against the checkpoint; docs/multimodal.md).

What is read: the inline pixel_values and model_specific_tensors["image_grid_thw"] (and "patches_per_image", smg's
split of the flat pixel rows, checked against the grids); im_token_id, when set, must be the checkpoint's. What is not taken: video, payloads in shared memory or remote handles, another encoder input key,
other model tensors, each refused naming the field. Not read: mm_placeholders (recomputed from the ids, which must
hold one run of placeholders per image), mm_hashes (the prefix cache's salt is hashed from the pixels here: a hash
sent for other pixels would share their KV), batched_keys / flat_keys / keep_on_cpu_keys (their meaning for Qwen-VL
is fixed).
"""
from __future__ import annotations

import numpy as np
import torch

_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "uint32": np.uint32}


def _tensor(td, field: str) -> torch.Tensor:
    which = td.WhichOneof("payload")
    if which != "inline":
        raise ValueError(f"{field}: a {which or 'missing'} payload is not supported: send the tensor inline.")
    shape = [int(d) for d in td.shape]
    if td.dtype == "bfloat16":  # numpy has none: the raw 16 bits, widened the way bfloat16 widens to float32
        raw = np.frombuffer(td.inline, dtype="<u2")
        arr = (raw.astype(np.uint32) << 16).view(np.float32)
    elif td.dtype in _DTYPES:
        arr = np.frombuffer(td.inline, dtype=np.dtype(_DTYPES[td.dtype]).newbyteorder("<"))
    else:
        raise ValueError(f"{field}.dtype={td.dtype!r} is not supported: allowed: bfloat16, {', '.join(_DTYPES)}.")
    if int(np.prod(shape)) != arr.size:
        raise ValueError(f"{field} holds {arr.size} values for shape {shape}.")
    return torch.from_numpy(arr.reshape(shape).astype(arr.dtype.newbyteorder("=")))


def images_from_proto(mm, image_token_id: int) -> dict:
    """GenerateRequest.mm_inputs as the Python API's preprocessed images (module docstring)."""
    if mm.modality not in (0, 1):  # MODALITY_UNSPECIFIED (image) or IMAGE
        raise ValueError(f"mm_inputs.modality={mm.modality} is not supported: images only (video is not built; "
                         "docs/multimodal.md).")
    if mm.HasField("encoder_input_key") and mm.encoder_input_key != "pixel_values":
        raise ValueError(f"mm_inputs.encoder_input_key={mm.encoder_input_key!r} is not supported: pixel_values only.")
    if mm.HasField("im_token_id") and mm.im_token_id != image_token_id:
        raise ValueError(f"mm_inputs.im_token_id={mm.im_token_id} is not this checkpoint's image token "
                         f"({image_token_id}).")
    tensors = mm.model_specific_tensors
    extra = sorted(set(tensors) - {"image_grid_thw", "patches_per_image"})
    if extra:
        raise ValueError(f"mm_inputs.model_specific_tensors[{extra[0]!r}] is not supported: image_grid_thw (and "
                         "patches_per_image) only.")
    if "image_grid_thw" not in tensors or not mm.HasField("pixel_values"):
        raise ValueError("mm_inputs needs pixel_values and model_specific_tensors['image_grid_thw'].")
    grid_N3 = _tensor(tensors["image_grid_thw"], "mm_inputs.model_specific_tensors['image_grid_thw']")
    if "patches_per_image" in tensors:  # smg's split of the flat pixel rows (flat_keys): the grids' own counts
        per_N = _tensor(tensors["patches_per_image"], "mm_inputs.model_specific_tensors['patches_per_image']")
        if grid_N3.dim() != 2 or per_N.reshape(-1).tolist() != grid_N3.to(torch.int64).prod(-1).tolist():
            raise ValueError(f"mm_inputs.model_specific_tensors['patches_per_image']={per_N.reshape(-1).tolist()} "
                             "is not the image grids' t x h x w.")
    return {"pixel_values": _tensor(mm.pixel_values, "mm_inputs.pixel_values"), "image_grid_thw": grid_N3}


__all__ = ["images_from_proto"]
