"""A step's inputs on the device: token ids (with the tokens earlier steps left there), positions and attention
metadata, from the host-built flat batch (engine/rank/step_inputs.py). The eager forward reads them, and so does
the MTP drafter (engine/spec/proposer/mtp.py), under decode graphs too.

Legend: T tokens of the flat batch, P tokens of it still on the device.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from moelink.kernels.attention import AttentionMetadata

from ..contract.host_copy import to_device
from .step_inputs import StepInputs


@dataclass
class StepTensors:
    input_ids_T: torch.Tensor  # int64 [T]
    positions_T: torch.Tensor  # int64 [T]
    attn: AttentionMetadata
    attn_sliding: AttentionMetadata | None  # the sliding group's, when it has its own table


def device_inputs(inp: StepInputs, pending_P: tuple[torch.Tensor, torch.Tensor] | None, device: torch.device,
                  null_block: int) -> StepTensors:
    """Non-blocking copies of the step's host arrays; `pending_P` (flat indices [P], ids [P]) scattered into the ids."""
    input_ids_T = to_device(inp.tokens_T, torch.long, device)
    if pending_P is not None:
        input_ids_T.index_copy_(0, pending_P[0], pending_P[1])
    attn = AttentionMetadata(
        query_start_loc_S1=to_device(inp.qsl_S1, torch.int32, device),
        seq_lens_S=to_device(inp.seq_lens, torch.int32, device),
        block_tables_SM=to_device(inp.tables_SM, torch.int32, device),
        slot_mapping_T=to_device(inp.slots_T, torch.long, device),
        query_lens=inp.query_lens, seq_lens=inp.seq_lens,
        max_query_len=max(inp.query_lens), max_seq_len=max(inp.seq_lens), null_block=null_block,
    )
    attn_sliding = None
    if inp.sliding is not None:
        attn_sliding = dataclasses.replace(
            attn, block_tables_SM=to_device(inp.sliding[0], torch.int32, device),
            slot_mapping_T=to_device(inp.sliding[1], torch.long, device))
    return StepTensors(input_ids_T, to_device(inp.positions_T, torch.long, device), attn, attn_sliding)


__all__ = ["StepTensors", "device_inputs"]
