"""A request as the scheduler sees it: token ids, progress and state."""
from __future__ import annotations

import enum
import time
from collections.abc import Iterable
from typing import Any, Optional

from .block_pool import root_block_hash
from .outputs import SamplingOptions, TokenLogprobs


class RequestStatus(enum.Enum):
    """Where a request is in its life. Every FINISHED_* state is terminal."""

    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()  # lost its KV blocks; waits to be recomputed
    WAITING_FOR_KV = enum.auto()  # holds its blocks while a KV connector loads them (scheduler/kv_connector.py)
    FINISHED_STOPPED = enum.auto()  # EOS, a stop token, or a stop string (engine)
    FINISHED_LENGTH = enum.auto()  # max_tokens or max_model_len reached
    FINISHED_ABORTED = enum.auto()  # the client went away or cancelled
    FINISHED_ERROR = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI-style reason string, or None while not finished."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS: dict[RequestStatus, str] = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


def is_finished(status: RequestStatus) -> bool:
    """True for the terminal FINISHED_* states."""
    return status.is_finished


def get_finish_reason(status: RequestStatus) -> str | None:
    """"stop" | "length" | "abort" | "error" for finished states, else None."""
    return status.finish_reason


class Request:
    """One generation request inside the scheduler.

    The scheduler only needs token ids and the stop rules; `sampling_params` is
    carried opaquely to the worker. `num_computed_tokens` counts tokens whose
    KV is (or, once the scheduled step runs, will be) in the request's blocks;
    it is advanced when a step is scheduled, not when it completes.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: Optional[SamplingOptions] = None,
        *,
        max_tokens: int | None = None,
        eos_token_ids: Iterable[int] = frozenset(),
        ignore_eos: bool = False,
        stop_token_ids: Iterable[int] = (),
        min_tokens: int = 0,
        arrival_time: float | None = None,
        client: tuple[str, ...] = (),
        cache_salt: bytes = b"",
        lora_id: int = 0,
        lora: object = None,
        multimodal: Any = None,
        must_load: str = "",
    ) -> None:
        _check_args(request_id, prompt_token_ids, max_tokens, min_tokens, client, cache_salt, lora_id, lora)
        self.request_id = request_id
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self._init_feature_records(sampling_params)
        self._init_stop_rules(max_tokens, eos_token_ids, ignore_eos, stop_token_ids, min_tokens)
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        # Who sent it, widest name first (e.g. ("host:10.0.0.5", "conn:51234"); the server sets it,
        # engine/server/client_identity.py): the scheduler shares slots and tokens fairly among clients
        # (scheduler/fairness.py). The n samples of one request share their parent's. (): anonymous (offline use).
        self.client = client
        self._init_progress()
        self._init_kv_keys(cache_salt, lora_id, lora, multimodal, must_load)

    def _init_feature_records(self, sampling_params: Optional[SamplingOptions]) -> None:
        """What the request's optional outputs gather while its steps run (prompt logprobs, routed experts)."""
        # Prompt logprobs asked: every prompt token is computed (no prefix-cache or KV-load hit), and what the steps
        # score gathers here by prompt position until the first output carries it (scheduler/step_output.py).
        self.prompt_logprobs: dict[int, TokenLogprobs] | None = (
            {} if sampling_params is not None and getattr(sampling_params, "prompt_logprobs", None) is not None
            else None)
        self.prompt_logprobs_sent = False
        # Routed experts asked (SamplingParams.return_routed_experts): the steps' rows not yet handed to an output.
        self.routed_pending: list | None = (
            [] if sampling_params is not None and getattr(sampling_params, "return_routed_experts", False) else None)
        # Every prompt token computed by this request's own steps: no prefix-cache or KV-load hit (prompt logprobs
        # and routed experts come from the forward, not from KV another request computed).
        self.computes_whole_prompt = self.prompt_logprobs is not None or self.routed_pending is not None

    def _init_stop_rules(self, max_tokens: int | None, eos_token_ids: Iterable[int], ignore_eos: bool,
                         stop_token_ids: Iterable[int], min_tokens: int) -> None:
        """What ends the request: its length limit, EOS and stop ids (as the scheduler's fast checks read them)."""
        self.max_tokens = max_tokens
        self.eos_token_ids: frozenset[int] = frozenset(eos_token_ids)
        self.ignore_eos = ignore_eos
        self.stop_token_ids: frozenset[int] = frozenset(stop_token_ids)
        self.min_tokens = min_tokens
        # The output count at which a length rule may end the request (max_tokens), for the scheduler's fast
        # check; EOS and stop ids are checked by value.
        self.output_limit = max_tokens if max_tokens is not None else 1 << 62
        # Token ids that may end the request by value (EOS unless ignored, stop ids), as one set: the
        # scheduler's decode loop tests each sampled token once; `_check_stop` applies the full rules.
        self.stop_check_ids: frozenset[int] = self.stop_token_ids | (frozenset() if ignore_eos else self.eos_token_ids)

    def _init_progress(self) -> None:
        """Where the request stands: its tokens so far, its state and counters, its drafts and block hashes."""
        self.output_token_ids: list[int] = []
        # Prompt followed by output tokens, kept as one list and appended to, so that reading it every step
        # costs nothing (a `prompt + output` property would copy). A plain attribute, not a property: the
        # scheduler's per-request decode loops read it several times a step. Shared list: do not mutate.
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        # Tokens sampled by steps still in flight (an overlapped loop schedules step N+1 before step N's token
        # comes back): scheduled past, not yet appended. The next step computes the position after the last
        # known token; the worker takes that token from the device. 0 whenever the loop is serial.
        self.num_output_placeholders = 0
        self.stop_reason: int | None = None  # the stop token id; None for EOS / length
        self.num_cached_tokens = 0  # prefix-cache hit tokens at the first schedule
        self.num_preemptions = 0
        # When a step first computed it (time.monotonic(); None before): vLLM's queue / prefill / inference times.
        self.first_scheduled_time: float | None = None
        self.num_requeues = 0  # taken over from a lost rank and recomputed (elastic EP: Scheduler.requeue)
        # Speculative decoding: the draft tokens the worker proposed after the last step, verified by the next
        # step that schedules this request (scheduler/spec_decode.py); empty without a drafter.
        self.spec_token_ids: list[int] = []
        # Its drafts' record (scheduler/draft_control.py): moving averages of drafts accepted and drafts tried per
        # verify step (their ratio estimates one draft's acceptance; taken from its client's record when its first
        # drafts come, 1/1 for a client not seen yet), and, while that is too low to draft, the steps to wait
        # before one draft is tried again and the current wait.
        self.draft_new = True
        self.draft_accepted = 1.0
        self.draft_tried = 1.0
        self.draft_probe_wait = 0
        self.draft_probe_interval = 0
        # Chain hashes of the full blocks of all_token_ids, extended lazily by
        # the KV cache manager. Tokens are only ever appended, so a hash once
        # computed stays valid, preemptions included.
        self.block_hashes: list[bytes] = []

    def _init_kv_keys(self, cache_salt: bytes, lora_id: int, lora: object, multimodal: Any, must_load: str) -> None:
        """What its KV depends on besides the token ids (the salt, the adapter, the images), and whether it may only
        load its prompt's KV. Checked by _check_args."""
        # What the KV depends on besides the token ids, as tagged parts (b"lora:<name>", the images' hashes, a
        # tenant's salt): the block hash chain starts from a root of its own (block_pool.root_block_hash), so KV
        # is shared only between requests with the same salt. Set before the first schedule; never changes.
        self.cache_salt = cache_salt
        self.cache_root: bytes = root_block_hash(cache_salt)
        # Its LoRA adapter: the id the scheduler counts against max_loras (0: the base model), and the engine's
        # adapter (a LoRARequest) carried to the ranks, not read here.
        self.lora_id, self.lora = lora_id, lora
        # Carried to the worker, not read here: the request's processed images (engine/multimodal/inputs.py); None
        # for text. Its image hashes are in cache_salt.
        self.multimodal = multimodal
        # Non-empty: why this request cannot be computed here, only its prompt's KV loaded (a decode request whose
        # images came without pixels: docs/multimodal.md). What would recompute its prompt (a failed load, a
        # preemption, a requeue) ends it with finish_reason "error" and this reason instead; after a load it
        # computes only its last prompt token and its outputs.
        self.must_load = must_load

    @classmethod
    def from_sampling_params(
        cls,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingOptions,
        eos_token_ids: Iterable[int] = frozenset(),
        arrival_time: float | None = None,
        client: tuple[str, ...] = (),
        cache_salt: bytes = b"",
    ) -> "Request":
        """Build from an engine `SamplingParams` (typed by the SamplingOptions Protocol, so the scheduler does not
        import the engine)."""
        sp = sampling_params
        return cls(
            request_id, prompt_token_ids, sp,
            max_tokens=sp.max_tokens,
            eos_token_ids=eos_token_ids,
            ignore_eos=sp.ignore_eos,
            stop_token_ids=sp.stop_token_ids or (),
            min_tokens=sp.min_tokens,
            arrival_time=arrival_time,
            client=client,
            cache_salt=cache_salt,
        )

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, outputs={self.num_output_tokens})")


def _check_args(request_id, prompt_token_ids, max_tokens, min_tokens, client, cache_salt, lora_id, lora) -> None:
    """Refuse a request the scheduler could not run (each error names the argument and what is allowed)."""
    if not isinstance(request_id, str) or not request_id:
        raise ValueError(f"Request.request_id={request_id!r} is invalid: must be a non-empty string.")
    if len(prompt_token_ids) == 0:
        raise ValueError(f"Request.prompt_token_ids of {request_id!r} is invalid: must hold at least one token.")
    if max_tokens is not None and not (isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens >= 1):
        raise ValueError(f"Request.max_tokens={max_tokens!r} is invalid: must be an integer >= 1 or None.")
    if not (isinstance(min_tokens, int) and min_tokens >= 0):
        raise ValueError(f"Request.min_tokens={min_tokens!r} is invalid: must be an integer >= 0.")
    if not (isinstance(client, tuple) and all(isinstance(c, str) for c in client)):
        raise ValueError(f"Request.client={client!r} is invalid: must be a tuple of strings (() for anonymous).")
    if not isinstance(cache_salt, bytes):
        raise ValueError(f"Request.cache_salt={cache_salt!r} is invalid: must be bytes (b'' for none).")
    if not (isinstance(lora_id, int) and lora_id >= 0) or (lora_id == 0) != (lora is None):
        raise ValueError(f"Request.lora_id={lora_id!r} is invalid: an integer >= 1 with its adapter, 0 without.")

