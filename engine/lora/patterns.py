"""peft's `rank_pattern` / `alpha_pattern` keys matched by RE2, Google's linear-time regex engine (google-re2).

peft gives a module the value of the first key (in the config's order) for which
`re.match(rf"(.*\\.)?({key})$", module)` matches (peft/utils/other.py `get_pattern_key`): a key is a Python regular
expression, matched against a dot-delimited suffix of the module's name. Python's `re` backtracks: a key such as
`(.|.){0,22}#` took 24 s to fail against one module name, in C, holding the GIL (every user waited), and each +1
doubles it. RE2 (what vLLM-class servers run untrusted regexes on) never backtracks: a match costs time linear in
the name's length times the compiled program's size, and RE2's `max_mem` option bounds that size.

How a key is run, so that it matches exactly the modules peft's `re.match` matches:
- A plain key (letters, digits, `_` and `.`: a module name, the usual key, one per module in peft's EVA configs) is
  compared character by character with the name's suffix of its length (`.` matching any character, as in the
  regex), without any regex engine: it needs no RE2.
- Any other key: Python's own parser (`re._parser`, what peft's `re.match` reads) parses peft's whole pattern
  `(.*\\.)?(KEY)$`, and the parse is written out in RE2's syntax, one unambiguous spelling per node (characters as
  `\\x{..}`, classes as their explicit ASCII members, groups non-capturing, `\\Z` as `\\z`, lazy quantifiers greedy:
  the same match or not). So RE2 never reads a key's own spelling, where the two dialects differ (`\\12` an octal
  escape in RE2, a backreference in Python; `[[:alpha:]]` a POSIX class in RE2, a set and a `]` in Python; `x{,3}`
  a literal in RE2, `x{0,3}` in Python; `\\s` without `\\v` in RE2). Module names are ASCII without newlines (the
  engine's own names, checked at every match), so a class is exactly its ASCII members, `$` is `\\z` and `.` is `.`.

Refused with an error naming the field and the key: what Python's `re` cannot compile (peft could not run it
either); backreferences, lookarounds, conditionals `(?(1)..)`, atomic groups and possessive quantifiers (RE2 runs
none of them, and the last two change which names match); a counted repeat over 1000, or nested ones multiplying
past RE2's limit; a non-ASCII character under `(?i)` (Python's and RE2's Unicode case folding may differ); keys over
MAX_KEY_CHARS characters, over MAX_PATTERN_KEYS keys, a compiled key over MAX_KEY_MEM bytes, or one field's keys over
MAX_FIELD_PROGRAM instructions (compiling costs time too). Where the google-re2 package is missing (the GPU image), an
adapter with a key that is not plain is refused, saying to install it; plain keys keep working.

Every match spends from a `MatchBudget` shared by one adapter's keys and targets (the keys times the targets, each
linear): an adapter whose matching would cost more than MAX_MATCH_STEPS is refused, naming the field.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, Optional

MAX_PATTERN_KEYS = 4096  # keys of one rank_pattern / alpha_pattern (peft's EVA writes one per module)
MAX_KEY_CHARS = 512
MAX_KEY_MEM = 1 << 20  # RE2's max_mem for one key: its program (~40k instructions at most) and DFA cache
MAX_FIELD_PROGRAM = 500_000  # RE2 instructions of one field's keys together (compiling: ~0.5 us each)
MAX_REPEAT = 1000  # RE2's largest counted repeat
# The matching work of one adapter, in steps: a call costs MATCH_CALL_STEPS (the Python around it: ~1-3 us) plus, for
# RE2, the name's length times the program's size (RE2's worst case, its NFA: every instruction once per character).
# 10^9 steps is about a second of CPU on the 2-core machines (2026-12; tests/engine/test_lora_checks.py).
MAX_MATCH_STEPS = 1_000_000_000
MATCH_CALL_STEPS = 2_000

_PLAIN = re.compile(r"[A-Za-z0-9_.]+")
_INSTALL = "install google-re2 (`pip install google-re2`, a dependency of moelink: docs/dependencies.md)"


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


def _re2() -> Any:
    """The `re2` module (google-re2), or None where it is not installed."""
    try:
        return importlib.import_module("re2")
    except ImportError:
        return None


def _sre() -> tuple[Any, Any]:
    """Python's regex parser and its constants (`re._parser` since 3.11, `sre_parse` before)."""
    try:
        return importlib.import_module("re._parser"), importlib.import_module("re._constants")
    except ImportError:  # Python 3.10
        return importlib.import_module("sre_parse"), importlib.import_module("sre_constants")


def _ascii_set(pattern: str, flags: int = 0) -> frozenset[int]:
    return frozenset(c for c in range(128) if re.fullmatch(pattern, chr(c), flags))


# Python's categories on ASCII characters, read from Python itself: \s holds \v and \x1c-\x1f (Unicode), RE2's not.
_CATEGORIES = {(name, ascii_): _ascii_set(rx, re.ASCII if ascii_ else 0)
               for name, rx in (("DIGIT", r"\d"), ("NOT_DIGIT", r"\D"), ("SPACE", r"\s"), ("NOT_SPACE", r"\S"),
                                ("WORD", r"\w"), ("NOT_WORD", r"\W"))
               for ascii_ in (False, True)}
_EVERYTHING = frozenset(range(128))


class _Refused(ValueError):
    pass


class _NoRE2(ValueError):
    """A key that needs RE2 where the google-re2 package is not installed."""


class _ToRE2:
    """Python's parse of a pattern written out in RE2's syntax (see the module's docstring)."""

    def __init__(self, constants: Any):
        self.c = constants

    def pattern(self, items, flags: int) -> str:
        return "".join(self.node(op, av, flags) for op, av in items)

    def node(self, op, av, flags: int) -> str:
        c, name = self.c, op.name
        fold = bool(flags & c.SRE_FLAG_IGNORECASE)
        if name == "LITERAL":
            return self.klass(self.literal(av, fold))
        if name == "NOT_LITERAL":
            return self.klass(_EVERYTHING - self.literal(av, fold))
        if name == "IN":
            return self.klass(self.members(av, flags))
        if name == "ANY":
            return "(?s:.)" if flags & c.SRE_FLAG_DOTALL else "."
        if name == "AT":
            multi = bool(flags & c.SRE_FLAG_MULTILINE)
            at = {"AT_BEGINNING": "(?m:^)" if multi else r"\A", "AT_BEGINNING_STRING": r"\A",
                  # Python's `$`: the end, or before a newline ending the text; names have no newline.
                  "AT_END": "(?m:$)" if multi else r"\z", "AT_END_STRING": r"\z",
                  "AT_BOUNDARY": r"\b", "AT_NON_BOUNDARY": r"\B"}.get(av.name)  # ASCII names: both engines agree
            if at is None:
                raise _Refused(f"the anchor {av.name}, which is not run")
            return at
        if name == "BRANCH":
            return "(?:" + "|".join(self.pattern(alt, flags) for alt in av[1]) + ")"
        if name == "SUBPATTERN":
            _, add, remove, sub = av
            return "(?:" + self.pattern(sub, (flags | add) & ~remove) + ")"
        if name in ("MAX_REPEAT", "MIN_REPEAT"):  # greedy or lazy: the same match or not
            lo, hi, sub = av
            open_ = hi == c.MAXREPEAT
            if lo > MAX_REPEAT or (not open_ and hi > MAX_REPEAT):
                raise _Refused(f"a counted repeat over {MAX_REPEAT} (RE2's limit)")
            body = "(?:" + self.pattern(sub, flags) + ")"
            return body + ("{%d,}" % lo if open_ else "{%d,%d}" % (lo, hi))
        refused = {"GROUPREF": "a backreference", "GROUPREF_EXISTS": "a conditional group (?(...)...)",
                   "ASSERT": "a lookaround", "ASSERT_NOT": "a lookaround", "ATOMIC_GROUP": "an atomic group",
                   "POSSESSIVE_REPEAT": "a possessive quantifier"}.get(name, f"the construct {name}")
        raise _Refused(f"{refused}, which RE2 does not run")

    @staticmethod
    def check_fold(code: int) -> None:
        if code > 127:
            raise _Refused(f"the non-ASCII character {chr(code)!r} under (?i) (Python's and RE2's case folding "
                           "may differ)")

    def literal(self, code: int, fold: bool) -> frozenset[int]:
        if fold:
            self.check_fold(code)
            return frozenset({code, ord(chr(code).swapcase())})
        return frozenset({code} if code < 128 else ())

    def members(self, items, flags: int) -> frozenset[int]:
        """The ASCII characters a Python class `[...]` matches (the names are ASCII)."""
        c = self.c
        fold = bool(flags & c.SRE_FLAG_IGNORECASE)
        negate = False
        got: set[int] = set()
        for op, av in items:
            name = op.name
            if name == "NEGATE":
                negate = True
            elif name == "LITERAL":
                got |= self.literal(av, fold)
            elif name == "RANGE":
                lo, hi = av
                if fold:
                    self.check_fold(lo)
                    self.check_fold(hi)
                    got |= {x for x in range(128) if lo <= x <= hi or lo <= ord(chr(x).swapcase()) <= hi}
                else:
                    got |= set(range(lo, min(hi, 127) + 1))
            elif name == "CATEGORY":
                key = (av.name.replace("CATEGORY_", ""), bool(flags & c.SRE_FLAG_ASCII))
                if key not in _CATEGORIES:
                    raise _Refused(f"the class {av.name}, which is not run")
                got |= _CATEGORIES[key]
            else:
                raise _Refused(f"the class item {name}, which is not run")
        return _EVERYTHING - got if negate else frozenset(got)

    @staticmethod
    def klass(codes: frozenset[int]) -> str:
        if not codes:
            return r"[^\x00-\x{10FFFF}]"  # matches nothing
        runs: list[list[int]] = []
        for x in sorted(codes):
            if runs and runs[-1][1] == x - 1:
                runs[-1][1] = x
            else:
                runs.append([x, x])
        if len(runs) == 1 and runs[0][0] == runs[0][1]:
            x = runs[0][0]
            return chr(x) if chr(x).isalnum() else "\\x{%x}" % x
        return "[" + "".join("\\x{%x}" % lo if lo == hi else "\\x{%x}-\\x{%x}" % (lo, hi) for lo, hi in runs) + "]"


@dataclass(frozen=True)
class PatternKey:
    """One compiled key: `plain` (a module name, compared without regex) or `program` (RE2's compiled pattern)."""

    key: str
    plain: bool
    program: Any = None  # re2's compiled pattern (peft's whole `(.*\.)?(KEY)$`, in RE2's syntax)
    size: int = 0  # its RE2 program's instructions

    def matches(self, module: str, budget: MatchBudget) -> bool:
        """peft's `re.match(rf"(.*\\.)?({key})$", module)`."""
        if not module.isascii() or "\n" in module:  # the engine's names never are: the translation assumes it
            raise ValueError(f"module name {module!r} is not ASCII without newlines: pattern keys are not matched "
                             "against it")
        if self.plain:
            n = len(module) - len(self.key)
            if n < 0 or (n > 0 and module[n - 1] != "."):
                return False
            budget.spend(MATCH_CALL_STEPS + len(self.key))
            return all(k == "." or k == m for k, m in zip(self.key, module[n:]))
        budget.spend(MATCH_CALL_STEPS + (len(module) + 1) * self.size)
        return self.program.match(module) is not None


def translate(key: str) -> str:
    """peft's pattern for `key`, `(.*\\.)?(KEY)$`, as Python reads it, in RE2's syntax; ValueError saying what in
    the key is refused."""
    whole = rf"(.*\.)?({key})$"  # what peft runs: the key pasted in (`a)|(b` is a valid key, `(?i)q` is not)
    parser, constants = _sre()
    try:
        try:
            re.compile(whole)  # compiling matches nothing
        except re.error as e:
            re.compile(key)  # the key's own error first (positions in the key)
            raise _Refused(f"{e} (in peft's pattern {whole!r})") from None
        parsed = parser.parse(whole)
        return _ToRE2(constants).pattern(parsed, parsed.state.flags)
    except re.error as e:
        raise _Refused(str(e)) from None
    except RecursionError:
        raise _Refused("nested too deeply") from None


def compile_key(key: str) -> PatternKey:
    """`key` compiled; ValueError saying what in it is not run (the caller names the field)."""
    if len(key) > MAX_KEY_CHARS:
        raise _Refused(f"{len(key)} characters, over {MAX_KEY_CHARS}")
    if _PLAIN.fullmatch(key):
        return PatternKey(key, plain=True)
    pattern = translate(key)
    re2 = _re2()
    if re2 is None:
        raise _NoRE2(f"it is a regular expression, which moelink matches with RE2: {_INSTALL}")
    options = re2.Options()
    options.max_mem = MAX_KEY_MEM
    options.log_errors = False
    try:
        program = re2.compile(pattern, options)
    except re2.error as e:
        why = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise _Refused(f"RE2 cannot compile it ({why}; counted repeats go to {MAX_REPEAT}, nested ones' product "
                       f"too, and a key's program is at most {MAX_KEY_MEM >> 10} KiB)") from None
    return PatternKey(key, plain=False, program=program, size=program.programsize)


def compile_pattern(field: str, items: tuple) -> tuple[PatternKey, ...]:
    """A rank_pattern / alpha_pattern's keys, compiled in order; ValueError naming the field and the key."""
    from ..contract.safe_text import shown

    if len(items) > MAX_PATTERN_KEYS:
        raise ValueError(f"adapter_config.json {field} has {len(items)} keys: at most {MAX_PATTERN_KEYS}.")
    out = []
    program = 0
    for key, _ in items:
        if not isinstance(key, str) or not key:
            raise ValueError(f"adapter_config.json {field} key {shown(key)} is invalid: must be a module name or "
                             "pattern.")
        try:
            compiled = compile_key(key)
        except _NoRE2 as e:
            raise ValueError(f"adapter_config.json {field} key {shown(key)} needs the google-re2 package, which is "
                             f"not installed: {e}.") from None
        except ValueError as e:
            raise ValueError(f"adapter_config.json {field} key {shown(key)} is not supported: {e} (keys are module "
                             "names or regular expressions RE2 runs: docs/lora.md#limits).") from None
        program += compiled.size
        if program > MAX_FIELD_PROGRAM:
            raise ValueError(f"adapter_config.json {field}: its keys compile to over {MAX_FIELD_PROGRAM} RE2 "
                             "instructions: give module names or simple patterns (`.*\\.q_proj`).")
        out.append(compiled)
    return tuple(out)
