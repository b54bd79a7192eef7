"""vLLM's per-request logits processors on a rank: `SamplingParams.logit_bias`, `allowed_token_ids` and `bad_words`
(their token-id sequences, tokenized at intake: engine/core/logits_rules.py), applied by the sampler after the
logprobs are taken and before the penalties, as vLLM's sampler orders them (engine/rank/sampler.py).

Legend: P slots (one per held request that sets a rule), V vocabulary, H the tail of output tokens kept per slot
(the longest bad word's prefix), Q rows of a step with a rule, W bad words of those rows with a prefix, h their
longest prefix.

Everything a request asks is precomputed once, when the persistent batch takes its row (engine/rank/input_batch.py):
* `add_PV` (float32, on the device): per slot its biases, -inf outside its allowed ids and on its one-token bad
  words: a step adds the rows' slots in one gather and one add;
* `tail_PH` (long, on the device): per slot the last H tokens it sampled (-1 before its first), advanced on the
  device by every step's sampled ids in stream order (`record`), so the overlapped loop's tokens still in flight
  count without a sync; a multi-token bad word blocks its last token where the tail ends with its prefix (vLLM's
  bad_words processor, over the output tokens only);
* per slot on the host, its multi-token words (prefix right-aligned in [w, h] and padded with `_ANY`, last token):
  a step concatenates those of its rows (Python only over the rows that set bad words) for one copy.

A request's n samples share its rule objects (SamplingParams.sample copies the parameters, not their lists; one
pickled SchedulerOutput keeps that sharing), and so share one conversion: `add` keys its converted tensors by the
identity of the request's allowed ids, bias and bad words, kept while a slot uses them, so a sample's slot costs
O(1) in those lists (a 2 MB allowed_token_ids at n=512 was converted 512 times on the engine thread, 19 s: issue 95
item 3).

Like input_batch.PenaltyCounts, slots are handed out on the host at once and every change to the tensors runs as
device work in stream order (`take_ops` at a step's launch, `apply` at the start of its device work). A step with no
row that sets a rule builds and runs nothing here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..contract.host_copy import to_device
from ..contract.sampling_params import SamplingParams

_NEG_INF = float("-inf")
_ANY = -2  # a prefix column before a shorter word's first token: matches any tail token (a tail holds ids or -1)


@dataclass
class RuleFill:
    """One slot's fill, applied in stream order (`LogitsRules.apply`)."""

    slot: int
    num_slots: int
    tail_width: int
    allowed: torch.Tensor | None  # long [A] or None: every token allowed
    bias_ids: torch.Tensor  # long [K]
    bias: torch.Tensor  # float32 [K]
    banned: torch.Tensor  # long [S]: one-token bad words
    tail: torch.Tensor  # long [<= H]: the last output tokens the request already has (a resumed request's)


@dataclass
class StepRules:
    """One step's rows with a rule (`LogitsRules.for_step`), what the sampler reads."""

    table: "LogitsRules"
    rows_Q: torch.Tensor  # long [Q] rows of the step
    slots_Q: torch.Tensor  # long [Q] their slots
    word_rows_W: torch.Tensor | None = None  # long [W]: the row each multi-token word blocks in
    word_slots_W: torch.Tensor | None = None  # long [W]: its slot (whose tail it reads)
    prefix_Wh: torch.Tensor | None = None  # long [W, h], right-aligned, _ANY before a shorter prefix
    last_W: torch.Tensor | None = None  # long [W]: the token it blocks
    tail_rows_T: torch.Tensor | None = None  # long [T]: the rows whose slots keep a tail (record)
    tail_slots_T: torch.Tensor | None = None


@dataclass
class _Converted:
    """One request's rules as the fills read them, shared by the slots of its samples (`LogitsRules.add`)."""

    objects: tuple  # (allowed_token_ids, logit_bias, bad_words_token_ids): held, so their ids stay theirs
    allowed: torch.Tensor | None
    bias_ids: torch.Tensor
    bias: torch.Tensor
    banned: torch.Tensor
    words: tuple[np.ndarray, np.ndarray] | None  # (prefix [w, p] right-aligned, last [w]) of its multi-token words
    users: int = 0


class LogitsRules:
    """The held requests' rules (module docstring). Not thread-safe: the runner's host thread owns the host side."""

    def __init__(self, vocab_size: int, device: torch.device):
        self.V, self.device = vocab_size, device
        self.add_PV = torch.zeros(0, vocab_size, dtype=torch.float32, device=device)
        self.tail_PH = torch.full((0, 0), -1, dtype=torch.long, device=device)
        self._num_slots = 0
        self._tail_width = 0  # the host's H; the tensor reaches it when the fills that need it are applied
        self._free: list[int] = []
        self._ops: list[RuleFill] = []
        # slot -> (prefix [w, p] right-aligned, last [w]) of its multi-token words; only slots that have some
        self.words: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        # The converted rules by the identity of their objects (module docstring), and the key of each slot's.
        self._converted: dict[tuple[int, int, int], _Converted] = {}
        self._slot_key: dict[int, tuple[int, int, int]] = {}
        self.conversions = 0  # how many requests' rules were converted (a test reads it)

    def add(self, params: SamplingParams, output_token_ids: list[int]) -> int:
        """A slot for a request with these rules and outputs so far; filled by the next step's device work. O(1)
        in the rules' lists for a sample whose sibling holds a slot (they share one conversion)."""
        if not self._free:
            n = self._num_slots
            self._num_slots = max(8, 2 * n)
            self._free.extend(range(self._num_slots - 1, n - 1, -1))
        slot = self._free.pop()
        objects = (params.allowed_token_ids, params.logit_bias, params.bad_words_token_ids)
        key = (id(objects[0]), id(objects[1]), id(objects[2]))
        conv = self._converted.get(key)
        if conv is None or any(a is not b for a, b in zip(conv.objects, objects)):
            conv = self._converted[key] = self._convert(params, objects)
        conv.users += 1
        self._slot_key[slot] = key
        if conv.words is not None:
            self.words[slot] = conv.words
            self._tail_width = max(self._tail_width, conv.words[0].shape[1])
        keep = self._tail_width if conv.words is not None else 0
        self._ops.append(RuleFill(slot, self._num_slots, self._tail_width, conv.allowed, conv.bias_ids, conv.bias,
                                  conv.banned, self._ids(output_token_ids[-keep:] if keep else [])))
        return slot

    def _convert(self, params: SamplingParams, objects: tuple) -> _Converted:
        """A request's rules as tensors (once per request, whatever its n)."""
        self.conversions += 1
        words = params.bad_words_token_ids or []
        longer = [w for w in words if len(w) > 1]
        prefixes = None
        if longer:
            p = max(len(w) for w in longer) - 1
            prefix = np.full((len(longer), p), _ANY, dtype=np.int64)
            for i, w in enumerate(longer):
                prefix[i, p - (len(w) - 1):] = w[:-1]
            prefixes = (prefix, np.asarray([w[-1] for w in longer], dtype=np.int64))
        bias = params.logit_bias or {}
        return _Converted(
            objects, None if params.allowed_token_ids is None else self._ids(params.allowed_token_ids),
            self._ids(np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))),
            to_device(np.fromiter(bias.values(), dtype=np.float32, count=len(bias)), torch.float32, self.device),
            self._ids([w[0] for w in words if len(w) == 1]), prefixes)

    def _ids(self, ids) -> torch.Tensor:
        return to_device(np.asarray(ids, dtype=np.int64), torch.long, self.device)

    def remove(self, slot: int) -> None:
        self.words.pop(slot, None)
        key = self._slot_key.pop(slot, None)
        conv = self._converted.get(key) if key is not None else None
        if conv is not None:
            conv.users -= 1
            if conv.users <= 0:
                del self._converted[key]
        self._free.append(slot)

    def take_ops(self) -> list[RuleFill]:
        ops, self._ops = self._ops, []
        return ops

    def apply(self, ops: list[RuleFill]) -> None:
        """Device work: grow the tensors to what the fills need, then fill their slots."""
        for op in ops:
            self._grow(op.num_slots, op.tail_width)
            row = self.add_PV[op.slot]
            if op.allowed is None:
                row.zero_()
            else:
                row.fill_(_NEG_INF)
                row[op.allowed] = 0.0
            if op.bias_ids.numel():
                row.index_add_(0, op.bias_ids, op.bias)  # keys of a dict: each id once
            if op.banned.numel():
                row[op.banned] = _NEG_INF
            tail = self.tail_PH[op.slot]
            tail.fill_(-1)
            if op.tail.numel():
                tail[tail.numel() - op.tail.numel():] = op.tail

    def _grow(self, num_slots: int, width: int) -> None:
        have, h = self.tail_PH.shape
        if self.add_PV.shape[0] < num_slots:
            grown = torch.zeros(num_slots, self.V, dtype=torch.float32, device=self.device)
            grown[:have].copy_(self.add_PV)
            self.add_PV = grown
        if have < num_slots or h < width:
            tail = torch.full((max(have, num_slots), max(h, width)), -1, dtype=torch.long, device=self.device)
            if h:
                tail[:have, tail.shape[1] - h:] = self.tail_PH  # right-aligned: the newest token last
            self.tail_PH = tail

    def for_step(self, rows_Q: np.ndarray, slots_Q: np.ndarray) -> StepRules:
        """The step's rows that set a rule (their rows and slots), with the multi-token words of those rows."""
        dev = self.device
        out = StepRules(self, to_device(rows_Q, torch.long, dev), to_device(slots_Q, torch.long, dev))
        held = [(int(r), int(s), self.words[int(s)]) for r, s in zip(rows_Q, slots_Q) if int(s) in self.words]
        if not held:
            return out
        h = max(prefix.shape[1] for _, _, (prefix, _) in held)
        prefixes = [np.pad(prefix, ((0, 0), (h - prefix.shape[1], 0)), constant_values=_ANY)
                    for _, _, (prefix, _) in held]
        counts = [len(last) for _, _, (_, last) in held]
        out.word_rows_W = to_device(np.repeat([r for r, _, _ in held], counts), torch.long, dev)
        out.word_slots_W = to_device(np.repeat([s for _, s, _ in held], counts), torch.long, dev)
        out.prefix_Wh = to_device(np.concatenate(prefixes), torch.long, dev)
        out.last_W = to_device(np.concatenate([last for _, _, (_, last) in held]), torch.long, dev)
        out.tail_rows_T = to_device(np.asarray([r for r, _, _ in held], dtype=np.int64), torch.long, dev)
        out.tail_slots_T = to_device(np.asarray([s for _, s, _ in held], dtype=np.int64), torch.long, dev)
        return out


def apply_logits_rules(logits_BV: torch.Tensor, step: StepRules) -> None:
    """Device work, in place on float32 logits: the rows' biases and masks, then their bad words' last tokens
    where the output so far ends with the word's prefix."""
    table = step.table
    logits_BV.index_add_(0, step.rows_Q, table.add_PV.index_select(0, step.slots_Q))
    if step.prefix_Wh is None:
        return
    h = step.prefix_Wh.shape[1]
    tails_Wh = table.tail_PH.index_select(0, step.word_slots_W)[:, table.tail_PH.shape[1] - h:]
    match_W = ((step.prefix_Wh == tails_Wh) | (step.prefix_Wh == _ANY)).all(dim=1)
    # Added, not assigned: two words may end in the same token, one matched and one not (-inf + 0 = -inf).
    block_W = torch.where(match_W, _NEG_INF, 0.0)
    logits_BV.index_put_((step.word_rows_W, step.last_W), block_W, accumulate=True)


def record_tails(step: StepRules, token_ids_B: torch.Tensor) -> None:
    """Device work after sampling: each tail-keeping slot's newest token joins its tail."""
    if step.tail_slots_T is None:
        return
    tail_PH = step.table.tail_PH
    old_TH = tail_PH.index_select(0, step.tail_slots_T)
    new_TH = torch.cat([old_TH[:, 1:], token_ids_B.index_select(0, step.tail_rows_T).unsqueeze(1)], dim=1)
    tail_PH.index_copy_(0, step.tail_slots_T, new_TH)


__all__ = ["LogitsRules", "RuleFill", "StepRules", "apply_logits_rules", "record_tails"]
