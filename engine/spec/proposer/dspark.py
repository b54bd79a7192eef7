"""The DSpark drafter (speculative method "dspark"): block drafting with a Markov head, in the step's device work
(a `DeviceDrafter` of engine/contract/spec_decoding.py). engine/config/dspark.py says what DSpark computes; the
stages are a `DSparkStages` (engine/models/blocks/dspark.py): a DFlash-format checkpoint's, built here
(engine/spec/heads/dspark.py), or the ones a family bundles in its own checkpoint, built by the builder the family
registered for its architecture.

Legend: T tokens of the step's flat batch, D hidden, R rows that sample this step (the step's order), B block slots
(= k, num_speculative_tokens), C context entries gathered per row, X a stage's context row.

Every step, all in the step's device work (no host sync: what depends on the accepted counts stays on the device):
1. Context: the target's states at the tap layers (captured by its forward: models/layers.AuxCapture; the mean over
   its hyper-connection streams where it keeps n of them, [T, n D]) for every token of the step become each stage's
   context row, written at the token's KV slot of the stage's own paged cache (the engine's block ids). Rows of
   rejected drafts hold junk past the accepted position; nothing reads them before a later step overwrites them,
   as the main model's rejected KV.
2. Block: each sampled row's anchor is the token it just emitted, at P = p + a + 1 (p its last known token's
   position, a the drafts it accepted, on the device); the block [anchor, mask, ...] at positions P .. P + B - 1
   attends over the context before P (the last `window` positions, or all) and over itself whole. The context is
   gathered from the stage caches by the row's block table, C entries a row (host bound: p + k_r + 1, or the
   window), the ones not before P masked out; rows are drafted in groups where the gathered context would pass
   MAX_GATHERED values (stages without a window read every earlier position).
3. Markov: base logits of the B slots, then left to right the greedy draft of base_i + bias(prev_i), prev_0 the
   anchor. Greedy: the acceptance rule treats the drafts as deterministic (engine/spec/rejection.py), so sampled
   requests stay exact too.
Positions past max_model_len - 1 (the rope table's end) are capped: such drafts are never verified.

Expert parallelism: DFlash-format stages are dense (no collective): a rank drafts for its own rows and runs nothing
without them. Stages with routed experts (a family's bundled ones) run `run_idle` on a rank without rows, so the
peers' collectives pair up. Tensor parallelism: the stages are replicated, whole, on every rank of a TP group (as
EAGLE-3's head, engine/spec/proposer/eagle3.py), the target's embedding and LM head gathered whole once at load;
every rank drafts the same, and the group's first rank's drafts are verified.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from moelink.kernels.attention import AttentionMetadata

from ...config.dspark import DSparkConfig, bundles_dspark, read_bundled_dspark, read_dspark_draft
from ...config.model import ModelConfig
from ...contract.host_copy import to_device, to_host
from ...contract.spec_decoding import CapturedStates, DraftPlan, DraftRequest, DraftStepInputs
from ...models.blocks.dspark import DSPARK_STAGES, DSparkStages
from ...models.layers import AuxCapture
from ...rank.dummy_weights import DummyCheckpoint, TensorSpec
from ...rank.loader import SafetensorsCheckpoint, load_plan, open_checkpoint
from ...tp.group import TensorParallel
from ..heads.dspark import DSparkGQAStages, check_names
from .eagle3 import whole_vocab_table

logger = logging.getLogger(__name__)

# Context values gathered for one forward of the stages at most (rows are drafted in groups past it): full-context
# stages read every earlier position, R x C x X values, which long prompts and many rows would make huge.
MAX_GATHERED = 1 << 26


@dataclass
class DSparkPlan:
    """One step's host half (numpy): what the device half reads besides the step's own tensors."""

    base_R: np.ndarray  # int64 [R]: each sampled row's flat index of its last known token (p)
    pos_R: np.ndarray  # int64 [R]: its position
    verify_rows: list[int]  # rows that verify drafts, in order (SpecResult.verify_rows)
    table_RM: np.ndarray  # int32 [R, M]: the sampled rows' block tables
    num_ctx: int  # C: context entries gathered per row (host upper bound)

    @property
    def num_rows(self) -> int:
        return len(self.base_R)


class DSparkDrafter:
    """The runner's device drafter for method "dspark" (module docstring)."""

    on_device = True

    def __init__(self, stages: DSparkStages, dspark: DSparkConfig, cfg: ModelConfig, device: torch.device, ep,
                 k: int, block_size: int):
        self.stages, self.dspark, self.device, self.ep = stages, dspark, device, ep
        self.k, self.block_size, self.max_model_len = k, block_size, cfg.max_model_len
        self.hidden_size, self.dtype = cfg.hidden_size, cfg.dtype
        self.taps = dspark.tap_counts(cfg.num_layers)
        self.caches: list[torch.Tensor] = []
        self.num_kv_blocks = 0
        if k != dspark.block_size:
            logger.info("DSpark drafts %d tokens a step; its stages were trained for blocks of %d.", k,
                        dspark.block_size)

    @property
    def layer(self) -> torch.nn.Module:
        return self.stages.module

    @property
    def aux_layers(self) -> tuple[int, ...]:
        return self.taps

    @property
    def has_experts(self) -> bool:
        return self.stages.has_experts

    def capture(self) -> AuxCapture:
        return AuxCapture(self.taps)

    def kv_bytes_per_token(self) -> int:
        return sum(int(np.prod(s)) for s in self.stages.row_shapes()) * self.dtype.itemsize

    def allocate(self, num_kv_blocks: int) -> int:
        """Each stage's context cache on the engine's block ids, its null block last (never written); its bytes."""
        self.num_kv_blocks = num_kv_blocks
        rows = (num_kv_blocks + 1) * self.block_size
        self.caches = [torch.zeros(rows, *s, dtype=self.dtype, device=self.device) for s in self.stages.row_shapes()]
        return sum(c.numel() * c.element_size() for c in self.caches)

    # -- host half --------------------------------------------------------------------
    def plan(self, inp: DraftStepInputs, states: Sequence[DraftRequest], picked: Sequence[DraftRequest],
             spec_tokens: Mapping[str, list[int]] | None) -> DSparkPlan:
        last_S = np.asarray(inp.qsl_S1[1:], dtype=np.int64) - 1
        k_R = np.asarray([len(spec_tokens.get(st.req_id) or ()) if spec_tokens else 0 for st in picked], np.int64)
        base_R = last_S[inp.sample_rows] - k_R if picked else np.zeros(0, np.int64)
        pos_R = np.asarray(inp.positions_T, np.int64)[base_R]
        num_ctx = int((pos_R + k_R).max()) + 1 if picked else 0
        window = self.stages.window
        if window is not None:
            num_ctx = min(num_ctx, window)
        table = np.asarray(inp.tables_SM, np.int32)[inp.sample_rows] if picked else np.zeros((0, 1), np.int32)
        return DSparkPlan(base_R, pos_R, [r for r in range(len(picked)) if k_R[r]], table, num_ctx)

    # -- device half ------------------------------------------------------------------
    def _taps(self, aux: CapturedStates | None) -> list[torch.Tensor]:
        """[T, D] per tap: the captured stream, averaged over its hyper-connection streams where it has n."""
        if aux is None:
            raise RuntimeError("the DSpark drafter reads the target's states at its tap layers: run the forward with "
                               "its capture().")
        return [s if s.shape[-1] == self.hidden_size else s.view(s.shape[0], -1, self.hidden_size).mean(1)
                for s in aux.states()]

    def draft(self, plan: DraftPlan, h_TD: torch.Tensor, input_ids_T: torch.Tensor, positions_T: torch.Tensor,
              attn: AttentionMetadata, sampled_R: torch.Tensor | None, accepted: torch.Tensor | None,
              aux: CapturedStates | None = None) -> torch.Tensor | None:
        """The step's draft work (module docstring); returns the drafts' host copy, int64 [R, k], or None."""
        assert isinstance(plan, DSparkPlan), plan  # this drafter's own `plan`
        dev, R, st = self.device, plan.num_rows, self.stages
        rows = st.context_rows(self._taps(aux), positions_T)
        slot_T = attn.slot_mapping_T.long()
        # A padding token (slot -1) writes the null block's first row, which only masked entries read.
        slot_T = torch.where(slot_T >= 0, slot_T, torch.full_like(slot_T, self.num_kv_blocks * self.block_size))
        for cache, row in zip(self.caches, rows):
            cache.index_copy_(0, slot_T, row.to(cache.dtype))
        if not R:
            self.draft_moe_only()
            return None
        assert sampled_R is not None
        a_R = torch.zeros(R, dtype=torch.long, device=dev)
        if accepted is not None and plan.verify_rows:
            a_R[to_device(plan.verify_rows, torch.long, dev)] = accepted - 1
        anchor_R = to_device(plan.pos_R, torch.long, dev) + a_R + 1  # the emitted token's position, P
        ctx_RC, valid_RC = self._context_slots(plan, anchor_R)
        ids_RB = torch.full((R, self.k), self.dspark.mask_token_id, dtype=torch.long, device=dev)
        ids_RB[:, 0] = sampled_R
        offs = torch.arange(self.k, device=dev)
        positions_RB = (anchor_R[:, None] + offs).clamp_(max=self.max_model_len - 1)
        parts = []
        for r0, r1 in self._row_chunks(R, ctx_RC.shape[1]):
            ctx = [cache[ctx_RC[r0:r1]] for cache in self.caches]
            parts.append(st.base_logits(ids_RB[r0:r1], positions_RB[r0:r1], ctx, valid_RC[r0:r1]))
        base_RBV = torch.cat(parts) if len(parts) > 1 else parts[0]
        prev, drafts = sampled_R, []
        for i in range(self.k):
            prev = (base_RBV[:, i] + st.markov_bias(prev)).argmax(dim=-1)
            drafts.append(prev)
        return to_host(torch.stack(drafts, dim=1))

    def _row_chunks(self, R: int, C: int) -> list[tuple[int, int]]:
        """Rows drafted together: all of them, unless their gathered context (whole, for stages without a window)
        would pass MAX_GATHERED values; then groups that stay under it. Stages with routed experts always run
        once (a window bounds their context, and under EP every rank must run the same number of forwards)."""
        per_row = C * sum(int(np.prod(s)) for s in self.stages.row_shapes())
        if self.stages.has_experts or R * per_row <= MAX_GATHERED:
            return [(0, R)]
        n = max(1, MAX_GATHERED // max(per_row, 1))
        return [(r0, min(r0 + n, R)) for r0 in range(0, R, n)]

    def _context_slots(self, plan: DSparkPlan, anchor_R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cache rows int64 [R, C], which exist bool [R, C]): each row's context before its anchor, newest first;
        entries before position 0 read the null block and are masked."""
        dev, bs, C = self.device, self.block_size, max(plan.num_ctx, 1)
        pos_RC = anchor_R[:, None] - 1 - torch.arange(C, device=dev)
        valid_RC = pos_RC >= 0
        pos_RC = pos_RC.clamp(min=0)
        table = to_device(plan.table_RM, torch.long, dev)
        block_RC = table.gather(1, (pos_RC // bs).clamp(max=table.shape[1] - 1))
        block_RC = torch.where(valid_RC, block_RC, torch.full_like(block_RC, self.num_kv_blocks))
        return block_RC * bs + pos_RC % bs, valid_RC

    def draft_moe_only(self) -> None:
        """A rank with no rows in a step its peers run: the stages' collectives alone (none for dense stages)."""
        if self.ep is not None and self.stages.has_experts:
            self.stages.run_idle()


def load_dspark(path: str | None, cfg: ModelConfig, model, kernels, device: torch.device,
                load_format: str = "auto", tp: TensorParallel | None = None,
                ep=None) -> tuple[DSparkStages, DSparkConfig]:
    """The DSpark stages for served model `cfg` / `model`: from the DFlash-format checkpoint in directory `path`, or
    (path None) the ones the served checkpoint bundles, built by its family's registered builder; random with
    load_format "dummy". The target's embedding and LM head are shared, gathered whole under TP; `ep`: the rank's
    expert parallelism (a family's stages with routed experts hold this rank's share)."""
    embed, head = model.embed_tokens, model.lm_head
    if tp is not None and tp.size > 1:
        embed = whole_vocab_table(model.embed_tokens, cfg.vocab_size, tp)
        head = embed if model.lm_head is model.embed_tokens else whole_vocab_table(model.lm_head, cfg.vocab_size, tp)
    if path is None:
        return _bundled(cfg, kernels, device, embed, head, load_format, ep, tp)
    dspark, g = read_dspark_draft(path)
    if g.hidden_size != cfg.hidden_size or g.vocab_size != cfg.vocab_size:
        raise ValueError(f"speculative_config.model: the DSpark draft's config.json hidden_size={g.hidden_size}, "
                         f"vocab_size={g.vocab_size} differ from the served model's ({cfg.hidden_size}, "
                         f"{cfg.vocab_size}): its stages share the served model's embedding and LM head.")
    dspark.check_target(cfg.vocab_size)
    dspark.tap_counts(cfg.num_layers)
    stages = DSparkGQAStages(dspark, g, cfg.dtype, device, embed, head)
    plan = stages.weight_plan()
    if load_format == "dummy":
        specs = {n: TensorSpec(tuple(e.dest.shape), cfg.dtype) for n, e in plan.items()}
        load_plan(DummyCheckpoint(specs, device), plan, device)
    else:
        ckpt = SafetensorsCheckpoint(path)
        have = frozenset(ckpt.keys())
        # Some exports keep a "model." prefix on the stages' names (SGLang's loader reads both).
        plan = {("model." + n if n not in have and "model." + n in have else n): e for n, e in plan.items()}
        check_names(path, have, plan)
        load_plan(ckpt, plan, device)
    return stages.eval(), dspark


def _bundled(cfg: ModelConfig, kernels, device, embed, head, load_format: str, ep,
             tp: TensorParallel | None) -> tuple[DSparkStages, DSparkConfig]:
    if not bundles_dspark(cfg.hf_config):
        raise ValueError(f"speculative_config.method='dspark' needs speculative_config.model (a DSpark draft "
                         f"checkpoint) for {cfg.architecture}: its config.json carries no dspark_* fields.")
    dspark = read_bundled_dspark(cfg.hf_config)
    dspark.check_target(cfg.vocab_size)
    dspark.tap_counts(cfg.num_layers)
    if cfg.architecture not in DSPARK_STAGES.names():
        raise ValueError(f"speculative_config.method='dspark': {cfg.architecture} bundles {dspark.num_stages} DSpark "
                         f"stages (mtp.* in its checkpoint), but no DSpark stage builder is registered for it "
                         f"(engine/models/blocks/dspark.DSPARK_STAGES; registered: "
                         f"{', '.join(DSPARK_STAGES.names()) or 'none'}).")
    checkpoint = open_checkpoint(cfg, load_format, device) if load_format != "dummy" else None
    names = frozenset(checkpoint.keys()) if checkpoint is not None else frozenset()
    build = DSPARK_STAGES.get(cfg.architecture)
    stages = build(cfg, dspark, kernels, device, embed, head, names, ep, tp if tp is not None and tp.size > 1 else None)
    plan = stages.weight_plan()
    if checkpoint is None:  # the checkpoint's shapes: the stages' plan at one rank, on the meta device
        meta = torch.device("meta")
        whole = build(cfg, dspark, kernels, meta, embed.to(meta), head.to(meta), names, None, None).weight_plan()
        specs = {n: TensorSpec(tuple((e.dest[e.index] if e.index else e.dest).shape), e.dest.dtype)
                 for n, e in whole.items()}
        checkpoint = DummyCheckpoint(specs, device)
    else:
        missing = sorted(n for n in plan if n not in checkpoint)
        if missing:
            raise ValueError(f"checkpoint {cfg.model!r} is missing DSpark tensor {missing[0]!r}"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                             + ": speculative method 'dspark' reads every stage.")
    load_plan(checkpoint, plan, device)
    stages.module.eval()
    return stages, dspark


class DSparkProposer(DSparkDrafter):
    """DSparkDrafter loaded for the rank: `path` the DFlash-format draft directory (EngineArgs resolved a repo id),
    or None for the stages the served checkpoint bundles."""

    def __init__(self, path: str | None, cfg: ModelConfig, model, kernels, device: torch.device, ep, k: int,
                 block_size: int, load_format: str = "auto", tp: TensorParallel | None = None):
        stages, dspark = load_dspark(path, cfg, model, kernels, device, load_format, tp, ep)
        super().__init__(stages, dspark, cfg, device, ep, k, block_size)


__all__ = ["DSparkDrafter", "DSparkPlan", "DSparkProposer", "load_dspark"]
