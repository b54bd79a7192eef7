"""Configs of the scheduler and of the paged KV cache (ARCHITECTURE.md: Design rules 2).

Each is a plain dataclass checked in `__post_init__`; a bad value raises a
ValueError with one sentence naming the field, the value and what is allowed.
"""
from __future__ import annotations

from dataclasses import dataclass


def _is_int(v: object) -> bool:
    # bool is an int subclass; `block_size=True` is a bug, not a 1.
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # NaN is not a number here


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
    # Speculative decoding's verify work (scheduler/draft_control.py). A request verifies its i-th draft only while
    # its estimated per-draft acceptance p (a moving average) has p**i >= spec_min_draft_acceptance, so a request
    # whose drafts keep failing decodes plainly instead of making every step verify useless rows; 0 verifies every
    # draft the worker proposes.
    spec_min_draft_acceptance: float = 0.3
    # At most this fraction of a step's token budget goes to draft tokens (and never the tokens the running requests
    # need themselves), so a step's extra verify work stays bounded whatever the drafts.
    spec_max_verify_fraction: float = 0.5
    # Decode steps a request below spec_min_draft_acceptance waits before one draft is tried again (doubled after
    # each failed try, up to 8 times this).
    spec_probe_interval: int = 8
    # Per-client fairness (scheduler/fairness.py): while requests of several clients (Request.client) are held, each
    # client's share of max_num_seqs and of the step's token budget bounds what it takes when others wait; one
    # client alone may use everything. False: first come, first served across clients.
    client_fairness: bool = True
    # With client_fairness, a client below its share of max_num_seqs whose request waits for a slot takes one from
    # the group furthest above its share (a host, then within it a connection or user: scheduler/fair_tree.py), by
    # preemption (recompute), instead of waiting for one to finish.
    client_fair_preemption: bool = True
    # Outputs of one sequence its consumer may leave untaken (a stream nobody reads) before the sequence stops being
    # scheduled until the consumer takes them down to half (engine/api/output_thread.py Stream.backlog_limit;
    # Scheduler.backlogged: it keeps its KV and slot). Far above what a reader keeping up holds (one or two); 0: no
    # limit (issue 95: unread streams generated on, buffering +84 MB a minute and slowing everyone).
    max_undelivered_outputs: int = 64
    # LoRA (engine/lora/): at most this many distinct adapters run at once (the ranks' device slots); a waiting
    # request whose adapter would be one more waits until a running adapter's last request leaves, while the
    # requests behind it that need no new slot go on (scheduler/lora_slots.py LoRASlotWait). 0: no adapters are served.
    max_loras: int = 0

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "spec_probe_interval"):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 1, "SchedulerConfig", name, value, "must be a positive integer")
        for name in ("max_loras", "max_undelivered_outputs"):
            _check(_is_int(getattr(self, name)) and getattr(self, name) >= 0, "SchedulerConfig", name,
                   getattr(self, name), "must be an integer >= 0")
        for name in ("async_scheduling", "client_fairness", "client_fair_preemption"):
            value = getattr(self, name)
            _check(isinstance(value, bool), "SchedulerConfig", name, value, "must be True or False")
        _check(_is_real(self.spec_min_draft_acceptance) and 0 <= self.spec_min_draft_acceptance < 1,
               "SchedulerConfig", "spec_min_draft_acceptance", self.spec_min_draft_acceptance,
               "must be a number in [0, 1) (0: verify every draft)")
        _check(_is_real(self.spec_max_verify_fraction) and 0 < self.spec_max_verify_fraction <= 1,
               "SchedulerConfig", "spec_max_verify_fraction", self.spec_max_verify_fraction,
               "must be a number in (0, 1]")
