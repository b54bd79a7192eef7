"""Split planning for the paged-attention and MLA kernels, the host's part: how many programs share a batch's
keys (their partials merged by log-sum-exp afterwards). Host-side arithmetic on shapes and the metadata's host
lists only: no device sync. Decode (`decode_programs`) reads no length at all: its work-program count comes from
the batch size, the lanes and the SM count, and the device divides the programs among the sequences
(triton_split_plan.py), so a CUDA graph freezes nothing that a replay's lengths should change. Prefill splits
(eager only: graphs are pure decode) and MLA's mixed-batch splits read the host lengths.
"""
from __future__ import annotations

import functools

import torch
import triton

from .attention import AttentionMetadata


@functools.lru_cache(maxsize=8)
def num_sms(index: int) -> int:
    """The SM count of CUDA device `index` (cached)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def pick_splits(device: torch.device, programs: int, max_seq_len: int, block_n: int) -> int:
    """Enough splits to give every SM about two programs, never a split shorter than 2 key tiles."""
    sms = num_sms(device.index or 0) if device.type == "cuda" else 4
    want = triton.cdiv(2 * sms, max(1, programs))
    return max(1, min(want, max_seq_len // (2 * block_n), 32))


def decode_programs(device: torch.device, num_seqs: int, lanes: int, block_n: int, window: int | None = None) -> int:
    """P, the decode grid's work programs per lane (kv head, or MLA head block), for the device-side plan
    (kernels/triton_split_plan.py). From the batch size, the lanes and the SM count only, never a length: a
    CUDA graph captured at batch size b gets the plan an eager step of b sequences would.

    num_seqs (no split, no merge) when the batch alone fills the SMs; else about two programs per SM, at
    most 32 per sequence, and on a sliding layer at most window // (2 * block_n) per sequence (a split
    shorter than 2 key tiles is not worth its partial)."""
    sms = num_sms(device.index or 0) if device.type == "cuda" else 4
    if num_seqs * lanes >= sms:
        return num_seqs
    programs = min(triton.cdiv(2 * sms, max(1, lanes)), 32 * num_seqs)
    if window is not None:
        programs = min(programs, num_seqs * max(1, window // (2 * block_n)))
    return max(num_seqs, programs)


def prefill_splits(device: torch.device, programs: int, meta: AttentionMetadata, block_n: int,
                    window: int | None = None) -> int:
    """Split the keys only where it pays: some sequence has a long cached prefix (>= 16 key tiles) that
    dwarfs the largest chunk. A short prompt with no prefix has little to walk and keeps the plain
    kernels (no partials, no reduce, its decode sequences on the decode kernel)."""
    longest_prefix = max(s - q for s, q in zip(meta.seq_lens, meta.query_lens))
    if window is not None:  # a sliding layer's query block walks at most window + BLOCK_Q keys, whatever the prefix
        longest_prefix = min(longest_prefix, window)
    if longest_prefix < max(16 * block_n, 4 * meta.max_query_len):
        return 1
    return pick_splits(device, programs, keys_walked(meta.max_seq_len, window), block_n)


def keys_walked(max_seq_len: int, window: int | None) -> int:
    """The most keys one query walks: the context, or a sliding layer's window (splits beyond it would be empty)."""
    return max_seq_len if window is None else min(max_seq_len, window)
