"""What a request's output must match (vLLM's `StructuredOutputsParams`): exactly one of a JSON schema,
any JSON object, a regex, an EBNF grammar or a choice of strings.

Only the shape is checked here (no grammar engine is imported); whether a schema, regex or grammar
compiles is decided by `engine/core/structured_output.py`, whose errors name the same fields.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional, Union

from .json_depth import MAX_JSON_DEPTH, text_depth, too_deep, value_depth
from .safe_text import shown

KINDS = ("json", "json_object", "regex", "grammar", "choice", "structural_tag")
# Messages name fields as a SamplingParams path, so servers map them to their wire names like any other.
PREFIX = "SamplingParams.structured_outputs."


@dataclass(frozen=True)
class StructuredOutputParams:
    """Set exactly one field. `json`: a JSON schema (dict or its JSON text); `json_object`: True for any
    JSON object; `regex`: a regular expression the whole output matches; `grammar`: an EBNF (GBNF)
    grammar whose `root` rule the output matches; `choice`: the output is one of these strings."""

    json: Optional[Union[str, dict]] = None
    json_object: bool = False
    regex: Optional[str] = None
    grammar: Optional[str] = None
    choice: Optional[tuple[str, ...]] = None
    # xgrammar's structural tag (JSON text): free text until a trigger, then the tagged structure (a tool call's
    # JSON arguments between its begin and end markers). What the managed gateway sends for a named tool_choice
    # on parsers whose calls are tagged (Kimi K2's, DeepSeek's).
    structural_tag: Optional[str] = None

    def __post_init__(self) -> None:
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        _check(isinstance(self.json_object, bool), "json_object", self.json_object, "must be True or False")
        chosen = [k for k in KINDS if (getattr(self, k) is not None if k != "json_object" else self.json_object)]
        if len(chosen) != 1:
            raise ValueError(f"SamplingParams.structured_outputs sets {chosen or 'nothing'}: set exactly one of {', '.join(KINDS)}.")
        if self.json is not None:
            _check(isinstance(self.json, (str, dict)), "json", self.json, "must be a JSON schema (a dict or its JSON text)")
            # Measured before json.loads / json.dumps, which recurse per level (json_depth.py).
            depth = text_depth(self.json) if isinstance(self.json, str) else \
                value_depth(self.json, 100 * MAX_JSON_DEPTH)
            if depth > MAX_JSON_DEPTH:
                raise ValueError(too_deep(f"{PREFIX}json={shown(self.json)}", depth))
            if isinstance(self.json, str):
                try:
                    schema = json.loads(self.json)
                except ValueError as e:
                    raise ValueError(f"{PREFIX}json={shown(self.json)} is invalid: not JSON ({e}).") from None
                _check(isinstance(schema, (dict, bool)), "json", self.json, "must be a JSON schema object")
            else:
                try:
                    json.dumps(self.json)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{PREFIX}json={shown(self.json)} is invalid: not JSON ({e}).") from None
        if self.structural_tag is not None:
            _check(isinstance(self.structural_tag, str) and self.structural_tag, "structural_tag", self.structural_tag,
                   "must be a non-empty JSON text")
            depth = text_depth(self.structural_tag)
            if depth > MAX_JSON_DEPTH:
                raise ValueError(too_deep(f"{PREFIX}structural_tag={shown(self.structural_tag)}", depth))
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            _check(v is None or (isinstance(v, str) and v), name, v, "must be a non-empty string")
        if self.choice is not None:
            _check(isinstance(self.choice, tuple) and self.choice and all(isinstance(c, str) and c for c in self.choice),
                   "choice", self.choice, "must be a non-empty list of non-empty strings")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if (getattr(self, k) is not None if k != "json_object" else self.json_object))

    @property
    def key(self) -> tuple[str, str]:
        """(kind, spec text): equal keys compile to the same grammar (the compile cache's key)."""
        kind = self.kind
        if kind == "json":
            # Insertion order, not sorted: a schema's property order is the order the output is written in.
            spec = self.json if isinstance(self.json, str) else json.dumps(self.json)
        elif kind == "choice":
            spec = json.dumps(list(self.choice))
        elif kind == "json_object":
            spec = ""
        else:
            spec = getattr(self, kind)
        return kind, spec


def choice_ebnf(choices) -> str:
    """The EBNF grammar whose output is exactly one of `choices` (the choice kind's grammar, also what the
    managed HTTP gateway's front sends for a `choice`: engine/server/gateway/quirks.py carried_constraint)."""
    alts = " | ".join('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in choices)
    return f"root ::= {alts}"


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{PREFIX}{name}={shown(value)} is invalid: {allowed}.")
