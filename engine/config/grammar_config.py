"""GrammarConfig: the bounds on structured-output grammar compiles (engine/core/grammar_compile.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_GRAMMAR_COMPILE_TIMEOUT_S = 10.0
DEFAULT_MAX_GRAMMAR_CHARS = 64 << 10
DEFAULT_MAX_QUEUED_GRAMMAR_COMPILES = 8
DEFAULT_GRAMMAR_COMPILE_WORKERS = 1


@dataclass(frozen=True)
class GrammarConfig:
    """`workers`: compile processes (each runs one compile at a time; one keeps a core for the step loop on a
    small machine). `max_queued`: compiles waiting for a worker beyond which a new spec is refused (retry
    later). `timeout_s`: a compile running longer fails with an error naming the field. `max_spec_chars`: a
    longer schema, regex, grammar or choice list is refused before it is queued. `prestart`: start the compile
    processes with the engine (a server does: its first constrained request then finds one up, instead of waiting
    seconds for a start); False starts them at the first grammar."""

    workers: int = DEFAULT_GRAMMAR_COMPILE_WORKERS
    max_queued: int = DEFAULT_MAX_QUEUED_GRAMMAR_COMPILES
    timeout_s: float = DEFAULT_GRAMMAR_COMPILE_TIMEOUT_S
    max_spec_chars: int = DEFAULT_MAX_GRAMMAR_CHARS
    prestart: bool = False

    def __post_init__(self) -> None:
        for name, field, low in (("workers", "grammar_compile_workers", 1),
                                 ("max_queued", "max_queued_grammar_compiles", 1),
                                 ("max_spec_chars", "max_grammar_chars", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{field}={v!r} is invalid: must be an integer >= {low}.")
        if not isinstance(self.prestart, bool):
            raise ValueError(f"grammar_prestart={self.prestart!r} is invalid: must be True or False.")
        t = self.timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"grammar_compile_timeout={t!r} is invalid: must be a positive number of seconds.")
