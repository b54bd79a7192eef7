"""Speculative decoding, the scheduler's side: how many of a request's draft tokens a step verifies, and what a
verify step's output changes (computed tokens rolled back past the first rejected draft; the counters).

The worker proposes drafts after a step (`ModelRunnerOutput.draft_token_ids`); the scheduler keeps them on the
request (`Request.spec_token_ids`) and the next step that schedules the request verifies them: it computes the
request's last known token and its k drafts (k + 1 query tokens, KV written for all), and returns the accepted
drafts and one more token (engine/spec/rejection.py). The request then holds `a + 1` new tokens and KV
for `a + 1` of the `k + 1` positions: `num_computed_tokens` goes back by the `k - a` rejected drafts, whose KV
slots the next tokens overwrite (their blocks stay allocated).

How many of the drafts a step verifies is scheduler/draft_control.py's: fewer for a request whose drafts keep
failing, and a bounded number per step. Drafts are verified only by a decode step of a request with nothing in flight (the serial loop: speculative
decoding turns async scheduling off), and only as many as the token budget, max_tokens, max_model_len and the
pool leave room for: a verified draft that is accepted becomes an output token.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .request import Request


def take_drafts(req: Request, out, n: int, in_flight: int, budget: int, max_len: int, pool_tokens: int,
                grants: dict[str, int] | None = None) -> int:
    """Move `req`'s drafts into the step `out` when it computes one token with nothing in flight (a decode of the
    serial loop): as many as `num_verifiable` allows, and no more than the step's `grants` give it
    (scheduler/draft_control.py; None: no limit). Returns how many (the step computes them too)."""
    spec, req.spec_token_ids = req.spec_token_ids, []
    if grants is not None:
        spec = spec[:grants.get(req.request_id, 0)]
    k = num_verifiable(req, spec, budget - n, max_len, pool_tokens) if spec and n == 1 and not in_flight else 0
    if k:
        out.scheduled_spec_tokens[req.request_id] = spec[:k]
    return k


def num_verifiable(req: Request, spec: list[int], budget_left: int, max_len: int, pool_tokens: int) -> int:
    """How many of the drafts `spec` a decode step of `req` verifies besides its one token (0 .. k)."""
    known = len(req.all_token_ids)
    room = min(len(spec), budget_left,
               req.output_limit - len(req.output_token_ids) - 1,  # every accepted draft is an output token
               max_len - known - 1, pool_tokens - known - 1)
    return room if room > 0 else 0


@dataclass
class SpecDecodeCounters:
    """Cumulative: verify rows (a request verifying >= 1 draft in a step), drafts verified, drafts accepted, and
    per draft position (0 = the first draft) how often it was accepted. Mean accepted length per verify row:
    1 + accepted / rows (the token after the drafts always comes)."""

    num_verify_rows: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def record(self, num_drafts: int, num_accepted: int) -> None:
        self.num_verify_rows += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        pos = self.accepted_per_position
        if len(pos) < num_drafts:
            pos.extend([0] * (num_drafts - len(pos)))
        for i in range(num_accepted):
            pos[i] += 1

    def add(self, other: "SpecDecodeCounters") -> None:
        self.num_verify_rows += other.num_verify_rows
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        pos = self.accepted_per_position
        if len(pos) < len(other.accepted_per_position):
            pos.extend([0] * (len(other.accepted_per_position) - len(pos)))
        for i, n in enumerate(other.accepted_per_position):
            pos[i] += n

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verify row: the accepted drafts plus the one token after them."""
        return 1.0 + self.num_accepted_tokens / self.num_verify_rows if self.num_verify_rows else 0.0

    def copy(self) -> "SpecDecodeCounters":
        return SpecDecodeCounters(self.num_verify_rows, self.num_draft_tokens, self.num_accepted_tokens,
                                  list(self.accepted_per_position))
