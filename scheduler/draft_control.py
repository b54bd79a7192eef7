"""How many of each request's drafts a step verifies: an adaptive draft length per request, and a budget of verify
rows per step (speculative decoding, the scheduler's side; scheduler/spec_decode.py verifies what this grants).

Why: every verified draft is a query row the step computes for everyone. Requests whose drafts are always rejected
(32 streams built so that n-gram lookups always miss, issue 41) made every step verify k useless rows each and
slowed every other user 4x. So drafts are verified only while they are expected to pay, and a step's verify rows
are bounded whatever the drafts.

Per request (`Request.draft_accepted` / `draft_tried`): moving averages, over its verify steps, of the drafts
accepted and the drafts tried (a verify of k drafts that accepts a tried a + 1 of them when a < k, k when all were
accepted: the ones after the first rejection say nothing). Their ratio p estimates the chance that a draft is
accepted given the drafts before it were, so the i-th draft is accepted with chance about p**i. A step verifies
the first k drafts with p**k >= `SchedulerConfig.spec_min_draft_acceptance`: a request's length shrinks after
rejections (to 0 within a few verify steps when none is accepted) and grows back after acceptances. A new request
starts from its client's record (`Request.client`: slower moving averages over all its requests' verify steps,
1/1 for a client not seen yet), so a client sending many short requests whose drafts fail cannot make each new
one verify in full. At length 0 it decodes plainly; after
`spec_probe_interval` steps one draft is verified again (a probe): accepted, p climbs back and the length with
it; rejected, the wait doubles, up to 8 times the interval. While it waits, the worker's host drafter skips it
(`SchedulerOutput.no_draft_req_ids`): drafts nobody verifies cost no lookups either.

Per step: the drafts granted are at most `spec_max_verify_fraction` of the token budget and never the tokens
the running requests need themselves (one each), and requests with the higher p get theirs first (ties: the
running order, oldest first). Outputs are unchanged: a step verifies a prefix of the proposed drafts, as the
token budget already made it do, and rejection sampling is untouched. Only the verify work shrinks: a drafter
still proposes (the n-gram lookup costs the host little; a device drafter's chain is fixed at its k).
"""
from __future__ import annotations

from .config import SchedulerConfig
from .request import Request

# Weight of the newest verify step in the moving averages: a request that turns adversarial (or good) is seen
# within a few steps; the ratio of two averages (not an average of ratios) keeps the estimate unbiased.
EMA_WEIGHT = 0.5
# A request whose probes keep failing waits at most this many times spec_probe_interval between probes.
MAX_PROBE_BACKOFF = 8
# A client's record moves slower (about its last 20 verify steps): it only seeds its new requests.
CLIENT_EMA_WEIGHT = 0.05
# Clients whose record is kept, the least recently verifying dropped first (a long-running server sees a client
# per connection).
MAX_CLIENTS = 4096


class DraftControl:
    """The scheduler's draft-length policy (module docstring). `seen` turns on when a worker first proposes
    drafts: until then (speculation off) the scheduler does not call `plan`."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.min_acceptance = config.spec_min_draft_acceptance
        self.verify_fraction = config.spec_max_verify_fraction
        self.probe_interval = config.spec_probe_interval
        self.seen = False
        self.clients: dict[tuple[str, ...], list[float]] = {}  # client -> [accepted, tried] moving averages

    # ----------------------------------------------------------------- per step
    def plan(self, running: list[Request], budget: int, out=None) -> dict[str, int]:
        """How many drafts each running request holding some may verify this step (absent: none), within the
        step's verify budget, the highest estimated acceptance first. Counts down the probe waits, and names in
        `out.no_draft_req_ids` the requests whose next step will verify none (the drafter need not propose)."""
        wanted: list[tuple[float, Request, int]] = []
        total = 0
        skip = out.no_draft_req_ids if out is not None else None
        for req in running:
            if req.draft_new:
                self._seed(req)
            k = self.length(req, len(req.spec_token_ids))
            if k:
                wanted.append((req.draft_accepted / req.draft_tried, req, k))
                total += k
            elif skip is not None and req.draft_probe_wait > 0:
                skip.add(req.request_id)
        # Drafts never take the one token each running request needs (a decode starved by another request's drafts
        # would wait a whole step), nor more than their fraction of the budget.
        cap = min(int(self.verify_fraction * budget), budget - len(running))
        if total <= cap:
            return {req.request_id: k for _, req, k in wanted}
        wanted.sort(key=lambda w: w[0], reverse=True)  # stable: equal estimates keep the running order
        grants: dict[str, int] = {}
        for _, req, k in wanted:
            if cap <= 0:
                break
            grants[req.request_id] = g = min(k, cap)
            cap -= g
        return grants

    def length(self, req: Request, proposed: int) -> int:
        """The drafts `req` would verify of `proposed` (0 .. proposed), before the step's budget; each step of a
        request at length 0 counts down to its next probe (which verifies one draft, once one is proposed)."""
        floor = self.min_acceptance
        if floor <= 0:
            return proposed
        p = req.draft_accepted / req.draft_tried
        if p < floor:
            if req.draft_probe_wait > 0:
                req.draft_probe_wait -= 1
                return 0
            return 1 if proposed else 0  # the probe
        if not proposed:
            return 0
        k, q = 1, p * p
        while k < proposed and q >= floor:
            k += 1
            q *= p
        return k

    def _seed(self, req: Request) -> None:
        """A request's first drafts: it starts from its client's record (none yet: 1/1, every draft)."""
        req.draft_new = False
        record = self.clients.get(req.client)
        if record is not None:
            req.draft_accepted, req.draft_tried = record

    # ------------------------------------------------------------ per verify
    def observe(self, req: Request, num_drafts: int, accepted: int) -> None:
        """A step verified `num_drafts` of `req`'s drafts and accepted the first `accepted`."""
        tried = accepted + 1 if accepted < num_drafts else num_drafts
        keep = 1.0 - EMA_WEIGHT
        req.draft_accepted = keep * req.draft_accepted + EMA_WEIGHT * accepted
        req.draft_tried = keep * req.draft_tried + EMA_WEIGHT * tried
        record = self.clients.pop(req.client, None)  # re-inserted last: the most recently verifying
        if record is None:
            record = [1.0, 1.0]
            if len(self.clients) >= MAX_CLIENTS:
                del self.clients[next(iter(self.clients))]
        record[0] += CLIENT_EMA_WEIGHT * (accepted - record[0])
        record[1] += CLIENT_EMA_WEIGHT * (tried - record[1])
        self.clients[req.client] = record
        if req.draft_accepted < self.min_acceptance * req.draft_tried:
            # Too low to draft: wait before the next probe, twice as long as after the last failed one.
            interval = req.draft_probe_interval
            longest = MAX_PROBE_BACKOFF * self.probe_interval
            interval = self.probe_interval if not interval else min(2 * interval, longest)
            req.draft_probe_interval = req.draft_probe_wait = interval
        else:
            req.draft_probe_interval = 0


__all__ = ["CLIENT_EMA_WEIGHT", "DraftControl", "EMA_WEIGHT", "MAX_CLIENTS", "MAX_PROBE_BACKOFF"]
