r"""The grammar for a JSON schema: xgrammar 0.2.8's converter (`Grammar.from_json_schema`) with what it gets
wrong set right, so that an output that ends (finish_reason "stop") is strict JSON (`json.loads`) that
validates against the schema, and so that a value the schema leaves unbounded cannot run on forever.

Before conversion, the schema is rewritten (`_Rewriter`); everything it changes is listed there. After it,
the EBNF xgrammar printed is edited (`schema_ebnf`):
- xgrammar's class for a character of a string with minLength/maxLength, [^"\\\r\n], admits U+0000-U+001F
  (its plain string rule does not): raw control characters inside a string are not JSON. It becomes
  `_JSON_CHAR`, [^\0-\x1f"\\\ud800-\udfff], which also leaves out the surrogates (xgrammar writes their three
  bytes, which are not UTF-8); the plain string rule gets the same class.
- each string pattern, replaced by a placeholder before conversion, becomes the regex over the string's
  JSON text `json_string_regex` gives (xgrammar writes a pattern's `"`, `\` and control characters raw).
- numbers, integers and strings the schema leaves unbounded get `JsonBounds`: left alone, a model can write
  digits until max_tokens (`"age": -1111761227753329...`) and the request never ends with "stop".
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .json_string_regex import json_string_regex

# Placeholders stand for patterns in the schema xgrammar converts; each comes back as Regex("^...$", json_string=true).
_PLACEHOLDER = "moelink-pattern-{}"
_PLACEHOLDER_RULE = re.compile(r'Regex\("\^moelink-pattern-(\d+)\$", json_string=true\)')
# xgrammar 0.2.8's class for a character of a string with lengths (as it prints it: in its own rule, inline, or
# as the one choice of an optional), and the class that replaces it.
_LENGTH_CHAR = '[^\\"\\\\\\r\\n]'
_JSON_CHAR = '[^\\0-\\x1f\\"\\\\\\ud800-\\udfff]'
_BASIC_RULES = ("basic_integer", "basic_number", "basic_string_sub")

# Formats whose xgrammar rule writes only JSON-safe characters that its format's definition accepts (each checked:
# tests/engine/test_json_schema_grammar.py).
XGRAMMAR_FORMATS = frozenset({"duration", "ipv6", "hostname", "uuid", "uri", "uri-reference", "uri-template"})
# Formats whose xgrammar rule is not, as patterns: its email rule writes a quoted local part's quoted pairs as
# invalid JSON escapes (`\\a`), its JSON-pointer rules raw `"`, `\\` and control characters; its date accepts
# February 31st, its time and date-time any number of decimals, its ipv4 leading zeros (which RFC 3986 and
# Python's ipaddress refuse). Each pattern is a subset of its format: email is RFC 5322's dot-atom form (no
# quoted local part), dates skip February 29th and years before 1000, times leap seconds and decimals past 6.
_DATE = (r"[1-9][0-9]{3}-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)"
         r"|02-(0[1-9]|1[0-9]|2[0-8]))")
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
_EMAIL = (r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
          r"@[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$")
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
OWN_FORMATS = {
    "email": _EMAIL, "idn-email": _EMAIL,
    "json-pointer": r"^(/([^~/]|~[01])*)*$",
    "relative-json-pointer": r"^(0|[1-9][0-9]*)(#|(/([^~/]|~[01])*)*)$",
    "date": f"^{_DATE}$", "time": f"^{_TIME}$", "date-time": f"^{_DATE}T{_TIME}$",
    "ipv4": rf"^({_OCTET}\.){{3}}{_OCTET}$",
}
# Internationalized formats as their ASCII form, which each accepts.
FORMAT_ALIASES = {"idn-hostname": "hostname", "iri": "uri", "iri-reference": "uri-reference"}
STRING_KEYWORDS = ("minLength", "maxLength", "pattern", "format")
NUMBER_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
# What xgrammar 0.2.8 enforces of an integer's multipleOf (beyond it, it drops multipleOf with a warning).
MAX_MULTIPLE_OF = 1024
MAX_MULTIPLE_OF_RANGE = 10_000
# Keywords xgrammar 0.2.8 accepts and does not enforce (an answer could break them): refused.
UNENFORCED = ("uniqueItems", "contains", "minContains", "maxContains", "not", "if", "then", "else",
              "dependentRequired", "dependentSchemas", "dependencies")
# Keywords whose value is a schema, a list of schemas, or a map of names to schemas.
_ONE = ("additionalProperties", "unevaluatedProperties", "propertyNames", "additionalItems", "unevaluatedItems")
_LIST = ("prefixItems", "anyOf", "oneOf", "allOf")
_MAP = ("properties", "$defs", "definitions")


@dataclass(frozen=True)
class JsonBounds:
    """How far a JSON value the schema leaves unbounded may run (in any schema, json_object included).

    integer_digits: digits of an integer with no minimum and maximum (15: every such integer is exact in a
    double, as I-JSON asks); an integer range open on one side is closed 10^integer_digits - 1 past its
    bound (or past 0). fraction_digits / exponent_digits: of a number with no range (one with a range is
    xgrammar's: at most 6 decimals, no exponent). string_chars: JSON text characters (an escape counts each
    of its characters) of a string with no maxLength, pattern or format; with minLength alone, the most
    characters it may have (no fewer than minLength).
    An integer with multipleOf and no range keeps xgrammar's rule, which bounds no digits."""

    integer_digits: int = 15
    fraction_digits: int = 15
    exponent_digits: int = 2
    string_chars: int = 4096

    def __post_init__(self) -> None:
        for name in ("integer_digits", "fraction_digits", "exponent_digits", "string_chars"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"JsonBounds.{name}={value!r} is invalid: must be a positive integer.")


DEFAULT_BOUNDS = JsonBounds()


def schema_ebnf(schema, bounds: JsonBounds = DEFAULT_BOUNDS) -> str:
    """The EBNF (for xgrammar's compile_grammar) of compact JSON matching `schema` (a dict or bool). Raises
    ValueError with the reason when the schema asks for what cannot be enforced, or does not convert."""
    import xgrammar as xgr

    rewriter = _Rewriter(bounds)
    rewritten = rewriter.schema(schema, "")
    try:
        ebnf = str(xgr.Grammar.from_json_schema(json.dumps(rewritten), any_whitespace=False, strict_mode=True))
    except RuntimeError as e:
        raise ValueError(str(e)) from None
    missing = [r for r in _BASIC_RULES if not re.search(rf"^{r} ::= ", ebnf, re.M)]
    if missing:  # the rules below are xgrammar 0.2.8's: another version needs this module looked at again
        raise RuntimeError(f"xgrammar's JSON grammar has no {', '.join(missing)} rule: this xgrammar is not the "
                           "version engine/core/json_schema_grammar.py was written for")
    ebnf = ebnf.replace(_LENGTH_CHAR, _JSON_CHAR)
    ebnf = _PLACEHOLDER_RULE.sub(lambda m: "Regex(" + _ebnf_string(rewriter.patterns[int(m.group(1))]) + ")", ebnf)
    if "json_string=true" in ebnf:
        raise RuntimeError("xgrammar wrote a pattern rule moelink did not place; its JSON text would be unchecked")
    return _bound_basic_rules(ebnf, bounds)


def _bound_basic_rules(ebnf: str, b: JsonBounds) -> str:
    digits = f"[0-9]{{0,{b.integer_digits - 1}}}"
    rules = {
        "basic_integer": f'basic_integer ::= (("0") | ("-"? [1-9] {digits}))',
        "basic_number": (f'basic_number ::= (("-"? ("0" | ([1-9] {digits})) ("." [0-9]{{1,{b.fraction_digits}}})? '
                         f'([eE] [+\\-]? [0-9]{{1,{b.exponent_digits}}})?))'),
        # A character budget on a rule that may end after any character (the quote is outside it) is a hard
        # bound; right recursion keeps the mask as fast as xgrammar's own rule (a repetition count does not).
        "basic_string_sub": (f'basic_string_sub ::= ((basic_string_body "\\""))\n'
                             f'basic_string_body[max_chars={b.string_chars}] ::= ((basic_string_chars))\n'
                             f'basic_string_chars ::= ("" | ({_JSON_CHAR} basic_string_chars) | '
                             '("\\\\" basic_escape basic_string_chars))'),
    }
    for name, text in rules.items():
        ebnf = re.sub(rf"^{name} ::= .*$", lambda _: text, ebnf, count=1, flags=re.M)
    return ebnf


def _ebnf_string(text: str) -> str:
    """`text` as an EBNF string literal (json_string_regex writes ASCII only)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Rewriter:
    """A copy of the schema xgrammar can convert faithfully; `patterns[i]` is placeholder i's regex.

    - pattern → a placeholder (its regex: json_string_regex); beside a pattern, format is dropped (format is
      an annotation unless a validator asks otherwise, JSON Schema 2020-12).
    - format: an internationalized one → its ASCII form (FORMAT_ALIASES); one xgrammar gets wrong → its
      pattern (OWN_FORMATS); one neither knows → dropped (xgrammar leaves the string free anyway, and would
      drop the lengths beside it).
    - pattern or format with minLength/maxLength → refused: xgrammar drops the lengths.
    - minLength alone → maxLength = max(minLength, string_chars).
    - string or number keywords on a schema with no type (which xgrammar ignores) → that type; both → refused.
    - an integer or number range open on one side → closed (JsonBounds).
    - multipleOf xgrammar drops (on a number; on an integer above 1024, or with a range of more than 10000
      integers, or open on one side) → refused, and so is every keyword in UNENFORCED.
    """

    def __init__(self, bounds: JsonBounds):
        self.bounds = bounds
        self.patterns: list[str] = []

    def fail(self, path: str, why: str) -> ValueError:
        return ValueError(f"{why} (at {path or '/'})")

    def schema(self, s, path: str):
        if not isinstance(s, dict):
            return s
        dropped = [k for k in UNENFORCED if k in s and not (k == "uniqueItems" and s[k] is False)]
        if dropped:
            raise self.fail(path, f"{dropped[0]} is not enforced (xgrammar drops it): leave it out and check "
                                  "the answer yourself")
        s = dict(s)
        for key in _ONE:
            if key in s:
                s[key] = self.schema(s[key], f"{path}/{key}")
        for key in _LIST + ("items",):
            if isinstance(s.get(key), list):
                s[key] = [self.schema(sub, f"{path}/{key}/{i}") for i, sub in enumerate(s[key])]
            elif key == "items" and key in s:
                s[key] = self.schema(s[key], f"{path}/{key}")
        for key in _MAP:
            if isinstance(s.get(key), dict):
                s[key] = {name: self.schema(sub, f"{path}/{key}/{_pointer(name)}") for name, sub in s[key].items()}
        if isinstance(s.get("patternProperties"), dict):
            s["patternProperties"] = {
                self.placeholder(name, f"{path}/patternProperties"): self.schema(sub, f"{path}/patternProperties/"
                                                                                    f"{_pointer(name)}")
                for name, sub in s["patternProperties"].items()}
        types = self.types(s, path)
        if "string" in types:
            self.string(s, path)
        if types & {"integer", "number"}:
            self.number(s, path, integer_only="number" not in types)
        return s

    def types(self, s: dict, path: str) -> set:
        given = s.get("type")
        if given is not None:
            return {given} if isinstance(given, str) else set(given) if isinstance(given, list) else set()
        if any(k in s for k in ("$ref", "enum", "const", "anyOf", "oneOf", "allOf")):
            return set()
        strings, numbers = [k for k in STRING_KEYWORDS if k in s], [k for k in NUMBER_KEYWORDS if k in s]
        if strings and numbers:
            raise self.fail(path, f"{strings[0]} and {numbers[0]} on a schema with no type: set type")
        inferred = "string" if strings else "number" if numbers else None
        if inferred is None:
            return set()
        s["type"] = inferred
        return {inferred}

    def string(self, s: dict, path: str) -> None:
        fmt = s.pop("format", None)
        fmt = FORMAT_ALIASES.get(fmt, fmt) if isinstance(fmt, str) else None
        if "pattern" in s or (fmt not in XGRAMMAR_FORMATS and fmt not in OWN_FORMATS):
            fmt = None  # an annotation: beside a pattern, or a format no grammar here knows
        lengths = [k for k in ("minLength", "maxLength") if k in s]
        if lengths and ("pattern" in s or fmt is not None):
            other = "pattern" if "pattern" in s else f"format {fmt!r}"
            raise self.fail(path, f"{other} together with {'/'.join(lengths)} is not enforced (xgrammar drops the "
                                  f"lengths): express the length in a pattern, or drop one")
        if fmt in OWN_FORMATS:
            s["pattern"] = OWN_FORMATS[fmt]
        elif fmt is not None:
            s["format"] = fmt
        if "pattern" in s:
            s["pattern"] = self.placeholder(s["pattern"], f"{path}/pattern")
        elif "minLength" in s and "maxLength" not in s and isinstance(s["minLength"], int):
            s["maxLength"] = max(s["minLength"], self.bounds.string_chars)

    def number(self, s: dict, path: str, integer_only: bool) -> None:
        lower = next((s[k] for k in ("minimum", "exclusiveMinimum") if _is_number(s.get(k))), None)
        upper = next((s[k] for k in ("maximum", "exclusiveMaximum") if _is_number(s.get(k))), None)
        if "multipleOf" in s:
            step = s["multipleOf"]
            if not integer_only:
                raise self.fail(path, "multipleOf on a number is not enforced (xgrammar drops it); use an integer "
                                      "type or drop multipleOf")
            if not (type(step) is int and 0 < step <= MAX_MULTIPLE_OF) or (
                    (lower is not None or upper is not None)
                    and (lower is None or upper is None or upper - lower > MAX_MULTIPLE_OF_RANGE)):
                raise self.fail(path, f"multipleOf={step!r} is enforced only up to {MAX_MULTIPLE_OF}, with no range "
                                      f"or a minimum and maximum at most {MAX_MULTIPLE_OF_RANGE} apart")
            return  # the range is enumerated, or the digits run free (xgrammar's modulo automaton)
        reach = 10 ** self.bounds.integer_digits - 1
        if lower is not None and upper is None:
            s["maximum"] = max(lower, 0) + reach
        elif upper is not None and lower is None:
            s["minimum"] = min(upper, 0) - reach

    def placeholder(self, pattern, path: str) -> str:
        if not isinstance(pattern, str):
            raise self.fail(path, f"pattern {pattern!r} is not a string")
        try:
            self.patterns.append(json_string_regex(pattern))
        except ValueError as e:
            raise self.fail(path, str(e)) from None
        return "^" + _PLACEHOLDER.format(len(self.patterns) - 1) + "$"


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _pointer(name: str) -> str:
    return str(name).replace("~", "~0").replace("/", "~1")
