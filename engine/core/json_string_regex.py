"""A JSON-schema string pattern, rewritten as a regex over the string's JSON text (what the model writes between
the quotes), for xgrammar to enforce.

Why: xgrammar 0.2.8 applies a schema `pattern` to the JSON text itself and passes the characters the pattern
names literally straight through, unescaped: `"pattern": "^a\\"b$"` lets the model write `"a"b"`, a newline
in a pattern lets it write a raw newline, and a backslash a lone backslash, none of them valid JSON. Here a
character that JSON must escape (`"`, `\\`, U+0000-U+001F) becomes its escape (`\\"`, `\\\\`, `\\n`,
`\\u0001`, ...) and every other character stays itself, so whatever text the regex allows decodes
(`json.loads`) to a string the pattern matches.

The pattern is read by Python's own regex parser (the `re` module's, the dialect the `jsonschema` package
validates with); a pattern it cannot read, or one using what a grammar cannot enforce (look-arounds,
back-references, word boundaries, anchors inside the pattern, inline flags), is a ValueError saying so. Where
Python's and JavaScript's (ECMA 262, JSON Schema's dialect) readings differ, the output keeps to what both
accept: `.` excludes every line terminator, `\\d`, `\\w`, `\\s` are their ASCII sets, and a negated class that
names one of them is taken within ASCII. Like xgrammar and vLLM, the pattern must match the whole string
(an unanchored pattern, which JSON Schema reads as "contains", is held to the stricter reading).

The regex is written in xgrammar's dialect with every non-alphanumeric character as `\\u{X}`, so no character
of the pattern is ever re-read as syntax.
"""
from __future__ import annotations

import re
import sys

# The stdlib parser and its opcodes (what `re.compile` itself consumes): private modules of the re package since
# Python 3.11, top-level sre_* modules before (pyproject allows 3.10).
if sys.version_info >= (3, 11):
    from re import _constants as C  # type: ignore[attr-defined]  # typeshed knows the sre_* names only
    from re import _parser as sre_parse  # type: ignore[attr-defined]
else:
    import sre_constants as C
    import sre_parse

MAX_CODEPOINT = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)  # not characters: UTF-8 cannot carry them, and a \\u escape of one is half a pair
SHORT_ESCAPES = {0x22: '"', 0x5C: "\\", 0x08: "b", 0x0C: "f", 0x0A: "n", 0x0D: "r", 0x09: "t"}
MUST_ESCAPE = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C)]  # RFC 8259 section 7
ASCII = [(0x00, 0x7F)]
LINE_TERMINATORS = [(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)]  # what JavaScript's `.` excludes
CATEGORIES = {  # the ASCII sets JavaScript and Python agree on (Python's Unicode \\s adds U+001C-U+001F)
    C.CATEGORY_DIGIT: [(0x30, 0x39)],
    C.CATEGORY_WORD: [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
    C.CATEGORY_SPACE: [(0x09, 0x0D), (0x20, 0x20)],
}
NEGATED = {C.CATEGORY_NOT_DIGIT: C.CATEGORY_DIGIT, C.CATEGORY_NOT_WORD: C.CATEGORY_WORD,
           C.CATEGORY_NOT_SPACE: C.CATEGORY_SPACE}
# \\S: not a space in either language, so Python's extra separators are left out too.
NEGATED_SPACE_EXTRA = [(0x1C, 0x1F)]
UNSUPPORTED = {C.ASSERT: "a look-ahead or look-behind", C.ASSERT_NOT: "a negative look-ahead or look-behind",
               C.GROUPREF: "a back-reference", C.GROUPREF_EXISTS: "a conditional group",
               C.ATOMIC_GROUP: "an atomic group", C.POSSESSIVE_REPEAT: "a possessive quantifier"}
STARTS = (C.AT_BEGINNING, C.AT_BEGINNING_STRING)
ENDS = (C.AT_END, C.AT_END_STRING)

Ranges = list[tuple[int, int]]  # sorted, disjoint, inclusive code point ranges


def json_string_regex(pattern: str) -> str:
    """The regex (xgrammar's dialect) over a JSON string's text whose every match decodes to a string that
    `pattern` matches in full. Raises ValueError naming what cannot be enforced."""
    try:
        parsed = sre_parse.parse(pattern)
    except (re.error, OverflowError, RecursionError) as e:
        raise ValueError(f"pattern {pattern!r} is not a regular expression ({e})") from None
    if parsed.state.flags & ~(C.SRE_FLAG_UNICODE | C.SRE_FLAG_ASCII):
        raise ValueError(f"pattern {pattern!r} sets inline flags such as (?i), which JSON Schema's dialect lacks")
    return _Translator(pattern).seq(list(parsed), at_start=True, at_end=True)


def chars_regex(chars: Ranges) -> str:
    """One character of `chars`, as JSON text: the class of those written as themselves, or the escape of
    those JSON must escape. Surrogates are left out (they are not characters)."""
    chars = _minus(chars, [SURROGATES])
    plain = _minus(chars, MUST_ESCAPE)
    escaped = [c for lo, hi in _intersect(chars, MUST_ESCAPE) for c in range(lo, hi + 1)]
    alternatives = ([_class(plain)] if plain else []) + ([_escape(escaped)] if escaped else [])
    if not alternatives:
        raise ValueError("it names no character that can appear in a string")
    return alternatives[0] if len(alternatives) == 1 else f"({'|'.join(alternatives)})"


class _Translator:
    def __init__(self, pattern: str):
        self.pattern = pattern

    def fail(self, what: str) -> ValueError:
        return ValueError(f"pattern {self.pattern!r} uses {what}, which a grammar cannot enforce")

    def seq(self, items: list, at_start: bool, at_end: bool) -> str:
        out = []
        for i, (op, av) in enumerate(items):
            # An anchor is kept (as nothing: the grammar matches the whole string) where it stands at the start
            # or the end of the whole match, with only other anchors between it and that edge.
            first = at_start and all(o is C.AT for o, _ in items[:i])
            last = at_end and all(o is C.AT for o, _ in items[i + 1:])
            out.append(self.item(op, av, first, last))
        return "".join(out)

    def item(self, op, av, at_start: bool, at_end: bool) -> str:
        if op is C.LITERAL:
            return chars_regex([(av, av)])
        if op is C.NOT_LITERAL:
            return chars_regex(_complement([(av, av)]))
        if op is C.ANY:
            return chars_regex(_complement(LINE_TERMINATORS))
        if op is C.IN:
            return chars_regex(self.char_set(av))
        if op is C.CATEGORY:
            return chars_regex(self.char_set([(op, av)]))
        if op is C.BRANCH:
            return "(" + "|".join(self.seq(list(alt), at_start, at_end) for alt in av[1]) + ")"
        if op is C.SUBPATTERN:
            _, add_flags, del_flags, sub = av
            if add_flags or del_flags:
                raise self.fail("inline flags")
            return "(" + self.seq(list(sub), at_start, at_end) + ")"
        if op in (C.MAX_REPEAT, C.MIN_REPEAT):  # lazy or greedy: the same set of whole matches
            lo, hi, sub = av
            body = self.seq(list(sub), False, False)
            return f"({body}){{{lo},}}" if hi is C.MAXREPEAT else f"({body}){{{lo},{hi}}}"
        if op is C.AT:
            if (av in STARTS and at_start) or (av in ENDS and at_end):
                return ""
            raise self.fail("an anchor (^, $) inside the pattern" if av in STARTS + ENDS else "a word boundary")
        raise self.fail(UNSUPPORTED.get(op, str(op)))

    def char_set(self, items) -> Ranges:
        negate = bool(items) and items[0][0] is C.NEGATE
        ranges: Ranges = []
        ascii_only = False
        for op, av in items[1:] if negate else items:
            if op is C.LITERAL:
                ranges = _union(ranges, [(av, av)])
            elif op is C.RANGE:
                ranges = _union(ranges, [av])
            elif op is C.CATEGORY and av in CATEGORIES:
                ranges = _union(ranges, CATEGORIES[av])
                ascii_only = True
            elif op is C.CATEGORY and av in NEGATED:
                extra = NEGATED_SPACE_EXTRA if av is C.CATEGORY_NOT_SPACE else []
                ranges = _union(ranges, _minus(ASCII, _union(CATEGORIES[NEGATED[av]], extra)))
                ascii_only = True
            else:
                raise self.fail(f"{op} {av} in a character class")
        if not negate:
            return ranges
        # Python's Unicode categories are wider than JavaScript's ASCII ones: a negated class naming one is
        # taken within ASCII, where the two agree.
        return _minus(ASCII if ascii_only else _complement([]), ranges)


def _escape(codes: list[int]) -> str:
    """A backslash, then the rest of the escape of one of `codes` (each must be escaped in JSON)."""
    letters = [SHORT_ESCAPES[c] for c in codes if c in SHORT_ESCAPES]
    unicode = [c for c in codes if c not in SHORT_ESCAPES]
    tails = [_class(_union([], [(ord(ch), ord(ch)) for ch in letters]))] if letters else []
    for high in (0, 1):  # \\u00XX for the control characters with no short escape (json.dumps's spelling)
        lows = [c & 0xF for c in unicode if c >> 4 == high]
        if lows:
            tails.append(f"u00{high}" + _class(_union([], [(ord(h), ord(h)) for h in (f"{d:x}" for d in lows)])))
    return _char(0x5C) + (tails[0] if len(tails) == 1 else f"({'|'.join(tails)})")


def _class(ranges: Ranges) -> str:
    if len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
        return _char(ranges[0][0])
    if ranges[0][0] == 0x5E:
        # xgrammar reads a class whose first character is ^ as negated even when that ^ is escaped.
        if len(ranges) > 1:
            ranges = ranges[1:] + ranges[:1]
        else:
            lo, hi = ranges[0]
            return f"({_char(lo)}|{_class([(lo + 1, hi)])})"
    return "[" + "".join(f"{_char(lo)}-{_char(hi)}" for lo, hi in ranges) + "]"


def _char(code: int) -> str:
    ch = chr(code)
    return ch if ch.isascii() and ch.isalnum() else f"\\u{{{code:x}}}"


# -- code point range sets ------------------------------------------------------------------------------
def _union(a: Ranges, b: Ranges) -> Ranges:
    out: Ranges = []
    for lo, hi in sorted(a + b):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _complement(a: Ranges) -> Ranges:
    out, start = [], 0
    for lo, hi in _union(a, []):
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= MAX_CODEPOINT:
        out.append((start, MAX_CODEPOINT))
    return out


def _intersect(a: Ranges, b: Ranges) -> Ranges:
    return _complement(_union(_complement(a), _complement(b)))


def _minus(a: Ranges, b: Ranges) -> Ranges:
    return _intersect(a, _complement(b))
