"""Speculative decoding's counters read from a server's Prometheus endpoint, for `moelink bench-serve`: what each
load level's drafts did (verify rows, drafts, accepted, per draft position) as the difference of two scrapes."""
from __future__ import annotations

import urllib.request
from typing import Optional

_PREFIX = "moelink_spec_decode_"


def scrape(url: str, timeout_s: float = 5.0) -> Optional[dict]:
    """The spec-decode counters at `url` (a /metrics endpoint): {"drafts", "draft_tokens", "accepted_tokens",
    "per_position": {pos: n}}, or None when the server reports none (no drafter, or nothing verified yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (a URL the user gave, http only)
        text = resp.read().decode()
    out = dict(drafts=0, draft_tokens=0, accepted_tokens=0, per_position={})
    seen = False
    for fam in text_string_to_metric_families(text):
        if not fam.name.startswith(_PREFIX):
            continue
        for s in fam.samples:
            if not s.name.endswith("_total"):
                continue
            seen = True
            key = s.name[len(_PREFIX):-len("_total")]
            if key == "num_drafts":
                out["drafts"] = int(s.value)
            elif key == "num_draft_tokens":
                out["draft_tokens"] = int(s.value)
            elif key == "num_accepted_tokens":
                out["accepted_tokens"] = int(s.value)
            elif key == "num_accepted_tokens_per_pos":
                out["per_position"][int(s.labels["position"])] = int(s.value)
    return out if seen else None


def level_delta(before: Optional[dict], after: Optional[dict]) -> Optional[dict]:
    """What one load level's drafts did (after - before), with the acceptance rate and the mean tokens a
    verifying request emitted per step; None when the server verified no drafts during the level."""
    if after is None:
        return None
    b = before or dict(drafts=0, draft_tokens=0, accepted_tokens=0, per_position={})
    rows = after["drafts"] - b["drafts"]
    drafts = after["draft_tokens"] - b["draft_tokens"]
    accepted = after["accepted_tokens"] - b["accepted_tokens"]
    if rows <= 0:
        return None
    per_pos = [after["per_position"].get(i, 0) - b["per_position"].get(i, 0)
               for i in range(max(after["per_position"], default=-1) + 1)]
    return dict(verify_rows=rows, draft_tokens=drafts, accepted_tokens=accepted,
                acceptance_rate=accepted / drafts if drafts else 0.0, mean_accepted_length=1.0 + accepted / rows,
                acceptance_per_position=[n / rows for n in per_pos])
