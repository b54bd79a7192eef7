"""Per-client fairness of sequence slots and of a step's token budget.

Why: one client with 4 requests of n=64 held all 256 sequence slots while everyone else waited over a minute
(issue 41): first come, first served lets whoever queues the most sequences take the whole engine.

What a client is: `Request.client`, a path of names from the widest to the narrowest, set by the server
(engine/server/client_identity.py): ("host:H", "conn:P") for a gRPC peer (its host, then its connection), or
("user:NAME",) for an identity vouched for by a caller holding the API key (a gateway forwarding its users'); ()
for offline use. The n samples of a request are sequences of its client.

Shares are hierarchical over the clients holding requests: each name at a level gets an equal part of its
parent's part, so more connections from one host split that host's part instead of adding to it (hosts compete
as equals), while two programs on one host (loopback) are still two clients. A client's share of max_num_seqs is
max_num_seqs times its part; its share of a step's tokens, the token budget times its part.

The rules, only while requests of more than one client are held (one client alone may use everything):
- admission order: the next request admitted is the head of the waiting client with the fewest running sequences
  relative to its share (each client's own requests keep their order);
- slots (`SchedulerConfig.client_fair_preemption`): a client below its slot share whose request waits while no
  slot is free takes one from the client furthest above its share, whose latest-admitted running sequence is
  preempted (recomputed later, as under KV pressure). A move never takes a client below its share nor lifts one
  above it, so slots do not ping-pong; at most MAX_PREEMPTIONS_PER_STEP a step, the emptiest client served first
  (a newcomer's first sequence gets the first slot);
- KV: a step serves its running requests in fair order (the clients furthest below their share first), and when
  the pool runs dry the request preempted is the latest of the client furthest above its share among those not
  served yet (not simply the latest arrival, which would push out the newcomer every time);
- tokens: a prompt chunk (a running request's or a newly admitted one's) is cut to what is left of its client's
  token share this step after one token for each of its running sequences, but never below one token, so every
  request progresses. Decodes are not cut: they are the latency this protects.
Preemption happens before the step's running requests are scheduled, so nothing already scheduled is undone.
"""
from __future__ import annotations

import functools
import heapq
from collections.abc import Iterable

from .config import SchedulerConfig
from .request import Request, RequestStatus

Client = tuple[str, ...]

# Fair-share preemptions in one step: a heavy client arriving beside another converges over a few steps rather
# than making one step recompute hundreds of sequences.
MAX_PREEMPTIONS_PER_STEP = 16


def client_parts(clients: Iterable[Client]) -> dict[Client, float]:
    """Each client's part (0 < part <= 1, summing to 1): equal parts per level of the paths (module docstring)."""
    clients = list(clients)
    children: dict[Client, set[str]] = {}
    for c in clients:
        path = c + ("",)  # a leaf mark: a client whose path is a prefix of another's is a child of its own
        for i in range(len(path)):
            children.setdefault(path[:i], set()).add(path[i])
    parts = {}
    for c in clients:
        path, part = c + ("",), 1.0
        for i in range(len(path)):
            part /= len(children[path[:i]])
        parts[c] = part
    return parts


class ClientFairness:
    """The scheduler's per-client bookkeeping: how many unfinished requests each client holds (kept by the
    scheduler's add and release), and each step's `FairStep` when more than one client holds some."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.enabled = config.client_fairness
        self.preempt = config.client_fair_preemption
        self.max_seqs = config.max_num_seqs
        self.counts: dict[Client, int] = {}
        self._parts: dict[Client, float] | None = None  # for the clients of `counts`, made when first needed

    def added(self, req: Request) -> None:
        c = req.client
        n = self.counts.get(c)
        if n is None:
            self.counts[c] = 1
            self._parts = None
        else:
            self.counts[c] = n + 1

    def removed(self, req: Request) -> None:
        c = req.client
        n = self.counts.get(c, 0) - 1
        if n > 0:
            self.counts[c] = n
        else:
            self.counts.pop(c, None)
            self._parts = None

    def parts(self) -> dict[Client, float]:
        if self._parts is None:
            self._parts = client_parts(self.counts)
        return self._parts

    def begin_step(self, sched, out, budget: int) -> "FairStep | None":
        """This step's shares (None while at most one client holds requests: nothing to share), after the
        fair-share preemptions the waiting clients are owed (added to `out.preempted_req_ids`)."""
        if not self.enabled or len(self.counts) < 2:
            return None
        step = FairStep(self, sched, budget)
        if self.preempt:
            step.preempt(out)
        step.begin_running()
        return step

    def check(self, requests: Iterable[Request]) -> None:
        """AssertionError unless `counts` matches the scheduler's unfinished requests (tests)."""
        want: dict[Client, int] = {}
        for r in requests:
            want[r.client] = want.get(r.client, 0) + 1
        assert want == self.counts, f"client counts {self.counts} != requests' {want}"


class FairStep:
    """One step's view: each client's part, running sequences and what is left of its token share. Computed when
    first needed: a decode step with nothing waiting and room in the pool costs nothing more."""

    def __init__(self, fair: ClientFairness, sched, budget: int) -> None:
        self.fair, self.sched, self.budget = fair, sched, budget
        self.parts = fair.parts()
        # Requests a KV connector loads (scheduler/kv_connector.py) hold their blocks but are not waiting; those
        # loaded (`ready`) hold a sequence slot as the running ones do, those still loading none.
        kvt = sched.kv_transfers
        self.ready = list(kvt.ready) if kvt is not None else []
        self._kvt = kvt
        self.tokens_left: dict[Client, int] = {}  # filled per client at its first prompt chunk (`cap`)
        self.num_preempted = 0

    @functools.cached_property
    def usage(self) -> dict[Client, int]:
        """Sequence slots each client holds (running, or loaded by the KV connector)."""
        usage = dict.fromkeys(self.fair.counts, 0)
        for r in self.sched.running:
            usage[r.client] = usage.get(r.client, 0) + 1
        for r in self.ready:
            usage[r.client] = usage.get(r.client, 0) + 1
        return usage

    @functools.cached_property
    def loading(self) -> dict[Client, int]:
        """Requests each client has loading through the KV connector (neither waiting nor holding a slot)."""
        loading: dict[Client, int] = {}
        for r in self._kvt.loading.values() if self._kvt is not None else ():
            loading[r.client] = loading.get(r.client, 0) + 1
        return loading

    def _free_slots(self) -> int:
        return self.fair.max_seqs - len(self.sched.running) - len(self.ready)

    def _waiting(self) -> dict[Client, int]:
        """Requests each client has in the waiting queue, for those with some."""
        usage, loading = self.usage, self.loading
        waiting = {}
        for c, n in self.fair.counts.items():
            w = n - usage.get(c, 0) - loading.get(c, 0)
            if w > 0:
                waiting[c] = w
        return waiting

    # ---------------------------------------------------------------- slots
    def preempt(self, out) -> None:
        """Take slots for waiting clients below their share from clients above theirs (module docstring)."""
        if not self.sched.waiting:
            return
        waiting = self._waiting()
        if not waiting:
            return
        free = self._free_slots()
        max_seqs, parts = self.fair.max_seqs, self.parts
        share = {c: max_seqs * part for c, part in parts.items()}
        seats = dict(self.usage)  # running sequences, and the slots this plan gives
        heap = [(seats.get(c, 0) / parts[c], c) for c in waiting if c in parts]
        heapq.heapify(heap)
        while heap and self.num_preempted < MAX_PREEMPTIONS_PER_STEP:
            _, c = heapq.heappop(heap)
            if seats.get(c, 0) + 1 > share[c]:
                continue  # at its share: it waits for a slot to free like anyone
            if free > 0:
                free -= 1  # admission gives it a free slot (it comes first: `order_waiting`)
            else:
                donor = max((d for d, n in seats.items() if d in share and n - 1 >= share[d]),
                            key=lambda d: seats[d] - share[d], default=None)
                victim = self._latest_running(donor) if donor is not None else None
                if victim is None:
                    break  # nobody above its share (or only through loaded requests): wait
                self._preempt(victim, out)
                seats[donor] -= 1
            seats[c] = seats.get(c, 0) + 1
            waiting[c] -= 1
            if waiting[c]:
                heapq.heappush(heap, (seats[c] / parts[c], c))

    def _latest_running(self, client: Client) -> Request | None:
        for r in reversed(self.sched.running):  # sorted by priority: the latest admitted last
            if r.client == client and not r.must_load:  # a load-only request would end (scheduler/load_only.py)
                return r
        return None

    def _preempt(self, req: Request, out) -> None:
        sched = self.sched
        sched.running.remove(req)
        if sched._preempt(req):
            out.preempted_req_ids.add(req.request_id)
        self.usage[req.client] -= 1
        self.num_preempted += 1

    # -------------------------------------------------------- running loop
    def begin_running(self) -> None:
        """Put the running list in fair order for this step's loop: the clients furthest below their share first
        (each client's own in priority order). The loop serves them first when the token budget is short, and a
        KV preemption (`kv_victim`, among the requests not served yet) can then still pick an over-share
        client's request rather than the newcomer's own, which arrived last. `end_running` sorts it back."""
        sched = self.sched
        # Only when the pool could run dry this step (it writes at most the token budget, plus a block per request
        # whose last block is full): otherwise no KV preemption can happen and decode rows all fit the budget.
        self.reordered = sched.kv.pool.num_free_blocks <= self.budget // sched.block_size + len(sched.running)
        if self.reordered:
            parts, usage = self.parts, self.usage
            ratio = {c: usage.get(c, 0) / part for c, part in parts.items()}
            sched.running.sort(key=lambda r: ratio.get(r.client, 0.0))  # stable: priority order within a client

    def end_running(self) -> None:
        """The running list back in priority order (admission inserts by it; KV preemption takes its last)."""
        if self.reordered:
            priority = self.sched._priority
            self.sched.running.sort(key=lambda r: priority[r.request_id])

    def kv_victim(self, start: int) -> Request:
        """Out of the running list, the request to preempt when the KV pool runs dry: among those not scheduled yet
        this step (index >= `start`), the latest admitted of the client furthest above its share (relative to
        it), so a newcomer is not the one always pushed out because it came last."""
        running, parts, usage = self.sched.running, self.parts, self.usage
        best_j, best = len(running) - 1, (False, -1.0)
        for j in range(len(running) - 1, start - 1, -1):  # latest first: a client's first seen is its latest
            c = running[j].client
            # A load-only request only when nothing else is left (it would end: scheduler/load_only.py).
            over = (not running[j].must_load, usage.get(c, 0) / parts.get(c, 1.0))
            if over > best:
                best_j, best = j, over
        victim = running.pop(best_j)
        usage[victim.client] = usage.get(victim.client, 1) - 1
        return victim

    # ------------------------------------------------------------ admission
    def order_waiting(self) -> None:
        """Reorder the scheduler's waiting queue so that the requests the free slots go to come first, in fair
        order (each client's own keep their order; the rest stays behind as it was). O(waiting) when several
        clients wait and a slot is free; nothing otherwise."""
        waiting = self.sched.waiting
        if len(waiting) < 2 or self._free_slots() <= 0 or len(self._waiting()) < 2:
            return
        free = self._free_slots()
        groups: dict[Client, list[Request]] = {}
        for r in waiting:
            groups.setdefault(r.client, []).append(r)
        parts, seats = self.parts, dict(self.usage)
        heap = [(seats.get(c, 0) / parts.get(c, 1.0), i, c) for i, c in enumerate(groups)]
        heapq.heapify(heap)
        nxt = dict.fromkeys(groups, 0)
        first: list[Request] = []
        while heap and len(first) < free:
            _, i, c = heapq.heappop(heap)
            first.append(groups[c][nxt[c]])
            nxt[c] += 1
            seats[c] = seats.get(c, 0) + 1
            if nxt[c] < len(groups[c]):
                heapq.heappush(heap, (seats[c] / parts.get(c, 1.0), i, c))
        taken = {id(r) for r in first}
        rest = [r for r in waiting if id(r) not in taken]
        waiting.clear()
        waiting.extend(first)
        waiting.extend(rest)

    # --------------------------------------------------------------- tokens
    def cap(self, req: Request, n: int) -> int:
        """`n` (a prompt chunk of `req`) cut to what is left of its client's token share, at least 1."""
        c = req.client
        left = self.tokens_left.get(c)
        if left is None:
            part = self.parts.get(c)
            if part is None:
                return n
            left = int(self.budget * part) - self.usage.get(c, 0)  # one token kept for each running sequence
        own = 1 if req.status is RequestStatus.RUNNING else 0  # a running one's own token was kept for it
        allowed = left + own
        if n > allowed:
            n = allowed if allowed > 1 else 1
        self.tokens_left[c] = left + own - n
        return n


__all__ = ["ClientFairness", "FairStep", "MAX_PREEMPTIONS_PER_STEP", "client_parts"]
