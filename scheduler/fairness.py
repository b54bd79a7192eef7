"""Per-client fairness of sequence slots and of a step's token budget.

Why: one client with 4 requests of n=64 held all 256 sequence slots while everyone else waited over a minute
(issue 41): first come, first served lets whoever queues the most sequences take the whole engine.

What a client is: `Request.client`, a path of names from the widest to the narrowest, set by the server
(engine/server/client_identity.py): ("host:H", "conn:P") for a gRPC or HTTP peer (its host, then its connection),
or ("host:H", "user:NAME") for an end user a caller holding the API key names (a gateway forwarding its users'); ()
for offline use. The n samples of a request are sequences of its client.

Shares are hierarchical over the clients holding requests (the client tree, scheduler/fair_tree.py): each name at a
level gets an equal part of its parent's part, so more connections (or names) from one host split that host's part
instead of adding to it (hosts compete as equals), while two programs on one host (loopback) are still two clients.
A node's share of max_num_seqs is max_num_seqs times its part; a client's share of a step's tokens, the token
budget times its part.

Every choice is made from the top of the tree, not among leaves: a host spreading 64 one-request connections (or a
fresh x-client-id per request) over every slot has no leaf above its leaf's share of a fraction of a slot, and
judged per leaf another host's request waited a whole generation (issue 95). The rules, only while requests of
more than one client are held (one client alone may use everything):
- admission order: the free slots go in fair order (`FairPicker`): from the root, the group with the fewest
  sequences relative to its share (ties: the one waiting first), down to one of its clients, whose own requests
  keep their order;
- slots (`SchedulerConfig.client_fair_preemption`): a waiting client that no free slot is left for takes one by
  preemption (recomputed later, as under KV pressure). The donor (`ClientTree.donor`) is found at the widest level
  where the receiver's group is below its share: the sibling group furthest above its share, then inside it the
  child furthest above its share, down to a client, whose latest-admitted running sequence is preempted. A move
  never takes the donor group below its share nor lifts the receiver's group above it at the level where the two
  diverge (the levels above: the same group, nothing changes), so slots do not ping-pong; at most
  MAX_PREEMPTIONS_PER_STEP a step, in the fair order above (a newcomer's first sequence gets the first slot);
- KV: a step serves its running requests in fair order (the groups furthest below their share first, judged from
  the top), and when the pool runs dry the request preempted is the latest of the client furthest above its share,
  judged from the top, among those not served yet (not simply the latest arrival, which would push out the
  newcomer every time);
- tokens: a prompt chunk (a running request's or a newly admitted one's) is cut to what is left of its client's
  token share this step after one token for each of its running sequences, but never below one token, so every
  request progresses. Decodes are not cut: they are the latency this protects. The parts of a host's clients sum to
  the host's part, so spreading buys no tokens either (beyond the one-token floor per prompt chunk).
Preemption happens before the step's running requests are scheduled, so nothing already scheduled is undone.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable

from .config import SchedulerConfig
from .fair_tree import ClientTree, FairPicker
from .request import Request, RequestStatus

Client = tuple[str, ...]

# Fair-share preemptions in one step: a heavy client arriving beside another converges over a few steps rather
# than making one step recompute hundreds of sequences.
MAX_PREEMPTIONS_PER_STEP = 16


def client_parts(clients: Iterable[Client]) -> dict[Client, float]:
    """Each client's part (0 < part <= 1, summing to 1): equal parts per level of the paths (module docstring)."""
    return ClientTree(clients).client_parts()


class ClientFairness:
    """The scheduler's per-client bookkeeping: how many unfinished requests each client holds (kept by the
    scheduler's add and release), and each step's `FairStep` when more than one client holds some."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.enabled = config.client_fairness
        self.preempt = config.client_fair_preemption
        self.max_seqs = config.max_num_seqs
        self.counts: dict[Client, int] = {}
        self._tree: ClientTree | None = None  # of the clients of `counts`, made when first needed
        self._parts: dict[Client, float] | None = None

    def added(self, req: Request) -> None:
        c = req.client
        n = self.counts.get(c)
        if n is None:
            self.counts[c] = 1
            self._tree = self._parts = None
        else:
            self.counts[c] = n + 1

    def removed(self, req: Request) -> None:
        c = req.client
        n = self.counts.get(c, 0) - 1
        if n > 0:
            self.counts[c] = n
        else:
            self.counts.pop(c, None)
            self._tree = self._parts = None

    def tree(self) -> ClientTree:
        if self._tree is None:
            self._tree = ClientTree(self.counts)
        return self._tree

    def parts(self) -> dict[Client, float]:
        if self._parts is None:
            self._parts = self.tree().client_parts()
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
        self.tree = fair.tree()
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
    def seats(self) -> dict:
        """`usage` summed per node of the client tree (a host's, a user's, ... groups)."""
        return self.tree.totals(self.usage)

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

    def _client_order(self) -> dict[Client, int]:
        """Each client's place by when it first held a request (`counts` keeps that order): the tie-break of fair
        order. O(clients), not O(waiting requests): it is made every step that anyone waits."""
        return {c: i for i, c in enumerate(self.fair.counts)}

    # ---------------------------------------------------------------- slots
    def preempt(self, out) -> None:
        """Take slots for waiting clients below their share from clients above theirs, from the top of the client
        tree (module docstring)."""
        if not self.sched.waiting:
            return
        waiting = self._waiting()
        if not waiting:
            return
        tree, free, total = self.tree, self._free_slots(), self.fair.max_seqs
        seats = dict(self.seats)  # running sequences, and the slots this plan gives
        movable_of, latest_of = self._movable()
        movable = tree.totals(movable_of)  # sequences a preemption may take, per node
        latest = tree.latest(latest_of)  # ties between donors: the latest admitted gives
        picker = FairPicker(tree, seats, waiting, self._client_order())
        while self.num_preempted < MAX_PREEMPTIONS_PER_STEP:
            picked = picker.pick()
            if picked is None:
                break
            c, popped = picked
            if free > 0:
                free -= 1  # admission gives it a free slot (`order_waiting` makes the same fair order)
                picker.commit(popped, took=True)
                continue
            donor = tree.donor(c, seats, movable, total, latest)
            if donor is None:  # at its share at every level, or nobody above theirs: it waits for a free slot
                picker.commit(popped, took=False)
                continue
            self._preempt(self._latest_running(donor), out)
            tree.add(seats, donor, -1)
            tree.add(movable, donor, -1)
            # (The donor's own entries in the picker keep their older ratios this step: a bounded, conservative lag.)
            picker.commit(popped, took=True)

    def _movable(self) -> tuple[dict[Client, int], dict[Client, int]]:
        """Per client, its running sequences a preemption may take, and the running-list index of its latest."""
        movable: dict[Client, int] = {}
        latest: dict[Client, int] = {}
        for i, r in enumerate(self.sched.running):
            if not r.must_load:  # a load-only request would end (scheduler/load_only.py)
                movable[r.client] = movable.get(r.client, 0) + 1
                latest[r.client] = i
        return movable, latest

    def _latest_running(self, client: Client) -> Request:
        for r in reversed(self.sched.running):  # sorted by priority: the latest admitted last
            if r.client == client and not r.must_load:
                return r
        raise AssertionError(f"no movable request of {client}")  # `movable` counted one

    def _preempt(self, req: Request, out) -> None:
        sched = self.sched
        sched.running.remove(req)
        if sched._preempt(req):
            out.preempted_req_ids.add(req.request_id)
        self.usage[req.client] -= 1
        self.tree.add(self.seats, req.client, -1)
        self.num_preempted += 1

    # -------------------------------------------------------- running loop
    def begin_running(self) -> None:
        """Put the running list in fair order for this step's loop: the clients furthest below their share first,
        judged from the top of the client tree (each client's own in priority order). The loop serves them first
        when the token budget is short, and a KV preemption (`kv_victim`, among the requests not served yet) can
        then still pick an over-share client's request rather than the newcomer's own, which arrived last.
        `end_running` sorts it back."""
        sched = self.sched
        # Only when the pool could run dry this step (it writes at most the token budget, plus a block per request
        # whose last block is full): otherwise no KV preemption can happen and decode rows all fit the budget.
        self.reordered = sched.kv.pool.num_free_blocks <= self.budget // sched.block_size + len(sched.running)
        if self.reordered:
            tree, seats = self.tree, self.seats
            keys = {c: tree.key(seats, c) for c in self.usage}
            sched.running.sort(key=lambda r: keys.get(r.client, ()))  # stable: priority order within a client

    def end_running(self) -> None:
        """The running list back in priority order (admission inserts by it; KV preemption takes its last)."""
        if self.reordered:
            priority = self.sched._priority
            self.sched.running.sort(key=lambda r: priority[r.request_id])

    def kv_victim(self, start: int) -> Request:
        """Out of the running list, the request to preempt when the KV pool runs dry: among those not scheduled yet
        this step (index >= `start`), the latest admitted of the client furthest above its share, judged from the
        top of the client tree (the group first), so a newcomer is not the one always pushed out because it came
        last."""
        running, tree, seats = self.sched.running, self.tree, self.seats
        keys: dict[Client, tuple] = {}
        best_j, best = len(running) - 1, None
        for j in range(len(running) - 1, start - 1, -1):  # latest first: a client's first seen is its latest
            r = running[j]
            k = keys.get(r.client)
            if k is None:
                k = keys[r.client] = tree.key(seats, r.client)
            # A load-only request only when nothing else is left (it would end: scheduler/load_only.py).
            over = (not r.must_load, k)
            if best is None or over > best:
                best_j, best = j, over
        victim = running.pop(best_j)
        self.usage[victim.client] = self.usage.get(victim.client, 1) - 1
        if victim.client in tree.path:
            tree.add(seats, victim.client, -1)
        return victim

    # ------------------------------------------------------------ admission
    def order_waiting(self) -> None:
        """Reorder the scheduler's waiting queue so that the requests the free slots go to come first, in fair
        order from the top of the client tree (each client's own keep their order; the rest stays behind as it
        was). O(waiting) when several clients wait and a slot is free; nothing otherwise."""
        waiting = self.sched.waiting
        if len(waiting) < 2 or self._free_slots() <= 0 or len(self._waiting()) < 2:
            return
        free = self._free_slots()
        groups: dict[Client, list[Request]] = {}
        for r in waiting:
            groups.setdefault(r.client, []).append(r)
        order = {c: i for i, c in enumerate(groups)}
        picker = FairPicker(self.tree, dict(self.seats), {c: len(g) for c, g in groups.items()}, order)
        nxt = dict.fromkeys(groups, 0)
        first: list[Request] = []
        while len(first) < free:
            picked = picker.pick()
            if picked is None:
                break
            c, popped = picked
            first.append(groups[c][nxt[c]])
            nxt[c] += 1
            picker.commit(popped, took=True)
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
