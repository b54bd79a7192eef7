"""Sampling parameters, validated where they are made (vLLM-compatible names)."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from .kv_transfer_params import KVTransferParams
from .safe_text import shown
from .structured_output_params import StructuredOutputParams

if TYPE_CHECKING:  # types only: `moelink serve`'s flag parsing imports this module, and neither numpy nor torch
    import numpy as np
    import torch

    # What forced_routed_experts takes: an integer array [positions, MoE layers, top_k] as numpy, torch or nested
    # lists; validation leaves an int32 numpy array in its place.
    ForcedRouting = Union[np.ndarray, torch.Tensor, Sequence[Sequence[Sequence[int]]]]


_GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class Interval:
    """A closed (or half-open) range of finite numbers; str() is how messages and the bad-input table write it."""

    low: float
    high: float
    low_open: bool = False

    def __contains__(self, v) -> bool:
        return (_is_num(v) and math.isfinite(v) and (self.low < v if self.low_open else self.low <= v)
                and v <= self.high)

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


# What each float parameter may be. Non-finite values are never allowed (temperature=inf would sample
# uniformly, NaN poisons the whole batch's softmax). Bounds beyond vLLM's own:
# - temperature <= 100: above it every token is about equally likely, whatever the model says;
# - repetition_penalty in [0.01, 100]: a seen token's logit is divided or multiplied by it, so 1e-45
#   overflows float32 to inf (then NaN); beyond 100x either way the output only degenerates.
FLOAT_RANGES: dict[str, Interval] = {
    "temperature": Interval(0.0, 100.0),
    "top_p": Interval(0.0, 1.0, low_open=True),
    "min_p": Interval(0.0, 1.0),
    "repetition_penalty": Interval(0.01, 100.0),
    "presence_penalty": Interval(-2.0, 2.0),
    "frequency_penalty": Interval(-2.0, 2.0),
}


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    Defaults match vLLM: temperature 1.0, no top-k/top-p/min-p, 16 new tokens.
    temperature 0 means greedy. A request with `seed` draws from its own
    generator, so its tokens do not depend on what else is in the batch.
    `n` samples per prompt: `LLM.generate` (and the servers) run each as its own engine request
    (`sample(i)`); an engine request itself is one sample.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1, still accepted) disables, as vLLM 0.32
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    max_tokens: Optional[int] = 16  # None: until the context is full
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: Optional[int] = None  # top-n logprobs per generated token
    # Logprobs of the prompt's tokens (each given those before it) and their top-n alternatives, in the first
    # output (vLLM's); every prompt token is then computed: no prefix-cache, offload or remote-prefill hit.
    prompt_logprobs: Optional[int] = None
    # Rollout routing replay (needs the engine's enable_return_routed_experts): the finished output's
    # CompletionOutput.routed_experts, int [prompt + generated - 1, MoE layers, top_k], the logical experts every
    # forwarded position was routed to. Like prompt_logprobs, the whole prompt is then computed.
    return_routed_experts: bool = False
    # Its other half: the experts the prompt's first n positions use in every MoE layer instead of their routers'
    # top-k, int [n <= prompt length, MoE layers, top_k] of logical expert ids (a row of -1: that position's router
    # decides; MaxText's forced_routed_experts, tunix's -1 sentinel). Their weights are the router's scores at
    # those experts (moe/routing_replay.py). Read into an int32 numpy array.
    forced_routed_experts: Optional[ForcedRouting] = None
    # Keep only the prompt's last k tokens; -1: as many as fit beside max_tokens (vLLM's "the model's limit").
    truncate_prompt_tokens: Optional[int] = None
    skip_special_tokens: bool = True
    # False: no text at all (token ids only, as a client that detokenizes itself wants, e.g. the managed
    # gateway, engine/server/gateway/); saves the per-token decode on the engine thread. Stop strings need
    # text, so they need True.
    detokenize: bool = True
    # Constrain the output to a JSON schema, regex, grammar or choice (engine/core/structured_output.py).
    structured_outputs: Optional[StructuredOutputParams] = None
    # Prefill/decode disaggregation (engine/contract/kv_transfer_params.py): save this request's prompt KV for a
    # decode engine, or load it from the prefill engine that saved it. A dict in vLLM's shape is converted.
    kv_transfer_params: Optional[KVTransferParams] = None
    # vLLM's logits processors, applied by the rank's sampler after the logprobs are taken, before the penalties
    # (engine/rank/logits_rules.py): {token id: bias} added to the logits (a dict of token-id strings, as JSON
    # carries it, is read as ids); the only token ids the request may sample; words it may never complete (each
    # tokenized at intake with and without a leading space: `bad_words_token_ids`).
    logit_bias: Optional[dict[int, float]] = None
    allowed_token_ids: Optional[list[int]] = None
    bad_words: Optional[list[str]] = None  # None is taken and read as [] (vLLM's)
    # Whether the text puts a space between two added (special) tokens when skip_special_tokens=False (vLLM's).
    spaces_between_special_tokens: bool = True
    # Arbitrary data for custom sampling code (vLLM's): carried, read by nothing in the engine.
    extra_args: Optional[dict[str, Any]] = None
    # Set at intake (engine/core/input_processing.py) from bad_words and the tokenizer: the token-id sequences the
    # sampler keeps the output from completing; None when there are no bad words.
    bad_words_token_ids: Optional[list[list[int]]] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        _check(_is_int(self.n) and self.n >= 1, "n", self.n, "must be an integer >= 1")
        for name, allowed in FLOAT_RANGES.items():
            value = getattr(self, name)
            _check(value in allowed, name, value, f"must be a finite number in {allowed}")
        _check(_is_int(self.top_k) and self.top_k >= -1, "top_k", self.top_k, "must be 0 (disabled), -1 (disabled) or a positive integer")
        # vLLM 0.32's rule (SamplingParams._verify_greedy_sampling): n greedy samples would be n copies.
        _check(self.n == 1 or not self.greedy, "n", self.n, "must be 1 when using greedy sampling (temperature 0)")
        # An int64, as both gRPC protos carry it and vLLM's OpenAI server bounds it: a larger one from JSON (HTTP
        # /generate, the Python API) overflowed torch's generator seed at the rank and killed the engine loop for every
        # user (issue 76, found beside item 12). Sample i draws with seed + i, within torch's [-2^63, 2^64).
        _check(self.seed is None or (_is_int(self.seed) and -(1 << 63) <= self.seed < 1 << 63), "seed", self.seed,
               "must be an integer in [-2^63, 2^63) (an int64) or None")
        _check(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1), "max_tokens", self.max_tokens, "must be an integer >= 1 or None")
        _check(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", self.min_tokens, "must be an integer >= 0")
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens, f"must be <= max_tokens ({self.max_tokens})")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "must be non-empty strings")
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", self.stop_token_ids, "must be non-negative integers")
        _check(isinstance(self.detokenize, bool), "detokenize", self.detokenize, "must be True or False")
        _check(self.detokenize or not self.stop, "detokenize", self.detokenize,
               "stop strings are matched on the output text, so they need detokenize=True")
        _check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputParams),
               "structured_outputs", self.structured_outputs, "must be a StructuredOutputParams or None")
        _check(self.truncate_prompt_tokens is None or (_is_int(self.truncate_prompt_tokens) and
               (self.truncate_prompt_tokens == -1 or self.truncate_prompt_tokens >= 1)), "truncate_prompt_tokens",
               self.truncate_prompt_tokens, "must be None, -1 (the model's limit) or a positive integer")
        if isinstance(self.kv_transfer_params, dict):
            self.kv_transfer_params = KVTransferParams.from_dict(self.kv_transfer_params)
        _check(self.kv_transfer_params is None or isinstance(self.kv_transfer_params, KVTransferParams),
               "kv_transfer_params", self.kv_transfer_params, "must be a KVTransferParams, a dict of its fields or None")
        # Each of n samples is its own engine request, and a saved KV is served once.
        _check(self.kv_transfer_params is None or self.n == 1, "n", self.n, "must be 1 with kv_transfer_params")
        _check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS), "logprobs", self.logprobs,
               f"must be None or an integer in [0, {MAX_LOGPROBS}]")
        _check(self.prompt_logprobs is None or (_is_int(self.prompt_logprobs)
                                                and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
               "prompt_logprobs", self.prompt_logprobs,
               f"must be None or an integer in [0, {MAX_LOGPROBS}] (-1, the whole vocabulary, is not served)")
        _check(isinstance(self.return_routed_experts, bool), "return_routed_experts", self.return_routed_experts,
               "must be True or False")
        _check(self.kv_transfer_params is None or not self.kv_transfer_params.do_remote_prefill
               or not self.return_routed_experts, "return_routed_experts", self.return_routed_experts,
               "must be False with kv_transfer_params' do_remote_prefill (the prompt is prefilled elsewhere)")
        self._check_forced_routing()
        self._check_logits_rules()
        # A remote prefill's KV is loaded, not computed here: nothing would score the prompt.
        _check(self.kv_transfer_params is None or not self.kv_transfer_params.do_remote_prefill
               or self.prompt_logprobs is None, "prompt_logprobs", self.prompt_logprobs,
               "must be None with kv_transfer_params' do_remote_prefill (the prompt is prefilled elsewhere: ask the "
               "prefill engine)")

    def _check_logits_rules(self) -> None:
        """logit_bias, allowed_token_ids, bad_words, extra_args: their shapes here; their token ids against the
        vocabulary at intake (engine/core/input_processing.py), where the model is known."""
        _check(isinstance(self.spaces_between_special_tokens, bool), "spaces_between_special_tokens",
               self.spaces_between_special_tokens, "must be True or False")
        if self.logit_bias is not None:
            _check(isinstance(self.logit_bias, dict), "logit_bias", self.logit_bias,
                   "must be a dict of {token id: bias} or None")
            self.logit_bias = {_token_key(k): _bias(k, v) for k, v in self.logit_bias.items()}
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            # C-speed checks (a type set, a min), then one sorted, de-duplicated list: what the rank converts once for
            # all n samples (they share it: `sample`); a repeated id allows nothing more (vLLM's mask is a set).
            _check(isinstance(ids, (list, tuple)) and len(ids) > 0 and set(map(type, ids)) == {int} and min(ids) >= 0,
                   "allowed_token_ids", ids, "must be a non-empty list of token ids (integers >= 0) or None")
            self.allowed_token_ids = sorted(set(ids))
        if self.bad_words is None:
            self.bad_words = []  # vLLM's default: no bad words is an empty list
        else:
            words = self.bad_words
            _check(isinstance(words, (list, tuple)) and all(isinstance(w, str) and w for w in words), "bad_words",
                   words, "must be a list of non-empty strings or None")
            self.bad_words = list(dict.fromkeys(words))  # vLLM drops repeats, keeping the first's place
        _check(self.extra_args is None or (isinstance(self.extra_args, dict) and _int64_leaves(self.extra_args)),
               "extra_args", self.extra_args, "must be a dict or None, its integers in [-2^63, 2^64) (vLLM's)")

    @property
    def logits_rules(self) -> bool:
        """Whether the rank's sampler edits this request's logits (a bias, allowed ids or bad words): what the
        persistent batch reads once per request (engine/rank/input_batch.py)."""
        return bool(self.logit_bias) or self.allowed_token_ids is not None or bool(self.bad_words_token_ids)

    def _check_forced_routing(self) -> None:
        if self.forced_routed_experts is None:
            return
        import numpy as np  # here, not at import: `moelink serve`'s flag parsing imports this module, not numpy

        value = self.forced_routed_experts
        try:
            arr = np.asarray(value.cpu() if hasattr(value, "cpu") else value)
        except (TypeError, ValueError):
            arr = None
        _check(arr is not None and arr.ndim == 3 and arr.shape[0] >= 1 and arr.dtype.kind in "iu",
               "forced_routed_experts", _shape_of(value),
               "must be an integer array [positions >= 1, MoE layers, top_k] of expert ids (-1: the router's)")
        assert arr is not None
        _check(bool(((arr >= 0).all(-1) | (arr == -1).all(-1)).all()),
               "forced_routed_experts", _shape_of(value),
               "must hold expert ids >= 0, or a whole row of -1 (that position's router decides)")
        self.forced_routed_experts = arr.astype(np.int32, copy=False)

    def sample(self, i: int) -> "SamplingParams":
        """The parameters of sample i (0 <= i < n) as one engine request: n=1 and, when seeded, seed + i, so the
        samples differ from each other and a seeded request is reproducible sample by sample (every entry point
        derives them this way). A copy not validated again; the lists are shared, never copied: nothing changes
        them after validation. The prompt is scored once: sample 0 alone computes the prompt logprobs (the others may
        take the prompt's KV from the prefix cache)."""
        p = copy.copy(self)
        p.n = 1
        if self.seed is not None:
            p.seed = self.seed + i
        if i:
            p.prompt_logprobs = None
        return p

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS


def _shape_of(value) -> str:
    """What a message shows of an array-like: its shape and dtype, not its values."""
    shape = getattr(value, "shape", None)
    return f"<{type(value).__name__} shape {tuple(shape)}>" if shape is not None else f"<{type(value).__name__}>"


def _token_key(key) -> int:
    """A logit_bias key as a token id: an int, or a string of one (JSON's object keys are strings)."""
    if isinstance(key, str):
        try:
            key = int(key)
        except ValueError:
            key = None
    _check(_is_int(key) and key >= 0, "logit_bias", key, "keys must be token ids (integers >= 0, or strings of one)")
    return key


def _bias(key, value) -> float:
    # Finite only: inf - inf is NaN, and a NaN logit poisons the row's softmax. vLLM's offline SamplingParams takes
    # any float; its OpenAI server clamps to [-100, 100] (the front does too).
    _check(_is_num(value) and math.isfinite(value), f"logit_bias[{key}]", value, "must be a finite number")
    return float(value)


def _int64_leaves(value, depth: int = 0) -> bool:
    """Every integer inside (keys included) fits vLLM's msgpack transport, [-2^63, 2^64); nesting bounded."""
    if depth > 32:
        return False
    if isinstance(value, dict):
        return all(_int64_leaves(k, depth + 1) and _int64_leaves(v, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_int64_leaves(v, depth + 1) for v in value)
    return not _is_int(value) or -(1 << 63) <= value < 1 << 64


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name}={shown(value)} is invalid: {allowed}.")
