"""The replay side of the vLLM compatibility suite: read the recorded fixtures, compare an answer with vLLM's, sort
each difference into the test's tables (tests/server/test_vllm_compat.py; docs/vllm-compat.md#the-compatibility-suite).

A difference is (fixture, field path, vLLM's value, moelink's). Paths are dotted, list indices as numbers
(`body.choices.0.logprobs.token_logprobs.3`), so a table's field globs are plain fnmatch patterns. Compared: the
status, the set of fields at every level (a field one side lacks is `<absent>`), and the values: numbers that are
not both integers to 1e-4 (logprobs), everything else exactly (token ids, text, finish reasons); the keys of a
logprobs mapping in order too (vLLM puts the sampled token first); a stream's events choice by choice. What is fresh per request (ids, creation
times, fingerprints) was dropped when recorded and is dropped from moelink's answer by the same client.
"""
from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "vllm_compat"
FAMILIES = ("completions", "chat", "routes", "offline")
TOLERANCE = 1e-4
ABSENT = "<absent>"
# Compared by presence only: error wording is each server's own (vLLM's are pydantic's or its validators' texts);
# how many prompt tokens an offline request found cached depends on what ran before it in that engine.
SHAPE_ONLY = ("body.error.message", "outputs.*.num_cached_tokens")


@dataclass(frozen=True)
class Diff:
    fixture: str
    path: str
    vllm: Any
    moelink: Any

    def __str__(self) -> str:
        return f"{self.fixture}: {self.path}: vLLM {_short(self.vllm)}, moelink {_short(self.moelink)}"


@dataclass(frozen=True)
class Known:
    """A difference the suite expects: on `fixtures` (names or globs), at `fields` (path globs). INTENDED ones say
    why moelink differs; PENDING ones name the part of issue 79 that is fixing them (`part`)."""

    fixtures: tuple[str, ...]
    fields: tuple[str, ...]
    reason: str
    part: str = ""

    def covers_fixture(self, fixture: str) -> bool:
        return any(fnmatch.fnmatchcase(fixture, p) for p in self.fixtures)

    def covers(self, diff: Diff) -> bool:
        return self.covers_fixture(diff.fixture) and any(fnmatch.fnmatchcase(diff.path, f) for f in self.fields)


def _short(v: Any, limit: int = 160) -> str:
    s = json.dumps(v, ensure_ascii=False) if not isinstance(v, str) or v == ABSENT else repr(v)
    return s if len(s) <= limit else s[:limit] + "..."


def load_fixtures() -> dict[str, dict]:
    """name -> {"case", "vllm"} over every family file, in recording order."""
    out: dict[str, dict] = {}
    for family in FAMILIES:
        for rec in json.loads((FIXTURES / f"{family}.json").read_text()):
            out[rec["case"]["name"]] = rec
    return out


def by_choice(answer: Any) -> Any:
    """A streamed answer's events ordered choice by choice (stable: each choice's own order kept), then the events
    of no choice (the usage), then [DONE]. With n > 1 vLLM interleaves the choices' events as its steps end: two
    recordings of the same request differed in that order, and so may two moelink runs."""
    if not (isinstance(answer, dict) and isinstance(answer.get("body"), list)):
        return answer

    def key(event: Any) -> tuple[int, int]:
        if not isinstance(event, dict):
            return (2, 0)
        choices = event.get("choices") or []
        return (0, choices[0].get("index", 0)) if choices else (1, 0)
    return {**answer, "body": sorted(answer["body"], key=key)}


def compare(fixture: str, vllm: Any, moelink: Any, path: str = "") -> list[Diff]:
    """Every difference between vLLM's recorded answer and moelink's, field by field."""
    if any(fnmatch.fnmatchcase(path, p) for p in SHAPE_ONLY):
        return []
    if isinstance(vllm, dict) and isinstance(moelink, dict):
        return _compare_dicts(fixture, vllm, moelink, path)
    if isinstance(vllm, list) and isinstance(moelink, list):
        diffs = [] if len(vllm) == len(moelink) else [Diff(fixture, _join(path, "length"), len(vllm), len(moelink))]
        for i, (a, b) in enumerate(zip(vllm, moelink)):
            diffs += compare(fixture, a, b, _join(path, str(i)))
        return diffs
    return [] if same_value(vllm, moelink) else [Diff(fixture, path, vllm, moelink)]


def _compare_dicts(fixture: str, vllm: dict, moelink: dict, path: str) -> list[Diff]:
    diffs = [Diff(fixture, _join(path, k), vllm[k], ABSENT) for k in vllm if k not in moelink]
    diffs += [Diff(fixture, _join(path, k), ABSENT, moelink[k]) for k in moelink if k not in vllm]
    shared = [k for k in vllm if k in moelink]
    for k in shared:
        diffs += compare(fixture, vllm[k], moelink[k], _join(path, k))
    if "logprobs" in path and [k for k in vllm if k in moelink] != [k for k in moelink if k in vllm]:
        diffs.append(Diff(fixture, _join(path, "order"), list(vllm), list(moelink)))
    return diffs


def same_value(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if isinstance(a, int) and isinstance(b, int):
            return a == b
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return abs(a - b) <= TOLERANCE
    return type(a) is type(b) and a == b


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def sort_diffs(diffs: list[Diff], intended: dict[str, Known], pending: dict[str, Known]):
    """(unexplained diffs, {table entry name: [diffs it covers]}) with INTENDED tried before PENDING."""
    unexplained: list[Diff] = []
    used: dict[str, list[Diff]] = {}
    for d in diffs:
        name = next((n for table in (intended, pending) for n, k in table.items() if k.covers(d)), None)
        if name is None:
            unexplained.append(d)
        else:
            used.setdefault(name, []).append(d)
    return unexplained, used
