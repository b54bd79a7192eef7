"""The client tree scheduler/fairness.py shares by: the clients holding requests as a tree of their paths
(("host:H", "conn:P"), ("host:H", "user:NAME"), ...), each node's part, and the hierarchical choices made on it.

Why a tree and not a list of leaves: a leaf's share of 64 slots beside 63 sibling connections is a fraction of a
slot, so a host spreading its load over many connections (or a keyed caller over fresh names) never had a leaf
"over its share" to take a slot from, and another host's request waited for a whole generation (issue 95). The
choices here are made from the top instead: the group above its share gives, down to one of its leaves.

A node is a path prefix; the client `c` itself is the leaf `c + ("",)`, so a client whose path is a prefix of
another's (() beside ("user:u",)) is a child of its own node, as `client_parts` always counted it.
"""
from __future__ import annotations

import heapq
from collections.abc import Iterable

Client = tuple[str, ...]
Node = tuple[str, ...]


def leaf(client: Client) -> Node:
    return client + ("",)


class ClientTree:
    """The tree of a set of clients: `children` and `part` per node (the root () has part 1; each node an equal
    part of its parent's), `path[c]` the nodes from the top-level group down to c's leaf (the root excluded)."""

    def __init__(self, clients: Iterable[Client]) -> None:
        children: dict[Node, dict[Node, None]] = {}  # a dict for its order: deterministic choices
        self.path: dict[Client, tuple[Node, ...]] = {}
        for c in clients:
            full = leaf(c)
            nodes = tuple(full[:i + 1] for i in range(len(full)))
            self.path[c] = nodes
            parent: Node = ()
            for node in nodes:
                children.setdefault(parent, {})[node] = None
                parent = node
        self.children = {node: list(kids) for node, kids in children.items()}
        part: dict[Node, float] = {(): 1.0}
        stack: list[Node] = [()]
        while stack:
            node = stack.pop()
            kids = self.children.get(node, ())
            for kid in kids:
                part[kid] = part[node] / len(kids)
                stack.append(kid)
        self.part = part

    def client_parts(self) -> dict[Client, float]:
        return {c: self.part[nodes[-1]] for c, nodes in self.path.items()}

    def totals(self, counts: dict[Client, int]) -> dict[Node, int]:
        """Per node, the sum of `counts` over the clients below it (clients not in the tree are left out)."""
        out: dict[Node, int] = {}
        path = self.path
        for c, n in counts.items():
            nodes = path.get(c)
            if nodes is not None and n:
                for node in nodes:
                    out[node] = out.get(node, 0) + n
        return out

    def add(self, totals: dict[Node, int], client: Client, k: int) -> None:
        for node in self.path[client]:
            totals[node] = totals.get(node, 0) + k

    def key(self, seats: dict[Node, int], client: Client) -> tuple[float, ...]:
        """How served `client` is, from the top: its top-level group's seats relative to its part, then its own
        within it, ... (compared as tuples: the group decides first)."""
        part = self.part
        return tuple(seats.get(n, 0) / part[n] for n in self.path.get(client, ()))

    def latest(self, index: dict[Client, int]) -> dict[Node, int]:
        """Per node, the largest `index` below it."""
        out: dict[Node, int] = {}
        for c, i in index.items():
            for node in self.path.get(c, ()):
                if out.get(node, -1) < i:
                    out[node] = i
        return out

    def donor(self, receiver: Client, seats: dict[Node, int], movable: dict[Node, int], total: int,
              latest: dict[Node, int] | None = None) -> Client | None:
        """The client to take a slot from for `receiver` (module docstring of fairness.py), or None. From the top:
        at the first level where the receiver's group is below its share (one more seat keeps it within), the
        sibling group furthest above its share that one seat fewer keeps at or above it, then down inside that
        group the child furthest above its share, to a leaf. `movable`: per node, the running sequences that may be
        preempted (a donor needs one). `total`: max_num_seqs (a node's share is total * part). `latest`: per
        node, where its latest movable sequence is in the running list: ties go to the latest admitted, as a KV
        preemption's do."""
        part, children, latest = self.part, self.children, latest or {}
        parent: Node = ()
        for r in self.path[receiver]:
            if seats.get(r, 0) + 1 <= total * part[r]:  # the receiver may gain at this level
                best, best_key = None, None
                for d in children[parent]:
                    if d == r or not movable.get(d):
                        continue
                    over = seats.get(d, 0) - total * part[d]
                    if over >= 1 and (best is None or (over, latest.get(d, -1)) > best_key):
                        best, best_key = d, (over, latest.get(d, -1))
                if best is not None:
                    return self._descend(best, seats, movable, total, latest)
            parent = r  # at its share here: only a sibling inside its own group may give
        return None

    def _descend(self, node: Node, seats: dict[Node, int], movable: dict[Node, int], total: int,
                 latest: dict[Node, int]) -> Client:
        """The leaf under `node` reached by taking, at each level, the child furthest above its share among those
        with a movable sequence (ties: the latest admitted)."""
        part, children = self.part, self.children
        while node in children:
            node = max((k for k in children[node] if movable.get(k)),
                       key=lambda k: (seats.get(k, 0) - total * part[k], latest.get(k, -1)))
        return node[:-1]


class FairPicker:
    """The receivers of slots in hierarchical fair order: from the root, the child group (with requests waiting)
    with the fewest seats relative to its part, earliest waiting first on ties, down to a leaf. Per node a heap of
    its children; a pick pops one entry per level and `commit` pushes them back, so a pick costs O(depth log n)."""

    def __init__(self, tree: ClientTree, seats: dict[Node, int], waiting: dict[Client, int],
                 order: dict[Client, int]) -> None:
        self.tree, self.seats = tree, seats  # seats: mutated by commit
        self.left = tree.totals(waiting)  # requests waiting below each node
        first: dict[Node, int] = {}
        for c, i in order.items():
            for node in tree.path.get(c, ()):
                if first.get(node, i) >= i:
                    first[node] = i
        self.first = first
        self.heaps: dict[Node, list] = {}
        queued: set[Node] = set()  # the nodes already in their parent's heap
        for c in waiting:
            parent: Node = ()
            for node in tree.path.get(c, ()):
                if node not in queued:
                    queued.add(node)
                    self.heaps.setdefault(parent, []).append(self._entry(node))
                parent = node
        for h in self.heaps.values():
            heapq.heapify(h)

    def _entry(self, node: Node) -> tuple:
        return (self.seats.get(node, 0) / self.tree.part[node], self.first.get(node, 0), node)

    def pick(self) -> tuple[Client, list] | None:
        """The next receiver and the path popped for it (pass both to `commit`), or None when nobody waits."""
        popped = []
        parent: Node = ()
        children = self.tree.children
        while True:
            h = self.heaps.get(parent)
            if not h:  # only at the root: a node is queued only while requests wait below it
                return None
            node = heapq.heappop(h)[2]
            popped.append((parent, node))
            if node not in children:
                return node[:-1], popped
            parent = node

    def commit(self, popped: list, took: bool) -> None:
        """`took`: the receiver got a slot (one seat more, one request fewer waiting); else it is out of this
        round (all its waiting requests leave the order)."""
        k = 1 if took else self.left[popped[-1][1]]
        for _, node in popped:
            self.left[node] -= k
            if took:
                self.seats[node] = self.seats.get(node, 0) + 1
        for parent, node in popped:
            if self.left[node] > 0:
                heapq.heappush(self.heaps[parent], self._entry(node))


__all__ = ["ClientTree", "FairPicker", "leaf"]
