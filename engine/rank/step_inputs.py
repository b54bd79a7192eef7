"""One step's inputs: the flat batch built on the host from the runner's request states (`StepInputs`, numpy),
and its copy on the device (`StepTensors`: token ids with the tokens earlier steps left there, positions and
attention metadata). The eager forward reads the device copy, and so does the MTP drafter
(engine/spec/proposer/mtp.py), under decode graphs too.

Legend: T scheduled tokens in the flat batch, S sequences, M max blocks per sequence, R rows that sample,
P tokens of the batch still on the device (sampled by a step in flight).

The overlapped loop (async scheduling) launches step N+1 before the host knows the tokens step N sampled. A
request whose next token is such a token computes the position right after its last known token; that
token's slot in the flat batch holds 0 here and is filled on the device from step N's sampled ids
(`pending_dst_P` ← the source step's rows `pending_src`), in stream order, so the host never waits for it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from moelink.kernels.attention import AttentionMetadata
from moelink.scheduler.sliding_kv import first_live_sliding_block

from ..contract.host_copy import to_device

if TYPE_CHECKING:
    from .step_handle import StepHandle


@dataclass
class StepInputs:
    tokens_T: np.ndarray  # int64 [T]; 0 where the token is still on the device
    positions_T: np.ndarray  # int64 [T]
    slots_T: np.ndarray  # int64 [T]: KV slot of each token
    tables_SM: np.ndarray  # int32 [S, M]
    seq_lens: list[int]
    query_lens: list[int]
    qsl_S1: np.ndarray  # int32 [S + 1]: query start of each sequence in the flat batch
    # The sliding group's (tables [S, M'], slots [T]) when it has its own table; None otherwise.
    sliding: tuple[np.ndarray, np.ndarray] | None
    # Sequences that sample this step (their chunk reaches past their last known token), and for each how
    # many of its output tokens are still on the device (min_tokens and penalties count them).
    sample_rows: list[int] = field(default_factory=list)
    num_pending: list[int] = field(default_factory=list)
    # Tokens to take from earlier steps' sampled ids on the device: flat indices, and per source step the
    # rows of its sampled ids, in the order of pending_dst_P.
    pending_dst_P: np.ndarray | None = None
    pending_src: list[tuple[StepHandle, list[int]]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens_T)

    @property
    def pure_decode(self) -> bool:
        return len(self.tokens_T) == len(self.query_lens)


def build_step_inputs(states: list, query_lens: list[int], block_size: int, sliding_window: int | None = None,
                      null_block: int = -1, tables_SM: np.ndarray | None = None,
                      spec_tokens: list[list[int] | None] | None = None) -> StepInputs:
    """The flat batch of `states` (CachedRequestState, in batch order) computing `query_lens[s]` tokens each
    from their `num_computed_tokens`. Vectorised over the batch: only the token gather loops per sequence.
    `tables_SM`: the sequences' block tables gathered from the runner's persistent batch (input_batch.py);
    None: built here from each state's `block_arr`. `spec_tokens[s]`: the draft tokens sequence s verifies
    after its last known token (speculative decoding; counted in its query length), or None."""
    bs = block_size
    num_seqs = len(states)
    starts = [st.num_computed_tokens for st in states]
    seq_lens = [c + n for c, n in zip(starts, query_lens)]
    pending_dst: list[int] = []
    pending_src: dict[int, tuple[StepHandle, list[int]]] = {}
    sample_rows: list[int] = []
    num_pending: list[int] = []
    if max(query_lens) == 1:  # pure decode: one token per sequence, one pass over the batch
        tokens = [0] * num_seqs
        for s, st in enumerate(states):
            known = st.all_token_ids
            c = starts[s]
            pending = st.pending
            in_flight = 0 if pending is None else 1
            if c < len(known):
                tokens[s] = known[c]
            elif pending is not None and c == len(known):  # the token the previous step sampled, on the device
                src = pending_src.get(id(pending[0]))
                if src is None:
                    src = pending_src[id(pending[0])] = (pending[0], [])
                src[1].append(pending[1])
                pending_dst.append(s)
            else:
                _pending_source(st, c, pending_src)  # raises: a position neither known nor in flight
            if c + 1 == len(known) + in_flight:  # reaches the last token (known or in flight): samples
                sample_rows.append(s)
                num_pending.append(in_flight)
        positions = np.asarray(starts, dtype=np.int64)
        seq_of_token = np.arange(num_seqs)
        last_T = seq_of_token
    else:
        tokens = []
        num_spec = [0] * num_seqs
        for s, (st, c, n) in enumerate(zip(states, starts, query_lens)):
            known = st.all_token_ids
            chunk = known[c : c + n]
            tokens.extend(chunk)
            drafts = spec_tokens[s] if spec_tokens is not None else None
            if drafts:  # the last known token, then the drafts it verifies
                num_spec[s] = len(drafts)
                tokens.extend(drafts)
            elif len(chunk) < n:
                tokens.extend([0] * (n - len(chunk)))
        q = np.asarray(query_lens)
        seq_of_token = np.repeat(np.arange(num_seqs), q)
        first_T = np.repeat(np.cumsum(q) - q, q)  # index of each token's sequence's first token
        positions = np.arange(len(tokens), dtype=np.int64) - first_T + np.repeat(np.asarray(starts, np.int64), q)
        last_T = np.cumsum(q) - 1
        for s, (st, L) in enumerate(zip(states, seq_lens)):
            known = len(st.all_token_ids)
            in_flight = 1 if st.pending is not None else 0
            L -= num_spec[s]  # verified drafts sit past the request's last token; they are no pending token
            if L > known:
                _pending_source(st, L - 1, pending_src)
                pending_dst.append(int(last_T[s]))
            # A chunk samples only when it reaches the request's last token (known or in flight).
            if L == known + in_flight:
                sample_rows.append(s)
                num_pending.append(in_flight)
    tokens_T = np.asarray(tokens, dtype=np.int64)
    if tables_SM is None:
        tables_SM = np.zeros((num_seqs, max(len(st.block_ids) for st in states)), dtype=np.int32)
        for s, st in enumerate(states):
            n_blk = len(st.block_ids)
            tables_SM[s, :n_blk] = st.block_arr[:n_blk]
    slots_T = tables_SM[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs
    sliding = None
    if sliding_window is not None:
        sliding = _sliding_tables(states, starts, seq_of_token, positions, bs, sliding_window, null_block)
    qsl = np.zeros(num_seqs + 1, dtype=np.int32)
    np.cumsum(query_lens, out=qsl[1:])
    # Sources in order of first use, their rows in the order of pending_dst (one pass, grouped per source).
    sources = list(pending_src.values())
    if len(sources) > 1:  # more than one step in flight feeds this one: regroup dst to match the concatenation
        order = {id(h): i for i, (h, _) in enumerate(sources)}
        per: list[list[int]] = [[] for _ in sources]
        for s, (st, L) in enumerate(zip(states, seq_lens)):
            if L > len(st.all_token_ids):
                per[order[id(st.pending[0])]].append(int(last_T[s]))
        pending_dst = [d for group in per for d in group]
    return StepInputs(tokens_T, positions, slots_T, tables_SM, seq_lens, list(query_lens), qsl, sliding,
                      sample_rows, num_pending, np.asarray(pending_dst, dtype=np.int64) if pending_dst else None,
                      sources)


def _pending_source(st, position: int, sources: dict) -> int:
    """Record that `st`'s token at `position` is its in-flight token (returns 1); only the one token the
    previous step sampled can be unknown: the scheduler schedules no further."""
    known = len(st.all_token_ids)
    if st.pending is None or position != known:
        raise RuntimeError(f"request {st.req_id}: step computes position {position}, but only {known} tokens "
                           f"are known and {0 if st.pending is None else 1} is in flight")
    handle, row = st.pending
    sources.setdefault(id(handle), (handle, []))[1].append(row)
    return 1


def _sliding_tables(states, starts, seq_of_token, positions, bs: int, window: int, null_block: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The sliding group's block tables [S, M] and KV slots [T]: entries no query of this step (or a later
    one) can see are the null block first, as the scheduler freed them before this step."""
    for st, c in zip(states, starts):
        st.sliding.drop_before(first_live_sliding_block(c, window, bs), null_block)
    tables_SM = np.zeros((len(states), max(st.sliding.n for st in states)), dtype=np.int32)
    for s, st in enumerate(states):
        tables_SM[s, : st.sliding.n] = st.sliding.arr[: st.sliding.n]
    slots = tables_SM[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs
    return tables_SM, slots


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


__all__ = ["StepInputs", "StepTensors", "build_step_inputs", "device_inputs"]
