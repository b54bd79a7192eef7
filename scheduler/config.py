"""Configs of the scheduler and of the paged KV cache (ARCHITECTURE.md: Design rules 2).

Each is a plain dataclass checked in `__post_init__`; a bad value raises a
ValueError with one sentence naming the field, the value and what is allowed.
"""
from __future__ import annotations

from dataclasses import dataclass


def _is_int(v: object) -> bool:
    # bool is an int subclass; `block_size=True` is a bug, not a 1.
    return isinstance(v, int) and not isinstance(v, bool)


def _check(ok: bool, cls: str, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{cls}.{name}={value!r} is invalid: {allowed}.")


@dataclass
class CacheConfig:
    """Shape of the paged KV cache.

    `num_kv_blocks=None` means "not known yet": the engine measures free device
    memory after loading the model and fills it in before building the
    `Scheduler`, which refuses a config where it is still None.
    """

    block_size: int = 16
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool = True
    # Set by the engine when the model's sliding-window layers keep their own block table (paired with the full
    # layers on shared cache tensors): blocks that leave this window are freed. None: one table for every layer.
    sliding_window: int | None = None
    # Tokens after a block that its prefix-cache hash covers too. The engine sets 1 when a speculative drafter
    # keeps a KV cache layer whose entry at position t is computed from token t + 1 (an MTP layer, an EAGLE-3
    # head): a block's last slot then depends on the next block's first token, so a hit must match it as well, or
    # the drafter would read a state made for another request's next token.
    block_hash_lookahead: int = 0
    # Set by the engine for a model with per-sequence state (linear attention; scheduler/hybrid_cache.py): the
    # state slots (one per request holding state: at least max_num_seqs) and the checkpoint slots kept for
    # prefix caching, both allocated by the worker beside the KV blocks. 0: the model keeps no such state.
    num_state_slots: int = 0
    num_state_checkpoints: int = 0

    def __post_init__(self) -> None:
        _check(_is_int(self.block_size) and self.block_size > 0,
               "CacheConfig", "block_size", self.block_size, "must be a positive integer")
        _check(self.num_kv_blocks is None or (_is_int(self.num_kv_blocks) and self.num_kv_blocks >= 1),
               "CacheConfig", "num_kv_blocks", self.num_kv_blocks,
               "must be None (filled in by the engine) or an integer >= 1")
        _check(isinstance(self.enable_prefix_caching, bool),
               "CacheConfig", "enable_prefix_caching", self.enable_prefix_caching, "must be True or False")
        _check(_is_int(self.block_hash_lookahead) and 0 <= self.block_hash_lookahead <= 1,
               "CacheConfig", "block_hash_lookahead", self.block_hash_lookahead, "must be 0 or 1")
        _check(self.sliding_window is None or (_is_int(self.sliding_window) and self.sliding_window >= 1),
               "CacheConfig", "sliding_window", self.sliding_window, "must be None or a positive integer")
        for name in ("num_state_slots", "num_state_checkpoints"):
            v = getattr(self, name)
            _check(_is_int(v) and v >= 0, "CacheConfig", name, v, "must be an integer >= 0")
        _check(self.num_state_slots > 0 or self.num_state_checkpoints == 0, "CacheConfig", "num_state_checkpoints",
               self.num_state_checkpoints, "must be 0 when num_state_slots is 0 (no per-sequence state)")
        _check(self.num_state_slots == 0 or self.sliding_window is None, "CacheConfig", "sliding_window",
               self.sliding_window, "must be None with num_state_slots > 0 (linear attention beside a sliding-window "
               "group is not built)")

    @property
    def num_kv_tokens(self) -> int | None:
        """Tokens the whole pool can hold (None while num_kv_blocks is unknown)."""
        return None if self.num_kv_blocks is None else self.num_kv_blocks * self.block_size


@dataclass
class SchedulerConfig:
    """Limits of one engine step and of one sequence.

    `max_num_batched_tokens` is the token budget of a step (prompt chunks and
    decode tokens alike); `max_num_seqs` caps how many requests run at once;
    `max_model_len` caps prompt + generated tokens of one request.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 4096
    # The engine schedules step N+1 while step N runs (the overlapped loop; scheduler.py's docstring): the
    # scheduler supports it either way, the engine and workers read this.
    async_scheduling: bool = False

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 1, "SchedulerConfig", name, value, "must be a positive integer")
        _check(isinstance(self.async_scheduling, bool), "SchedulerConfig", "async_scheduling", self.async_scheduling,
               "must be True or False")
