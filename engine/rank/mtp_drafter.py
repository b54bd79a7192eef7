"""The MTP drafter: the checkpoint's next-n prediction layer (engine/models/mtp.py) drafting inside the step's
device work (speculative method "mtp"; a `DeviceDrafter` of engine/rank/drafter.py).

Legend: T tokens of the step's flat batch, D hidden, R rows that sample this step (the step's order), W chain
table width (blocks), k drafts per request.

Conventions (vLLM's drafter, SGLang's alike): the MTP row at position t reads (h_t, tok_{t+1}) and predicts
tok_{t+2}, at the main model's position t and KV slot. h_t is the main model's FINAL-NORMED hidden state (what
`MoEDecoderForCausalLM.forward` returns): vLLM and SGLang feed that one, and the published MTP weights were
trained with it; DeepSeek-V3's report draws the pre-norm state, and the difference shows only as drafts accepted
less often (the verify step keeps the output exact either way).

Every step, two parts, all in the step's device work (no host sync: what depends on the accepted counts stays on
the device):
1. Catch-up: the MTP layer runs over the step's T tokens shifted by one (token t+1 with hidden t at position t),
   writing its own KV cache (one extra cache layer, `ctx.kv_caches[num_layers]`, on the main model's block ids
   and slots), so its cache stays complete for prompts and accepted tokens. A chunk's last row takes the next
   prompt token (host-known) or, for a row that samples, the token the step emitted, on the device; a verify row
   that accepted a of its k drafts takes it at its position p + a (p: its last known token), and the rows past
   p + a (rejected drafts) hold junk that the next step's catch-up overwrites before anything reads it, as the
   main model's rejected KV is.
2. Chain: for each sampled row, the greedy draft from the catch-up output at p + a, then k - 1 more, each
   feeding the layer its own output (the state before shared_head.norm) and its last draft, one position further
   on. Drafting is greedy: the acceptance rule treats the drafts as deterministic (q one-hot), which keeps the
   target distribution exact (engine/rank/rejection_sampler.py).
The chain's positions p + a + j depend on the device's a: its attention metadata carries the device lengths and
host upper bounds (kernels/attention.AttentionMetadata), and its KV slots come from a chain table: the row's own
blocks, then scratch blocks of the MTP cache for positions past them (the scheduler allocated up to the step's
last position only). Scratch blocks sit after the cache's real blocks and before its null block (always last);
they hold a chain's rows for the step only. Positions are capped at max_model_len - 1 (the rope table's end):
such drafts are never verified (the scheduler keeps verified drafts inside max_model_len).

Expert parallelism: the MTP layer's MoE dispatches like a main layer, so every rank runs k MTP forwards per step
that runs a forward anywhere (catch-up, k - 1 chain steps; `moe_only_stages` where it has no rows), in the same
order. With num_nextn_predict_layers > 1 the drafter runs module 0 only (chained k times, as vLLM does for
DeepSeek's one published module).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from moelink.kernels.attention import AttentionMetadata
from moelink.moe.layer import run_stages

from ..config.model import ModelConfig
from ..models import MTPLayer, arch_spec
from ..models.layers import ForwardContext
from .device_stream import to_device, to_host
from .loader import load_plan, open_checkpoint

logger = logging.getLogger(__name__)

# Sampled rows the first scratch allocation serves (vLLM's default max_num_seqs); more grow it (rare).
_SCRATCH_ROWS = 256


def load_mtp_layer(cfg: ModelConfig, model, kernels, device: torch.device, ep=None,
                   load_format: str = "auto") -> MTPLayer:
    """MTP module 0 of `cfg`'s checkpoint (or random, load_format "dummy"), its routed experts this rank's share
    under `ep`; its embedding and head are `model`'s where the checkpoint has no copy."""
    if cfg.num_nextn_predict_layers < 1:
        raise ValueError(f"speculative_config.method='mtp' is invalid for this checkpoint: its config.json has "
                         f"num_nextn_predict_layers={cfg.num_nextn_predict_layers} (no MTP layers).")
    if cfg.num_nextn_predict_layers > 1:
        logger.info("checkpoint has %d MTP modules: the drafter chains module 0 only.", cfg.num_nextn_predict_layers)
    checkpoint = open_checkpoint(cfg, load_format, device, mtp_layers=1)
    names = frozenset(checkpoint.keys())
    layer = MTPLayer(cfg, arch_spec(cfg.architecture), 0, kernels, device, ep, names,
                     embed_tokens=model.embed_tokens, lm_head=model.lm_head)
    plan = layer.weight_plan(names)
    missing = sorted(n for n in plan if n not in checkpoint)
    if missing:
        raise ValueError(f"checkpoint {cfg.model!r} is missing MTP tensor {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                         + ": speculative method 'mtp' reads the whole MTP layer.")
    load_plan(checkpoint, plan, device)
    layer.process_weights_after_loading()
    return layer.eval()


@dataclass
class MTPPlan:
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


class MTPDrafter:
    """The runner's device drafter for method "mtp" (module docstring)."""

    on_device = True
    num_cache_layers = 1

    def __init__(self, cfg: ModelConfig, model, kernels, device: torch.device, ep, k: int, block_size: int,
                 load_format: str = "auto"):
        self.cfg, self.device, self.ep, self.k, self.block_size = cfg, device, ep, k, block_size
        self.layer = load_mtp_layer(cfg, model, kernels, device, ep, load_format)
        self.num_kv_blocks = 0
        self.cache: tuple[torch.Tensor, ...] = ()
        self._scratch_cap = 0

    # -- KV cache -------------------------------------------------------------------
    def allocate(self, num_kv_blocks: int) -> int:
        """The layer's cache on the engine's block ids, with scratch blocks for the chain; returns its bytes."""
        self.num_kv_blocks = num_kv_blocks
        self.cache, self._scratch_cap = (), 0
        self._ensure_scratch(_SCRATCH_ROWS * -(-(self.k - 1) // self.block_size))
        return sum(t.numel() * t.element_size() for t in self.cache)

    @property
    def null_block(self) -> int:
        return self.num_kv_blocks + self._scratch_cap

    def _ensure_scratch(self, n: int) -> None:
        if self.cache and n <= self._scratch_cap:
            return
        cap = max(n, 2 * self._scratch_cap)
        shapes = self.cfg.attention.cache_shapes(self.num_kv_blocks + cap, self.block_size)
        new = tuple(torch.zeros(s, dtype=self.cfg.cache_dtype, device=self.device) for s in shapes)
        for old_t, new_t in zip(self.cache, new):  # a growth keeps the real blocks (scratch lives one step)
            new_t[: self.num_kv_blocks].copy_(old_t[: self.num_kv_blocks])
        self.cache, self._scratch_cap = new, cap

    def _context(self, attn: AttentionMetadata) -> ForwardContext:
        caches: list = [()] * self.layer.layer_index + [self.cache]
        return ForwardContext(attn, caches)

    # -- host half --------------------------------------------------------------------
    def plan(self, inp, states: Sequence, picked: Sequence, spec_tokens) -> MTPPlan:
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
        return MTPPlan(np.asarray(fill_idx, np.int64), np.asarray(fill_tok, np.int64), base_R, pos_R,
                       [r for r in range(len(picked)) if k_R[r]], table, upper, scratch)

    def _chain_table(self, inp, picked, pos_R, k_R) -> tuple[np.ndarray, list[list[int]], int]:
        """The chain's block table: each row's blocks, then scratch ids for the blocks past them that its chain
        may reach (its positions are at most p + k_r + k - 1, capped); other entries are never read unmasked."""
        bs, cap = self.block_size, self.cfg.max_model_len - 1
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
    def draft(self, plan: MTPPlan, h_TD: torch.Tensor, input_ids_T: torch.Tensor, positions_T: torch.Tensor,
              attn: AttentionMetadata, sampled_R: torch.Tensor | None, accepted) -> torch.Tensor | None:
        """The step's MTP work (module docstring). `sampled_R`: int64 [R] on the device, each sampled row's last
        emitted token; `accepted`: a verify step's int64 [R_verify] emitted counts (accepted + 1) on the device,
        or None. Returns the drafts' host copy, int64 [R, k] (read after the step's wait), or None without rows."""
        dev, R = self.device, plan.num_rows
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
        y_TD = self.layer(positions_T, ids_T, h_TD, self._context(catch_up))
        if not R:
            self._chain_moe_only()
            return None
        y_RD = y_TD.index_select(0, idx_R)
        d_R = self.layer.compute_logits(y_RD).argmax(dim=-1)
        drafts = [d_R]
        if self.k > 1:
            bs, cap = self.block_size, self.cfg.max_model_len - 1
            table_RW = to_device(plan.table_RW, torch.int32, dev)
            qsl_R1 = torch.arange(R + 1, dtype=torch.int32, device=dev)
            pos0_R = to_device(plan.pos_R, torch.long, dev) + a_R
            for j, upper in enumerate(plan.upper, start=1):
                pos_R = (pos0_R + j).clamp_(max=cap)
                slot_R = table_RW.gather(1, (pos_R // bs)[:, None]).squeeze(1).long() * bs + pos_R % bs
                meta = AttentionMetadata(qsl_R1, (pos_R + 1).to(torch.int32), table_RW, slot_R, [1] * R, upper, 1,
                                         max(upper), self.null_block)
                y_RD = self.layer(pos_R, d_R, y_RD, self._context(meta))
                d_R = self.layer.compute_logits(y_RD).argmax(dim=-1)
                drafts.append(d_R)
        return to_host(torch.stack(drafts, dim=1))

    def draft_moe_only(self) -> None:
        """A rank with no tokens in a step its peers run: the k MTP forwards' collectives alone."""
        if self.ep is not None:
            for _ in range(self.k):
                run_stages(self.layer.moe_only_stages())

    def _chain_moe_only(self) -> None:
        if self.ep is not None:
            for _ in range(self.k - 1):
                run_stages(self.layer.moe_only_stages())


__all__ = ["MTPDrafter", "MTPPlan", "load_mtp_layer"]
