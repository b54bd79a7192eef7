"""The one-sentence refusal of a config.json value moelink cannot run (ARCHITECTURE.md: Design rules 10), raised by
the families' readers and every layer kind's config (engine/models/*_config.py). No torch."""
from __future__ import annotations


def unsupported(field_name: str, value, allowed, why: str = "") -> ValueError:
    """The one-sentence error for a config.json value moelink cannot run: the field, the value, what is allowed."""
    allowed = ", ".join(repr(a) for a in allowed) if isinstance(allowed, tuple) else allowed
    return ValueError(f"config.json {field_name}={value!r} is not supported{why}: allowed: {allowed}.")


__all__ = ["unsupported"]
