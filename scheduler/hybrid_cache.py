"""The cache of a model whose layers keep different kinds of state: paged KV for its attention layers and one
fixed-size state per sequence for its linear-attention layers (Qwen3-Next, Qwen3.5: gated DeltaNet on three
layers of four). vLLM's hybrid KV-cache manager and SGLang's MambaPool beside the token pool are the models.

`HybridCacheManager` answers the scheduler's questions of its KV policy (scheduler/kv_cache_manager.py's
interface), so the scheduler never asks which kinds a model has:

- admission takes a request's blocks *and* a state slot (scheduler/state_slots.py) together, or neither;
  finish, abort, preemption and a failed KV load release both (`free`).
- prefix caching: a hit of k blocks is usable only up to the last block boundary k' <= k at which a state
  checkpoint exists (the recurrent state summarises every token before it, so KV alone cannot resume a
  sequence). The request's slot starts as a copy of that checkpoint (`NewRequestData.state_copy_from`).
- checkpoints are saved where a prompt's chunk ends at its last whole block before the final token (the longest
  prefix an identical prompt can hit): `chunk_limit` ends a prompt's chunk there, `plan_step` reserves the
  checkpoint slot and names the copy in the step (`SchedulerOutput.state_saves`), `step_taken` registers it once
  the step's output is taken (its state is written by then).
- and while a request decodes, at every block boundary its plain decode steps reach (a rolling "tail": each new
  one replaces the request's previous one), so the request's last boundary outlives it: the next turn of a chat
  (this prompt + this answer + a new message) resumes from there instead of recomputing the conversation, as
  SGLang's MambaRadixCache keeps a finished request's state. The tail's block is hashed when its step is taken
  (under the overlapped loop the step's input token is not known when it is planned). A verify step saves
  nothing (its state is replayed to the accepted tokens after the copy would run). Cost: one state copy per
  request per block of decode (Qwen3-Next-80B: 77 MB, ~50 us of HBM time on an H100); a tail takes a free
  checkpoint slot or evicts another tail, never a prompt's checkpoint (state_slots.StateCheckpoints.reserve).

The memory budget: the worker allocates the state slots and checkpoints from the same bytes as the KV blocks
(engine/config/kv_sizing.py counts both), so `num_slots` and `num_checkpoints` come with `num_kv_blocks`.
"""
from __future__ import annotations

from collections.abc import Sequence

from .block_pool import extend_block_hashes
from .kv_cache_manager import KVCacheManager
from .request import Request
from .state_slots import StateCheckpoints, StateSlots


def checkpoint_boundary(num_prompt_tokens: int, block_size: int) -> int:
    """The position after the last whole block of a prompt that a prefix hit can reach (hits stop before the
    final token, which must be computed for its logits); 0 when there is none."""
    return ((num_prompt_tokens - 1) // block_size) * block_size


class HybridCacheManager:
    """Paged KV (`kv`, full attention) plus one state slot per request (module docstring)."""

    def __init__(self, kv: KVCacheManager, num_slots: int, num_checkpoints: int) -> None:
        if type(kv) is not KVCacheManager:
            # A sliding group's hits are shortened by its own rule; combining both rules is not built.
            raise ValueError(f"HybridCacheManager kv={type(kv).__name__} is invalid: a model with linear-attention "
                             "layers runs with one paged-KV table (no sliding-window group) for now.")
        self.kv = kv
        self.slots = StateSlots(num_slots)
        use_ckpt = kv.enable_prefix_caching and num_checkpoints > 0
        self.ckpts = StateCheckpoints(num_slots, num_checkpoints if use_ckpt else 0)
        self._copy_from: dict[str, int] = {}  # admission -> the checkpoint its slot starts from
        self._saves: dict[int, dict[str, int]] = {}  # step id -> {request id: checkpoint slot} not yet taken
        self._tail_saves: dict[int, tuple[Request, int]] = {}  # checkpoint slot -> (request, boundary): decode saves
        self._tails: dict[str, tuple[int, object]] = {}  # request id -> (slot, block hash) of its committed tail
        if not use_ckpt:  # nothing to save: the scheduler skips the chunk rule and the per-step pass
            self.chunk_limit = self.plan_step = None

    # -- the KV policy's attributes the scheduler reads --------------------------------------------------------------
    @property
    def pool(self):
        return self.kv.pool

    @property
    def block_size(self) -> int:
        return self.kv.block_size

    @property
    def enable_prefix_caching(self) -> bool:
        return self.kv.enable_prefix_caching

    @property
    def lookahead(self) -> int:
        return self.kv.lookahead

    @property
    def num_cached_blocks(self) -> dict[str, int]:
        return self.kv.num_cached_blocks

    def exclude_from_prefix_cache(self, req) -> None:
        self.kv.exclude_from_prefix_cache(req)

    @property
    def decode_tables(self):
        # A request in the tables holds its slot since admission: the decode fast path needs nothing else.
        return self.kv.decode_tables

    new_step_extras = None

    @property
    def num_requests_holding_blocks(self) -> int:
        return self.kv.num_requests_holding_blocks

    def max_tokens_alone(self) -> int:
        return self.kv.max_tokens_alone()

    def blocks_alone(self, num_tokens: int) -> int:
        return self.kv.blocks_alone(num_tokens)

    def num_blocks_needed(self, num_tokens: int) -> int:
        return self.kv.num_blocks_needed(num_tokens)

    def get_block_ids(self, request_id: str) -> list[int]:
        return self.kv.get_block_ids(request_id)

    def transfer_tables(self, request_id: str, num_blocks: int) -> tuple[list[int], list[int]]:
        return self.kv.transfer_tables(request_id, num_blocks)

    def state_slot(self, request_id: str) -> int | None:
        return self.slots.get(request_id)

    # -- admission, growth, release ----------------------------------------------------------------------------------
    def get_computed_blocks(self, req: Request) -> tuple[list[int], int]:
        """The KV hit shortened to the last block boundary with a state checkpoint (module docstring)."""
        self._copy_from.pop(req.request_id, None)
        hits, num_hit, slot = self._hit(req)
        if slot is not None:
            self.ckpts.lookup(req.block_hashes[len(hits) - 1])  # a use: to the back of the LRU order
            self._copy_from[req.request_id] = slot
            self.ckpts.num_hits += 1
        return hits, num_hit

    def peek_computed_blocks(self, req: Request) -> tuple[list[int], int]:
        """What `get_computed_blocks` would return, changing nothing (no use counted, no copy named): the KV offload
        tiers (engine/kv_transfer/offload.py) ask where the device hit ends."""
        return self._hit(req)[:2]

    def _hit(self, req: Request) -> tuple[list[int], int, int | None]:
        """(hit blocks, hit tokens, the checkpoint slot at their end): the longest KV hit ending on a checkpoint."""
        hits, _ = self.kv.get_computed_blocks(req)
        if not hits or not self.ckpts.num:
            return [], 0, None
        for k in range(len(hits), 0, -1):
            slot = self.checkpoint_slot(req.block_hashes[k - 1])
            if slot is not None:
                return hits[:k], k * self.block_size, slot
        return [], 0, None

    def checkpoint_slot(self, block_hash) -> int | None:
        """The checkpoint slot registered under `block_hash` (the state right after that block), or None; not a use
        (the LRU order is left as it is)."""
        return self.ckpts._by_hash.get(block_hash)  # state_slots.StateCheckpoints' map, read without touching it

    def allocate_slots(self, req: Request, num_new_tokens: int,
                       computed_blocks: Sequence[int] = ()) -> list[int] | None:
        """As KVCacheManager.allocate_slots; a request holding no blocks yet takes its state slot too (None,
        changing nothing, when no slot or no block is free)."""
        rid = req.request_id
        fresh = rid not in self.kv.num_cached_blocks
        if fresh and self.slots.num_free == 0 and self.slots.get(rid) is None:
            return None
        new_blocks = self.kv.allocate_slots(req, num_new_tokens, computed_blocks)
        if new_blocks is not None and fresh:
            self.slots.take(rid)
        return new_blocks

    def fill_new_request(self, new) -> None:
        """The request's state slot, and the checkpoint it starts from after a prefix hit (-1: from zeros, or
        from what the slot holds when `num_computed_tokens` > 0 and no copy is named)."""
        new.state_slot = self.slots.get(new.req_id)
        new.state_copy_from = self._copy_from.pop(new.req_id, -1)
        if new.num_computed_tokens == 0:
            new.state_copy_from = -1

    def state_loaded(self, request_id: str) -> None:
        """Its state arrives with its KV from another engine (scheduler/kv_connector.py): the slot starts from what
        the load writes, not from a prefix hit's checkpoint."""
        self._copy_from.pop(request_id, None)

    def cache_blocks(self, req: Request, num_written: int | None = None) -> None:
        self.kv.cache_blocks(req, num_written)

    def free(self, req: Request) -> None:
        self.kv.free(req)
        self.slots.release(req.request_id)
        self._copy_from.pop(req.request_id, None)
        self._tails.pop(req.request_id, None)  # its last tail stays a checkpoint (the next turn's resume point)

    def check_request_blocks(self, req: Request) -> list[int]:
        assert self.slots.get(req.request_id) is not None, f"{req} holds blocks but no state slot"
        return self.kv.check_request_blocks(req)

    # -- checkpoints -------------------------------------------------------------------------------------------------
    @property
    def saves_checkpoints(self) -> bool:
        return self.ckpts.num > 0

    def chunk_limit(self, req: Request, start: int, n: int) -> int:
        """`n` tokens scheduled from position `start`, ended at the checkpoint boundary when they would cross it
        (the state there is what a later identical prefix resumes from)."""
        b = checkpoint_boundary(req.num_prompt_tokens, self.block_size)
        return b - start if start < b < start + n else n

    def plan_step(self, step_id: int, scheduled: list[tuple[Request, int]]) -> dict[str, int]:
        """Checkpoint saves of one step: every scheduled request whose chunk ends exactly at its checkpoint
        boundary (and whose prefix has none yet) gets a checkpoint slot; {request id: slot}."""
        saves: dict[str, int] = {}
        bs = self.block_size
        for req, written in scheduled:
            if written >= req.num_prompt_tokens:
                # The prompt done (this step ends it, or decodes): a plain step that ends on a block boundary saves
                # the request's new tail (keyed when taken: module docstring). A verify step's state is replayed
                # after the copy would run: nothing saved.
                if written % bs == 0 and not req.spec_token_ids:
                    slot = self.ckpts.reserve(None, tail=True)
                    if slot is None:
                        continue
                    saves[req.request_id] = slot
                    self._tail_saves[slot] = (req, written)
                continue
            if written != checkpoint_boundary(req.num_prompt_tokens, bs) or written == 0:
                continue
            extend_block_hashes(req.block_hashes, req.all_token_ids, bs, written // bs, self.kv.lookahead, root=req.cache_root)
            if len(req.block_hashes) < written // bs:
                continue
            h = req.block_hashes[written // bs - 1]
            if self.ckpts.contains(h):
                continue
            slot = self.ckpts.reserve(h)
            if slot is None:
                break
            saves[req.request_id] = slot
        if saves:
            self._saves[step_id] = saves
        return saves

    def step_taken(self, step_id: int) -> None:
        """The step's output was taken: its saves hold their states now."""
        for slot in self._saves.pop(step_id, {}).values():
            tail = self._tail_saves.pop(slot, None)
            if tail is None:
                self.ckpts.commit(slot)
            else:
                self._commit_tail(slot, *tail)

    def _commit_tail(self, slot: int, req: Request, written: int) -> None:
        """Key a decode save by its block, now that the step's input token is known; it replaces the request's
        previous tail. Given back when the tokens are not all there (a finished request's answer cut at a stop
        string)."""
        bs = self.block_size
        extend_block_hashes(req.block_hashes, req.all_token_ids, bs, written // bs, self.kv.lookahead, root=req.cache_root)
        if len(req.block_hashes) < written // bs:
            self.ckpts.abandon(slot)
            return
        h = req.block_hashes[written // bs - 1]
        self.ckpts.commit(slot, h)
        old = self._tails.pop(req.request_id, None)
        if old is not None and old[0] != slot:
            self.ckpts.discard(*old)
        if req.request_id in self.kv.num_cached_blocks:  # still running: its next tail replaces this one
            self._tails[req.request_id] = (slot, h)

    def steps_dropped(self) -> None:
        """Steps in flight that will never be taken (a rewind): their saves are given back."""
        for saves in self._saves.values():
            for slot in saves.values():
                self.ckpts.abandon(slot)
        self._saves.clear()
        self._tail_saves.clear()

    def reset_prefix_cache(self) -> int:
        self.ckpts.clear()
        self._tails.clear()
        return self.kv.pool.reset_prefix_cache()

    def check_invariants(self) -> None:
        self.slots.check_invariants()
        self.ckpts.check_invariants()
        assert set(self.slots.holders()) == set(self.kv.num_cached_blocks), "state slots and block tables disagree"


__all__ = ["HybridCacheManager", "checkpoint_boundary"]
