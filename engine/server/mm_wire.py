"""smg's gRPC MultimodalInputs (vllm.grpc.engine, GenerateRequest.mm_inputs, and extra_mm_inputs for a second
modality's batch) read into the Python API's preprocessed form: {"pixel_values": [P, C] float tensor,
"image_grid_thw": [N, 3] int64 tensor} for an image batch, {"pixel_values_videos": ..., "video_grid_thw": ...} for a
video batch (modality VIDEO) (engine/multimodal/preprocessed.py checks it against the checkpoint;
docs/multimodal.md).

What is read: the inline pixel_values and model_specific_tensors["image_grid_thw"] or ["video_grid_thw"] (and
"patches_per_image" / "patches_per_video", smg's split of the flat pixel rows, checked against the grids);
im_token_id, when set, must be the checkpoint's placeholder of the batch's modality. Taken, not read: a video
batch's "second_per_grid_ts" / "video_second_per_grid" (Qwen3.5's positions read no timing: the processor wrote each
frame's timestamp into the ids). What is not taken: audio, a modality the server has off, payloads in shared memory
or remote handles, another encoder input key, other model tensors, each refused naming the field. Not read:
mm_placeholders (recomputed from the ids, which must hold one run of placeholders per image, per video frame),
mm_hashes (the prefix cache's salt is hashed from the pixels here: a hash
sent for other pixels would share their KV; a decode leg without pixels is keyed by the hashes the prefill server
itself computed, relayed in kv_transfer_params_json's mm_hashes, never by these), batched_keys / flat_keys / keep_on_cpu_keys (their meaning for Qwen-VL
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


# Per modality: the pixel key and grid key of the Python API's form, smg's split of the flat rows, and the
# tensors taken but not read (Qwen3.5's positions read no timing: each frame's timestamp is text in the ids).
_WIRE = {"image": ("pixel_values", "image_grid_thw", "patches_per_image", ()),
         "video": ("pixel_values_videos", "video_grid_thw", "patches_per_video",
                   ("second_per_grid_ts", "video_second_per_grid"))}


def media_from_proto(mm, token_ids: dict[str, int | None], field: str = "mm_inputs",
                     grids_alone: bool = False) -> tuple[str, dict]:
    """One MultimodalInputs batch (GenerateRequest.mm_inputs or an extra_mm_inputs entry) as (its modality, the
    Python API's preprocessed form of it); `token_ids`: the checkpoint's placeholder per modality (None: not
    taken). `grids_alone`: a decode request whose kv_transfer_params relay the prefill server's item hashes may
    come without pixel_values (smg's PD mode): its form then holds the grids alone. Module docstring."""
    modality = {0: "image", 1: "image", 3: "video"}.get(mm.modality)  # MODALITY_UNSPECIFIED reads as image
    if modality is None or token_ids.get(modality) is None:
        taken = ", ".join(k for k, v in token_ids.items() if v is not None)
        raise ValueError(f"{field}.modality={mm.modality} is not supported: this server takes {taken} "
                         "(docs/multimodal.md).")
    pix_key, grid_key, per_key, unread = _WIRE[modality]
    if mm.HasField("encoder_input_key") and mm.encoder_input_key not in ("pixel_values", pix_key):
        raise ValueError(f"{field}.encoder_input_key={mm.encoder_input_key!r} is not supported: pixel_values only.")
    if mm.HasField("im_token_id") and mm.im_token_id != token_ids[modality]:
        raise ValueError(f"{field}.im_token_id={mm.im_token_id} is not this checkpoint's {modality} token "
                         f"({token_ids[modality]}).")
    tensors = mm.model_specific_tensors
    extra = sorted(set(tensors) - {grid_key, per_key, *unread})
    if extra:
        raise ValueError(f"{field}.model_specific_tensors[{extra[0]!r}] is not supported: {grid_key} (and "
                         f"{per_key}) only.")
    if grid_key not in tensors or not (mm.HasField("pixel_values") or grids_alone):
        raise ValueError(f"{field} needs pixel_values and model_specific_tensors[{grid_key!r}].")
    grid_N3 = _tensor(tensors[grid_key], f"{field}.model_specific_tensors[{grid_key!r}]")
    if per_key in tensors:  # smg's split of the flat pixel rows (flat_keys): the grids' own counts
        per_N = _tensor(tensors[per_key], f"{field}.model_specific_tensors[{per_key!r}]")
        if grid_N3.dim() != 2 or per_N.reshape(-1).tolist() != grid_N3.to(torch.int64).prod(-1).tolist():
            raise ValueError(f"{field}.model_specific_tensors[{per_key!r}]={per_N.reshape(-1).tolist()} "
                             f"is not the {modality} grids' t x h x w.")
    if not mm.HasField("pixel_values"):
        return modality, {grid_key: grid_N3}
    return modality, {pix_key: _tensor(mm.pixel_values, f"{field}.pixel_values"), grid_key: grid_N3}


__all__ = ["media_from_proto"]
