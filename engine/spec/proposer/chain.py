"""A device drafter that chains one draft layer: catch-up over the step's tokens, then k - 1 greedy drafts, all in
the step's device work (a `DeviceDrafter` of engine/contract/spec_decoding.py). What the layer is, is a `DraftLayer`
strategy: DeepSeek's MTP layer (engine/spec/proposer/mtp.py, method "mtp") or an EAGLE-3 head
(engine/spec/proposer/eagle3.py, method "eagle3").

Legend: T tokens of the step's flat batch, D the draft layer's hidden, R rows that sample this step (the step's
order), W chain table width (blocks), k drafts per request.

Conventions (vLLM's drafters, SGLang's alike): the draft row at position t reads (g_t, tok_{t+1}) and predicts
tok_{t+2}, at the main model's position t and KV slot. g_t, the conditioning state, is the layer's own choice
(`DraftLayer.condition`): MTP takes the main model's final-normed hidden state, EAGLE-3 its fc over three
residual-stream states the main model captured for it (`DraftLayer.aux_layers`).

Every step, two parts, all in the step's device work (no host sync: what depends on the accepted counts stays on
the device):
1. Catch-up: the layer runs over the step's T tokens shifted by one (token t+1 with state t at position t),
   writing its own KV cache (one extra cache layer at `DraftLayer.kv_cache_index`, on the main model's block ids
   and slots), so its cache stays complete for prompts and accepted tokens. A chunk's last row takes the next
   prompt token (host-known) or, for a row that samples, the token the step emitted, on the device; a verify row
   that accepted a of its k drafts takes it at its position p + a (p: its last known token), and the rows past
   p + a (rejected drafts) hold junk that the next step's catch-up overwrites before anything reads it, as the
   main model's rejected KV is.
2. Chain: for each sampled row, the greedy draft from the catch-up output at p + a, then k - 1 more, each
   feeding the layer its own output (its state before the final norm) and its last draft, one position further
   on. Drafting is greedy: the acceptance rule treats the drafts as deterministic (q one-hot), which keeps the
   target distribution exact (engine/spec/rejection.py).
The chain's positions p + a + j depend on the device's a: its attention metadata carries the device lengths and
host upper bounds (kernels/attention.AttentionMetadata), and its KV slots come from a chain table: the row's own
blocks, then scratch blocks of the draft cache for positions past them (the scheduler allocated up to the step's
last position only). Scratch blocks sit after the cache's real blocks and before its null block (always last);
they hold a chain's rows for the step only. Positions are capped at max_model_len - 1 (the rope table's end):
such drafts are never verified (the scheduler keeps verified drafts inside max_model_len).

Expert parallelism: a layer with routed experts (MTP) dispatches like a main layer, so every rank runs k of its
forwards per step that runs a forward anywhere (catch-up, k - 1 chain steps; `moe_only_stages` where it has no
rows), in the same order. A dense layer (EAGLE-3) has no collective: a rank without rows runs nothing.

Tensor parallelism: every rank of a TP group runs the same forwards on the same rows (one SchedulerOutput, and the
verify step's tokens and accepted counts are the group's first rank's: engine/spec/verify.py), so a layer
split over the group (MTP) pairs its all-reduces and gathers; a replicated one (EAGLE-3) computes the same drafts
on every rank. The group's first rank's drafts are the ones verified.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from moelink.kernels.attention import AttentionMetadata
from moelink.moe.layer import MoEOnlyStages, run_stages

from ...config.layer_configs import AttentionConfig
from ...contract.spec_decoding import CapturedStates, DraftPlan, DraftRequest, DraftStepInputs
from ...models.layers import AuxCapture, ForwardContext
from ...contract.host_copy import to_device, to_host

# Sampled rows the first scratch allocation serves (vLLM's default max_num_seqs); more grow it (rare).
SCRATCH_ROWS = 256


class DraftLayer(Protocol):
    """What differs between the layers a ChainDrafter chains (module docstring)."""

    module: nn.Module  # its weights (memory accounting)
    kv_cache_index: int  # where its cache sits in ctx.kv_caches
    attention: AttentionConfig  # its attention kind: the cache's layout (cache_shapes, kv_bytes_per_token)
    cache_dtype: torch.dtype
    # Main-model layer counts after which the residual stream is captured for `condition` (empty: none).
    aux_layers: tuple[int, ...]
    # Whether it holds routed experts (MTP): under EP it then joins its peers' collectives every step.
    has_experts: bool

    def condition(self, h_TD: torch.Tensor, aux: list[torch.Tensor]) -> torch.Tensor:
        """The catch-up's conditioning states [T, D] from the main model's final-normed `h_TD` and its captured
        `aux` states (in `aux_layers` order)."""

    def __call__(self, positions_T, input_ids_T, hidden_TD, ctx: ForwardContext) -> torch.Tensor: ...

    def greedy(self, y_RD: torch.Tensor) -> torch.Tensor:
        """int64 [R]: the target-vocabulary ids of the greedy drafts from the layer's output rows."""

    def moe_only_stages(self) -> MoEOnlyStages:
        """The layer's collectives alone (a rank with no rows); asked only when `has_experts`."""


@dataclass
class ChainPlan:
    """One step's host half (numpy): what the device half reads besides the step's own tensors."""

    fill_idx_F: np.ndarray  # int64 [F]: last rows of chunks that sample nothing, whose next token is known
    fill_tok_F: np.ndarray  # int64 [F]: those next tokens
    base_R: np.ndarray  # int64 [R]: each sampled row's flat index of its last known token (p)
    pos_R: np.ndarray  # int64 [R]: its position
    verify_rows: list[int]  # rows that verify drafts, in order (SpecResult.verify_rows)
    table_RW: np.ndarray | None  # int32 [R, W]: the chain's block table (None: k = 1, no chain)
    upper: list[list[int]]  # per chain step j = 1..k-1, each row's host bound of its length
    scratch: int  # scratch blocks the chain table uses

    @property
    def num_rows(self) -> int:
        return len(self.base_R)


class ChainDrafter:
    """The runner's device drafter over one `DraftLayer` (module docstring). `max_model_len`: the main model's
    (positions are capped below it); `ep`: the rank's expert parallelism, or None."""

    on_device = True

    def __init__(self, draft_layer: DraftLayer, max_model_len: int, device: torch.device, ep, k: int,
                 block_size: int):
        self.draft_layer, self.max_model_len = draft_layer, max_model_len
        self.device, self.ep, self.k, self.block_size = device, ep, k, block_size
        self.layer = draft_layer.module
        self.num_kv_blocks = 0
        self.cache: tuple[torch.Tensor, ...] = ()
        self._scratch_cap = 0

    @property
    def aux_layers(self) -> tuple[int, ...]:
        return self.draft_layer.aux_layers

    @property
    def has_experts(self) -> bool:
        return self.draft_layer.has_experts

    def capture(self) -> AuxCapture | None:
        """What the main model's forward must capture for this drafter (models/layers.AuxCapture), or None."""
        return AuxCapture(self.aux_layers) if self.aux_layers else None

    def kv_bytes_per_token(self) -> int:
        """What one token stores in the draft layer's cache (KV sizing counts it beside the model's layers)."""
        return self.draft_layer.attention.kv_bytes_per_token(self.draft_layer.cache_dtype)

    # -- KV cache -------------------------------------------------------------------
    def _scratch_rows(self) -> int:
        return SCRATCH_ROWS

    def allocate(self, num_kv_blocks: int) -> int:
        """The layer's cache on the engine's block ids, with scratch blocks for the chain; returns its bytes."""
        self.num_kv_blocks = num_kv_blocks
        self.cache, self._scratch_cap = (), 0
        self._ensure_scratch(self._scratch_rows() * -(-(self.k - 1) // self.block_size))
        return sum(t.numel() * t.element_size() for t in self.cache)

    @property
    def null_block(self) -> int:
        return self.num_kv_blocks + self._scratch_cap

    def _ensure_scratch(self, n: int) -> None:
        if self.cache and n <= self._scratch_cap:
            return
        cap = max(n, 2 * self._scratch_cap)
        att, cdt = self.draft_layer.attention, self.draft_layer.cache_dtype
        shapes = att.cache_shapes(self.num_kv_blocks + cap, self.block_size, cdt)
        new = tuple(torch.zeros(s, dtype=dt, device=self.device) for s, dt in zip(shapes, att.cache_dtypes(cdt)))
        for old_t, new_t in zip(self.cache, new):  # a growth keeps the real blocks (scratch lives one step)
            new_t[: self.num_kv_blocks].copy_(old_t[: self.num_kv_blocks])
        self.cache, self._scratch_cap = new, cap

    def _context(self, attn: AttentionMetadata) -> ForwardContext:
        caches: list = [()] * self.draft_layer.kv_cache_index + [self.cache]
        return ForwardContext(attn, caches)

    # -- host half --------------------------------------------------------------------
    def plan(self, inp: DraftStepInputs, states: Sequence[DraftRequest], picked: Sequence[DraftRequest],
             spec_tokens: Mapping[str, list[int]] | None) -> ChainPlan:
        """At launch, once each state's num_computed_tokens covers the step (engine/rank/model_runner.py)."""
        last_S = np.asarray(inp.qsl_S1[1:], dtype=np.int64) - 1
        samples = set(inp.sample_rows)
        fill_idx, fill_tok = [], []
        for s, st in enumerate(states):
            nxt = st.num_computed_tokens  # the position after the chunk
            if s not in samples and nxt < len(st.all_token_ids):
                fill_idx.append(last_S[s])
                fill_tok.append(st.all_token_ids[nxt])
        k_R = np.asarray([len(spec_tokens.get(st.req_id) or ()) if spec_tokens else 0 for st in picked], np.int64)
        base_R = last_S[inp.sample_rows] - k_R if picked else np.zeros(0, np.int64)
        pos_R = np.asarray(inp.positions_T, np.int64)[base_R]
        table, upper, scratch = None, [], 0
        if self.k > 1 and picked:
            table, upper, scratch = self._chain_table(inp, picked, pos_R, k_R)
        return ChainPlan(np.asarray(fill_idx, np.int64), np.asarray(fill_tok, np.int64), base_R, pos_R,
                         [r for r in range(len(picked)) if k_R[r]], table, upper, scratch)

    def _chain_table(self, inp, picked, pos_R, k_R) -> tuple[np.ndarray, list[list[int]], int]:
        """The chain's block table: each row's blocks, then scratch ids for the blocks past them that its chain
        may reach (its positions are at most p + k_r + k - 1, capped); other entries are never read unmasked."""
        bs, cap = self.block_size, self.max_model_len - 1
        top_R = np.minimum(pos_R + k_R + self.k - 1, cap)
        tables = inp.tables_SM[inp.sample_rows]
        W = max(tables.shape[1], int(top_R.max()) // bs + 1)
        table = np.zeros((len(picked), W), dtype=np.int32)
        table[:, : tables.shape[1]] = tables
        nxt = self.num_kv_blocks
        for r, st in enumerate(picked):
            own = len(st.block_ids)
            need = int(top_R[r]) // bs + 1
            if need > own:
                table[r, own:need] = np.arange(nxt, nxt + need - own)
                nxt += need - own
        upper = [np.minimum(pos_R + k_R + j, cap).astype(np.int64) + 1 for j in range(1, self.k)]
        return table, [u.tolist() for u in upper], nxt - self.num_kv_blocks

    # -- device half ------------------------------------------------------------------
    def draft(self, plan: DraftPlan, h_TD: torch.Tensor, input_ids_T: torch.Tensor, positions_T: torch.Tensor,
              attn: AttentionMetadata, sampled_R: torch.Tensor | None, accepted: torch.Tensor | None,
              aux: CapturedStates | None = None) -> torch.Tensor | None:
        """The step's draft work (module docstring). `h_TD`: the main model's final-normed states; `aux`: what
        its forward captured for `aux_layers`; `sampled_R`: int64 [R] on the device, each sampled row's last
        emitted token; `accepted`: a verify step's int64 [R_verify] emitted counts (accepted + 1) on the device,
        or None. Returns the drafts' host copy, int64 [R, k] (read after the step's wait), or None without rows."""
        assert isinstance(plan, ChainPlan), plan  # this drafter's own `plan`
        dev, R, layer = self.device, plan.num_rows, self.draft_layer
        self._ensure_scratch(plan.scratch)
        ids_T = torch.empty_like(input_ids_T)
        ids_T[:-1] = input_ids_T[1:]
        ids_T[-1:] = 0
        if len(plan.fill_idx_F):
            fill_F = to_device(plan.fill_idx_F, torch.long, dev)
            ids_T.index_copy_(0, fill_F, to_device(plan.fill_tok_F, torch.long, dev))
        a_R = idx_R = None
        if R:
            a_R = torch.zeros(R, dtype=torch.long, device=dev)
            if accepted is not None and plan.verify_rows:
                a_R[to_device(plan.verify_rows, torch.long, dev)] = accepted - 1
            idx_R = to_device(plan.base_R, torch.long, dev) + a_R
            ids_T.index_copy_(0, idx_R, sampled_R)
        catch_up = dataclasses.replace(attn, null_block=self.null_block)  # the main step's tables and slots
        g_TD = layer.condition(h_TD, aux.states() if aux is not None else [])
        y_TD = layer(positions_T, ids_T, g_TD, self._context(catch_up))
        if not R:
            self._chain_moe_only()
            return None
        y_RD = y_TD.index_select(0, idx_R)
        d_R = layer.greedy(y_RD)
        drafts = [d_R]
        if self.k > 1:
            bs, cap = self.block_size, self.max_model_len - 1
            table_RW = to_device(plan.table_RW, torch.int32, dev)
            qsl_R1 = torch.arange(R + 1, dtype=torch.int32, device=dev)
            pos0_R = to_device(plan.pos_R, torch.long, dev) + a_R
            for j, upper in enumerate(plan.upper, start=1):
                pos_R = (pos0_R + j).clamp_(max=cap)
                slot_R = table_RW.gather(1, (pos_R // bs)[:, None]).squeeze(1).long() * bs + pos_R % bs
                meta = AttentionMetadata(qsl_R1, (pos_R + 1).to(torch.int32), table_RW, slot_R, [1] * R, upper, 1,
                                         max(upper), self.null_block)
                y_RD = layer(pos_R, d_R, y_RD, self._context(meta))
                d_R = layer.greedy(y_RD)
                drafts.append(d_R)
        return to_host(torch.stack(drafts, dim=1))

    def draft_moe_only(self) -> None:
        """A rank with no tokens in a step its peers run: the k forwards' collectives alone (none for a dense
        layer)."""
        self._moe_only(self.k)

    def _chain_moe_only(self) -> None:
        self._moe_only(self.k - 1)

    def _moe_only(self, n: int) -> None:
        if self.ep is None or not self.draft_layer.has_experts:  # a dense layer pairs nothing up
            return
        for _ in range(n):
            run_stages(self.draft_layer.moe_only_stages())


__all__ = ["ChainDrafter", "ChainPlan", "DraftLayer", "SCRATCH_ROWS"]
