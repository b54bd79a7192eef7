"""Speculative decoding's acceptance rule: which of a request's draft tokens the target model keeps, and the one
token it adds after them, so that the output is distributed exactly as the target model's own sampling.

A verify step scores, per request r, its n_r draft tokens d_1..d_n with n_r + 1 target rows: row j holds the
target distribution p_j for the position of d_j (j < n_r), the last row p_n the position after every draft
(the "bonus" position). Rows are consecutive per request, requests in batch order (`DraftRows`).

- Greedy rows: d_j is kept while it is the target's argmax at its position; the first mismatch is replaced by
  the argmax (or, all kept, the bonus row's argmax is added). Output = what plain greedy decoding would give.
- Random rows (the standard rule, Leviathan et al. 2023 / Chen et al. 2023): d_j is kept with probability
  min(1, p_j(d_j) / q_j(d_j)), q_j the drafter's distribution; at the first rejection the replacement is drawn
  from the residual max(0, p_j - q_j) renormalised; all kept, one more token is drawn from p_n. Each output
  token is then distributed as p (the target's distribution after every logits processor: penalties,
  min_tokens, grammar mask, temperature, min-p, top-k, top-p, exactly what `Sampler` samples from). A drafter
  without probabilities (n-gram lookup, a test drafter) proposes deterministically: q_j is one-hot on d_j, the
  rule keeps d_j with probability p_j(d_j) and the residual is p_j without d_j.

Draws: a request with a seed draws its uniforms (one per draft) and then V exponentials (the race that picks
the replacement or bonus token) from its own generator, so its tokens do not depend on what shares the batch;
the others draw from the device's default generator. No host sync: tokens stay on the device.

Shape legend: B target rows (sum of n_r + 1), V vocabulary, D draft tokens (sum of n_r), R requests,
K the most drafts any request has.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class DraftRows:
    """How a verify step's rows belong to requests: request r has `num_draft[r]` drafts, rows
    `first_row[r] .. first_row[r] + num_draft[r]` (its drafts' positions, then its bonus position)."""

    num_draft: tuple[int, ...]

    def __post_init__(self) -> None:
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in self.num_draft):
            raise ValueError(f"DraftRows.num_draft={self.num_draft!r} is invalid: each must be an integer >= 0.")

    @property
    def num_requests(self) -> int:
        return len(self.num_draft)

    @property
    def num_rows(self) -> int:
        return sum(self.num_draft) + len(self.num_draft)

    @property
    def max_draft(self) -> int:
        return max(self.num_draft, default=0)

    def first_rows(self) -> list[int]:
        out, row = [], 0
        for n in self.num_draft:
            out.append(row)
            row += n + 1
        return out


@dataclass
class RejectionOutput:
    """Per request: the tokens it emits this step, `token_ids_RK1[r, :num_tokens_R[r]]` (the kept drafts, then
    one replacement or bonus token); the rest of the row is -1. `num_accepted_R`: drafts kept."""

    token_ids_RK1: torch.Tensor  # long [R, K + 1]
    num_tokens_R: torch.Tensor  # long [R], in 1 .. n_r + 1
    num_accepted_R: torch.Tensor  # long [R], in 0 .. n_r

    def to_lists(self) -> list[list[int]]:
        """Host lists (a device-to-host sync: call it where the step is collected)."""
        ids, counts = self.token_ids_RK1.tolist(), self.num_tokens_R.tolist()
        return [row[:n] for row, n in zip(ids, counts)]


def rejection_sample(target_probs_BV: torch.Tensor, rows: DraftRows, draft_ids_D: torch.Tensor,
                     draft_probs_DV: Optional[torch.Tensor], greedy_R: torch.Tensor,
                     generators: Optional[dict[int, torch.Generator]] = None) -> RejectionOutput:
    """The tokens each request emits (module docstring).

    target_probs_BV: float32 [B, V], each row a distribution (the processed target; greedy rows may hold any
        distribution whose argmax is the greedy token, e.g. the processed probabilities at temperature 1).
    draft_ids_D: long [D], request r's drafts at D-positions sum(n_<r) ...; draft_probs_DV: float32 [D, V] the
        drafter's distributions, or None for a deterministic drafter.
    greedy_R: bool [R]; generators: request index -> its seeded generator.
    """
    B, V = target_probs_BV.shape
    R, K = rows.num_requests, rows.max_draft
    D = int(draft_ids_D.numel())
    if B != rows.num_rows or D != sum(rows.num_draft):
        raise ValueError(f"rejection_sample: {B} target rows and {D} drafts do not match DraftRows "
                         f"({rows.num_rows} rows, {sum(rows.num_draft)} drafts).")
    if draft_probs_DV is not None and tuple(draft_probs_DV.shape) != (D, V):
        raise ValueError(f"rejection_sample: draft_probs_DV has shape {tuple(draft_probs_DV.shape)}, expected {(D, V)}.")
    device = target_probs_BV.device
    generators = generators or {}
    num_draft_R = torch.tensor(rows.num_draft, dtype=torch.long, device=device)
    first_R = torch.tensor(rows.first_rows(), dtype=torch.long, device=device)

    # Padded [R, K] views of the drafts and of their target rows (pad: column j >= n_r).
    col_K = torch.arange(K, device=device)
    valid_RK = col_K.unsqueeze(0) < num_draft_R.unsqueeze(1)
    draft_start_R = torch.cumsum(num_draft_R, 0) - num_draft_R
    d_index_RK = (draft_start_R.unsqueeze(1) + col_K.unsqueeze(0)).clamp(max=max(D - 1, 0))
    b_index_RK = (first_R.unsqueeze(1) + col_K.unsqueeze(0)).clamp(max=B - 1)
    drafts_RK = draft_ids_D[d_index_RK] if D else torch.zeros(R, K, dtype=torch.long, device=device)

    p_draft_RK = target_probs_BV[b_index_RK, drafts_RK] if K else target_probs_BV.new_zeros(R, 0)
    if draft_probs_DV is None:
        accept_prob_RK = p_draft_RK  # q one-hot on the draft: min(1, p / 1)
    else:
        q_draft_RK = draft_probs_DV[d_index_RK, drafts_RK]
        accept_prob_RK = (p_draft_RK / q_draft_RK.clamp(min=_TINY)).clamp(max=1.0)
    argmax_RK = target_probs_BV.argmax(dim=-1)[b_index_RK] if K else drafts_RK
    uniform_RK = _uniforms(rows.num_draft, K, generators, device)
    kept_RK = torch.where(greedy_R.unsqueeze(1), argmax_RK == drafts_RK, uniform_RK < accept_prob_RK) & valid_RK
    # Drafts kept: the length of the leading run of kept positions.
    num_accepted_R = torch.cumprod(kept_RK.long(), dim=1).sum(dim=1) if K else num_draft_R.new_zeros(R)

    # The one token after the kept drafts: from row first + m (m = drafts kept).
    row_R = first_R + num_accepted_R
    target_RV = target_probs_BV[row_R]
    p_RV = target_RV
    rejected_R = num_accepted_R < num_draft_R
    if K:
        rej_col_R = num_accepted_R.clamp(max=K - 1)
        rej_draft_R = drafts_RK.gather(1, rej_col_R.unsqueeze(1)).squeeze(1)
        if draft_probs_DV is None:
            residual_RV = p_RV.scatter(1, rej_draft_R.unsqueeze(1), 0.0)
        else:
            q_RV = draft_probs_DV[d_index_RK.gather(1, rej_col_R.unsqueeze(1)).squeeze(1)]
            residual_RV = (p_RV - q_RV).clamp(min=0.0)
        # A residual with no mass left (p <= q everywhere, only by rounding) falls back to p.
        usable_R = rejected_R & (residual_RV.sum(dim=1) > 0)
        p_RV = torch.where(usable_R.unsqueeze(1), residual_RV, p_RV)
    sampled_R = _race(p_RV, generators, device)
    next_R = torch.where(greedy_R, target_RV.argmax(dim=-1), sampled_R)

    token_ids_RK1 = torch.full((R, K + 1), -1, dtype=torch.long, device=device)
    if K:
        keep_RK = col_K.unsqueeze(0) < num_accepted_R.unsqueeze(1)
        token_ids_RK1[:, :K] = torch.where(keep_RK, drafts_RK, token_ids_RK1[:, :K])
    token_ids_RK1.scatter_(1, num_accepted_R.unsqueeze(1), next_R.unsqueeze(1))
    return RejectionOutput(token_ids_RK1, num_accepted_R + 1, num_accepted_R)


def _uniforms(num_draft: tuple[int, ...], K: int, generators: dict[int, torch.Generator],
              device: torch.device) -> torch.Tensor:
    """U(0, 1) [R, K]: a seeded request draws one per draft of its own (n_r, whatever K the batch has) from its
    generator, first in the step, so its draws do not depend on the batch."""
    u_RK = torch.rand(len(num_draft), K, device=device)
    for r, gen in generators.items():
        n = num_draft[r]
        if n:
            u_RK[r, :n] = torch.rand(n, device=device, generator=gen)
    return u_RK


def _race(p_RV: torch.Tensor, generators: dict[int, torch.Generator], device: torch.device) -> torch.Tensor:
    """One token per row with probability proportional to p (unnormalised is fine): argmax(p / Exp(1))."""
    q_RV = torch.empty_like(p_RV).exponential_()
    for r, gen in generators.items():
        q_RV[r].exponential_(generator=gen)
    return (p_RV / q_RV.clamp_(min=_TINY)).argmax(dim=-1)
