"""peft's `rank_pattern` / `alpha_pattern` keys matched without a backtracking regex engine.

peft gives a module the value of the first key (in the config's order) for which
`re.match(rf"(.*\\.)?({key})$", module)` matches (peft/utils/other.py `get_pattern_key`): a key is a Python regular
expression, matched against a dot-delimited suffix of the module's name. Python's `re` backtracks: a key such as
`(.|.){0,22}#` took 24 s to fail against one module name, in C, holding the GIL (every user waited), and each +1
doubles it. So a key is parsed here into a Thompson NFA and simulated one character at a time over the set of its
live states (as RE2 does): time linear in the module name's length times the key's states, never exponential.

What is accepted (what peft users write: module names, `.*\\.name`, `layers\\.[0-9]+\\.q_proj`, `(q|v)_proj`):
literals, escapes of punctuation, `.`, classes `[...]` (ranges, negation, `\\d \\w \\s` and their negations), groups
`(...)`, `(?:...)`, `(?P<name>...)`, alternation, the quantifiers `* + ? {m} {m,} {,n} {m,n}` (lazy or greedy: the
same match or not), anchors `^ $ \\A \\Z`. Refused with an error naming the key: backreferences, lookarounds, inline
flags, possessive quantifiers, word boundaries, a stray `{` or `}`, and keys over MAX_KEY_CHARS characters or
MAX_KEY_STATES states (a counted repeat is expanded). A key with no quantifier and no alternation (a module name:
the usual key) has one length and no choice point: it is matched by `re` on the one suffix of that length, which
cannot backtrack. Every match spends from a `MatchBudget` shared by one adapter's keys and targets: an adapter
whose keys would cost more than MAX_MATCH_STEPS is refused, naming the field.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

MAX_PATTERN_KEYS = 4096  # keys of one rank_pattern / alpha_pattern (peft's EVA writes one per module)
MAX_KEY_CHARS = 512
MAX_KEY_STATES = 512  # NFA states of one key, counted repeats expanded
MAX_MATCH_STEPS = 2_000_000  # NFA state visits (and characters compared) for all of one adapter's matching

_ANY = object()  # `.`: every character but a newline

Pred = Callable[[str], bool]


class MatchBudget:
    """The matching work one adapter may cost; `spend` raises ValueError naming `field` once it is used up."""

    def __init__(self, steps: int = MAX_MATCH_STEPS):
        self.left = steps
        self.field = "rank_pattern"

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise ValueError(f"adapter_config.json {self.field}: matching its keys against this model's modules "
                             f"costs over {MAX_MATCH_STEPS} steps: give module names or simple patterns "
                             "(`.*\\.q_proj`, `layers\\.[0-9]+\\.`).")


# -- parsing: a key to a small AST --------------------------------------------------------------------------------
# Nodes: ("char", pred), ("cat", [nodes]), ("alt", [nodes]), ("rep", node, lo, hi|None), ("bol",), ("eol",)


class _Parser:
    def __init__(self, text: str):
        self.s, self.i = text, 0

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{what} at character {self.i}")

    def peek(self) -> Optional[str]:
        return self.s[self.i] if self.i < len(self.s) else None

    def take(self) -> str:
        c = self.s[self.i]
        self.i += 1
        return c

    def parse(self):
        node = self.alt()
        if self.i != len(self.s):
            raise self.fail("unbalanced ')'")
        return node

    def alt(self):
        branches = [self.cat()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.cat())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def cat(self):
        items = []
        while self.peek() not in (None, "|", ")"):
            atom = self.atom()
            items.append(self.quantified(atom))
        return ("cat", items)

    def quantified(self, atom):
        while True:
            c = self.peek()
            if c in ("*", "+", "?"):
                self.i += 1
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
            elif c == "{":
                m = re.compile(r"\{(\d*)(,?)(\d*)\}").match(self.s, self.i)
                if m is None or (not m.group(1) and not m.group(2)):
                    raise self.fail("unescaped '{' (write \\{ for the character)")
                lo = int(m.group(1) or 0)
                hi = lo if not m.group(2) else (int(m.group(3)) if m.group(3) else None)
                if hi is not None and hi < lo:
                    raise self.fail(f"repeat {{{lo},{hi}}} with max < min")
                if max(lo, hi or 0) > MAX_KEY_STATES:
                    raise self.fail(f"repeat count over {MAX_KEY_STATES}")
                self.i = m.end()
            else:
                return atom
            if atom[0] in ("bol", "eol"):
                raise self.fail("a repeated anchor")
            if self.peek() == "?":  # lazy: the same match or not as greedy
                self.i += 1
            elif self.peek() == "+":
                raise self.fail("a possessive quantifier")
            elif self.peek() in ("*", "{"):
                raise self.fail("multiple repeat")
            atom = ("rep", atom, lo, hi)

    def atom(self):
        c = self.take()
        if c == "(":
            if self.peek() == "?":
                if self.s.startswith("?:", self.i):
                    self.i += 2
                elif self.s.startswith("?P<", self.i):
                    end = self.s.find(">", self.i)
                    if end < 0 or not self.s[self.i + 3:end].isidentifier():
                        raise self.fail("a bad group name")
                    self.i = end + 1
                else:
                    raise self.fail("a '(?' construct (lookaround, flags, backreference) that is not run")
            node = self.alt()
            if self.peek() != ")":
                raise self.fail("missing ')'")
            self.i += 1
            return node
        if c in ("*", "+", "?"):
            raise self.fail("nothing to repeat")
        if c == "{" or c == "}":
            raise self.fail(f"unescaped {c!r} (write \\{c} for the character)")
        if c == ")":
            raise self.fail("unbalanced ')'")
        if c == ".":
            return ("char", _ANY)
        if c == "^":
            return ("bol",)
        if c == "$":
            return ("eol",)
        if c == "[":
            return ("char", self.klass())
        if c == "\\":
            return self.escape(in_class=False)
        return ("char", c)

    def escape(self, in_class: bool):
        if self.peek() is None:
            raise self.fail("a trailing backslash")
        c = self.take()
        classes: dict[str, Pred] = {
            "d": str.isdecimal, "D": lambda x: not x.isdecimal(),
            "w": lambda x: x.isalnum() or x == "_", "W": lambda x: not (x.isalnum() or x == "_"),
            "s": str.isspace, "S": lambda x: not x.isspace()}
        if c in classes:
            return ("char", classes[c])
        if not in_class and c == "A":
            return ("bol",)
        if not in_class and c == "Z":
            return ("eoz",)
        plain = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "a": "\a"}
        if c in plain:
            return ("char", plain[c])
        if c.isalnum():  # \b, \B, backreferences \1, \x.., \u....: not run
            raise self.fail(f"the escape \\{c}, which is not run")
        return ("char", c)  # an escaped punctuation character is itself

    def klass(self) -> Pred:
        negate = self.peek() == "^"
        if negate:
            self.i += 1
        chars: set[str] = set()
        ranges: list[tuple[str, str]] = []
        preds: list[Pred] = []
        first = True
        while True:
            c = self.peek()
            if c is None:
                raise self.fail("an unterminated character set")
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            self.i += 1
            if c == "\\":
                node = self.escape(in_class=True)
                if callable(node[1]):
                    preds.append(node[1])
                    continue
                c = node[1]
            elif c == "[" and self.peek() in (":", ".", "="):
                raise self.fail("a POSIX class, which is not run")
            if self.peek() == "-" and self.i + 1 < len(self.s) and self.s[self.i + 1] != "]":
                self.i += 1
                hi = self.take()
                if hi == "\\":
                    node = self.escape(in_class=True)
                    if callable(node[1]):
                        raise self.fail("a bad character range")
                    hi = node[1]
                if hi < c:
                    raise self.fail("a bad character range")
                ranges.append((c, hi))
            else:
                chars.add(c)

        def pred(x: str) -> bool:
            hit = x in chars or any(lo <= x <= hi for lo, hi in ranges) or any(p(x) for p in preds)
            return hit != negate
        return pred


def _fixed_length(node) -> Optional[int]:
    """The length every match of `node` has when it has no quantifier and no alternation (no choice point), else
    None."""
    kind = node[0]
    if kind == "char":
        return 1
    if kind in ("bol", "eol", "eoz"):
        return 0
    if kind == "cat":
        total = 0
        for n in node[1]:
            k = _fixed_length(n)
            if k is None:
                return None
            total += k
        return total
    return None


# -- the NFA ------------------------------------------------------------------------------------------------------
# States: ("char", pred, next), ("split", a, b), ("bol", next), ("eol", next), ("eoz", next), ("match",).


class _Builder:
    def __init__(self):
        self.states: list[list] = []

    def new(self, *state) -> int:
        if len(self.states) >= MAX_KEY_STATES + 8:  # the key's states and peft's `(.*\.)?` around it
            raise ValueError(f"more than {MAX_KEY_STATES} states (a long key or a large counted repeat)")
        self.states.append(list(state))
        return len(self.states) - 1

    def build(self, node) -> tuple[int, list[tuple[int, int]]]:
        """(start state, the dangling outs: (state, slot) to patch with the next state)."""
        kind = node[0]
        if kind == "char":
            s = self.new("char", node[1], None)
            return s, [(s, 2)]
        if kind in ("bol", "eol", "eoz"):
            s = self.new(kind, None)
            return s, [(s, 1)]
        if kind == "cat":
            if not node[1]:  # an empty branch: epsilon
                s = self.new("split", None, None)
                return s, [(s, 1), (s, 2)]
            start, outs = self.build(node[1][0])
            for n in node[1][1:]:
                s, o = self.build(n)
                self.patch(outs, s)
                outs = o
            return start, outs
        if kind == "alt":
            start, outs = self.build(node[1][0])
            for n in node[1][1:]:
                s, o = self.build(n)
                split = self.new("split", start, s)
                start, outs = split, outs + o
            return start, outs
        _, sub, lo, hi = node  # rep: lo copies, then (hi - lo) optional ones (or a loop when hi is None)
        start, outs = None, []
        for _ in range(lo):
            s, o = self.build(sub)
            if start is None:
                start = s
            else:
                self.patch(outs, s)
            outs = o
        if hi is None:
            s, o = self.build(sub)
            split = self.new("split", s, None)
            self.patch(o, split)
            if start is None:
                start = split
            else:
                self.patch(outs, split)
            return start, [(split, 2)]
        tail: list[tuple[int, int]] = []
        for _ in range(hi - lo):
            s, o = self.build(sub)
            split = self.new("split", s, None)
            if start is None:
                start = split
            else:
                self.patch(outs, split)
            tail.append((split, 2))
            outs = o
        if start is None:  # {0} / {0,0}: matches the empty string
            s = self.new("split", None, None)
            return s, [(s, 1), (s, 2)]
        return start, outs + tail

    def patch(self, outs: list[tuple[int, int]], target: int) -> None:
        for s, slot in outs:
            self.states[s][slot] = target


@dataclass(frozen=True)
class PatternKey:
    """One compiled key: `fixed` (a key of one length with no choice point: `re` on that one suffix) or an NFA."""

    key: str
    fixed: Optional[re.Pattern]
    length: int
    states: tuple

    def matches(self, module: str, budget: MatchBudget) -> bool:
        """peft's `re.match(rf"(.*\\.)?({key})$", module)`."""
        if self.fixed is not None:
            n = len(module) - self.length
            if n < 0 or (n > 0 and (module[n - 1] != "." or "\n" in module[:n])):
                return False
            budget.spend(self.length + 1)
            return self.fixed.fullmatch(module, n) is not None
        return _run(self.states, module, budget)


def compile_key(key: str) -> PatternKey:
    """`key` compiled; ValueError saying what in it is not run (the caller names the field)."""
    if len(key) > MAX_KEY_CHARS:
        raise ValueError(f"{len(key)} characters, over {MAX_KEY_CHARS}")
    ast = _Parser(key).parse()
    try:
        fixed = re.compile(key)  # compiling matches nothing; what Python refuses, peft could not run either
    except re.error as e:
        raise ValueError(str(e)) from None
    length = _fixed_length(ast)
    if length is not None:
        # No quantifier, no alternation: `re` has no choice point to backtrack into (at most one pass of the key).
        return PatternKey(key, fixed, length, ())
    # peft's whole pattern, textually: (.*\.)?(KEY)$, re.match (anchored at the start, a match may end anywhere
    # unless `$` ends it, as with a top-level `|` in the key).
    whole = _Parser(rf"(?:.*\.)?(?:{key})$").parse()
    b = _Builder()
    start, outs = b.build(whole)
    b.patch(outs, b.new("match"))
    return PatternKey(key, None, 0, (start, tuple(tuple(s) for s in b.states)))


def _run(nfa: tuple, text: str, budget: MatchBudget) -> bool:
    """Whether the NFA matches a prefix of `text` (re.match): one pass over `text` with the set of live states."""
    start, states = nfa
    n = len(text)

    def closure(seeds: list[int], pos: int) -> tuple[list[int], bool]:
        seen: set[int] = set()
        live: list[int] = []
        stack = list(seeds)
        matched = False
        while stack:
            s = stack.pop()
            if s is None or s in seen:
                continue
            seen.add(s)
            st = states[s]
            kind = st[0]
            if kind == "split":
                stack.append(st[2])
                stack.append(st[1])
            elif kind == "char":
                live.append(s)
            elif kind == "match":
                matched = True
            elif kind == "bol":
                if pos == 0:
                    stack.append(st[1])
            elif kind == "eol":  # Python's $: the end, or before a newline that ends the text
                if pos == n or (pos == n - 1 and text[pos] == "\n"):
                    stack.append(st[1])
            elif kind == "eoz":
                if pos == n:
                    stack.append(st[1])
        budget.spend(len(seen) + 1)
        return live, matched

    live, matched = closure([start], 0)
    pos = 0
    while not matched and live and pos < n:
        c = text[pos]
        nxt = []
        for s in live:
            pred = states[s][1]
            if (c != "\n" if pred is _ANY else (c == pred if isinstance(pred, str) else pred(c))):
                nxt.append(states[s][2])
        pos += 1
        live, matched = closure(nxt, pos)
    return matched


def compile_pattern(field: str, items: tuple) -> tuple[PatternKey, ...]:
    """A rank_pattern / alpha_pattern's keys, compiled in order; ValueError naming the field and the key."""
    from ..contract.safe_text import shown

    if len(items) > MAX_PATTERN_KEYS:
        raise ValueError(f"adapter_config.json {field} has {len(items)} keys: at most {MAX_PATTERN_KEYS}.")
    out = []
    for key, _ in items:
        if not isinstance(key, str) or not key:
            raise ValueError(f"adapter_config.json {field} key {shown(key)} is invalid: must be a module name or "
                             "pattern.")
        try:
            out.append(compile_key(key))
        except ValueError as e:
            raise ValueError(f"adapter_config.json {field} key {shown(key)} is not supported: {e} (keys are module "
                             "names or simple regular expressions: docs/lora.md#limits).") from None
    return tuple(out)
