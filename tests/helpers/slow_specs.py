"""Structured-output specs that are slow to compile on purpose: what the tests of the compile bounds and of
abandoned compiles send (tests/server/test_grammar_compile_bounds.py, test_http_hangup_compiles.py)."""
from __future__ import annotations

import random


def expensive_regex(n: int, seed: int = 0) -> str:
    """n optional character ranges ("[d-k]?" ...): xgrammar's compile grows with n squared, about 23 s for 800 on
    the built-in model's vocabulary (1 s for 200). Each seed gives another regex, so equal specs do not share one
    compile. A deeply nested JSON schema used to serve; JSON past 128 levels is now refused before it compiles."""
    r = random.Random(seed)
    return "".join(f"[{chr(97 + a)}-{chr(97 + a + r.randint(1, 10))}]?" for a in (r.randint(0, 14) for _ in range(n)))
