"""Turns the scheduler's token outputs into RequestOutputs: detokenize, stop strings, logprobs."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from moelink.scheduler.outputs import TokenLogprobs

from .detokenizer import IncrementalDetokenizer
from .outputs import CompletionOutput, Logprob, OutputKind, RequestOutput
from ..contract.sampling_params import SamplingParams
from .tokenizer import Tokenizer


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    output_kind: OutputKind
    detok: IncrementalDetokenizer | None  # None: detokenize=False, token ids only
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    num_cached_tokens: int = 0
    first_token_time: float | None = None
    # Text emitted so far (for cumulative outputs); deltas are tracked by the detokenizer.
    text: str = ""
    # RequestOutput.metrics: one dict per request, made again only when first_token_time is set (every output
    # of a request shares it; readers treat it as read-only).
    metrics: dict = field(init=False)

    def __post_init__(self) -> None:
        self._make_metrics()

    def _make_metrics(self) -> None:
        self.metrics = {"arrival_time": self.arrival_time, "first_token_time": self.first_token_time,
                        "output_kind": self.output_kind.value}


class OutputProcessor:
    """Keeps per-request detokenizers; returns outputs and the ids a stop string finished."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, output_kind: OutputKind) -> None:
        detok = IncrementalDetokenizer(
            self.tokenizer, prompt_token_ids, params.skip_special_tokens, params.stop, params.include_stop_str_in_output,
            min_tokens=params.min_tokens,
        ) if params.detokenize else None
        st = RequestState(request_id, prompt, prompt_token_ids, params, output_kind, detok)
        if params.logprobs is not None:
            st.logprobs, st.cumulative_logprob = [], 0.0
        self.states[request_id] = st

    def process(self, core_outputs) -> tuple[list[RequestOutput], list[str]]:
        """Returns (outputs to deliver, request ids that hit a stop string and must be finished)."""
        results: list[RequestOutput] = []
        stopped: list[str] = []
        now = time.monotonic()
        final_only, delta_kind = OutputKind.FINAL_ONLY, OutputKind.DELTA
        for co in core_outputs:
            st = self.states.get(co.request_id)
            if st is None:
                continue
            new_ids = co.new_token_ids
            if new_ids and st.first_token_time is None:
                st.first_token_time = now
                st._make_metrics()
            st.token_ids.extend(new_ids)
            st.num_cached_tokens = co.num_cached_tokens
            if st.detok is None and co.finish_reason is None and st.logprobs is None:
                # Token ids only, not finished: nothing to detokenize or check (a stream's common step).
                if st.output_kind is final_only:
                    continue  # nothing to deliver until it finishes (LLM.generate's token-id requests)
                if st.output_kind is delta_kind:
                    if not new_ids:
                        continue
                    comp = CompletionOutput(0, "", new_ids, None, None)
                else:
                    comp = CompletionOutput(0, st.text, list(st.token_ids), None, None)
                results.append(RequestOutput(st.request_id, st.prompt, st.prompt_token_ids, [comp], False,
                                             st.num_cached_tokens, st.metrics))
                continue
            for lp in co.new_logprobs or []:
                self._add_logprobs(st, lp)
            finish_reason, stop_reason = co.finish_reason, co.stop_reason
            delta = ""
            if st.detok is not None:
                delta = st.detok.update(new_ids) if new_ids else ""
                if st.detok.stop_reason is not None:
                    finish_reason, stop_reason = "stop", st.detok.stop_reason
                    if co.finish_reason is None:
                        stopped.append(co.request_id)
                if finish_reason is not None and st.detok.stop_reason is None:
                    delta += st.detok.flush()
            st.text += delta
            out = self._make_output(st, new_ids, delta, finish_reason, stop_reason)
            if out is not None:
                if co.kv_transfer_params is not None:
                    out.kv_transfer_params = co.kv_transfer_params
                results.append(out)
            if finish_reason is not None:
                del self.states[co.request_id]
        return results, stopped

    def finish(self, request_id: str, reason: str) -> RequestOutput | None:
        """End a request from outside the scheduler's outputs (abort, engine error)."""
        st = self.states.pop(request_id, None)
        if st is None:
            return None
        # Text held back (a possible stop-string prefix, a split UTF-8 character) was
        # generated all the same: the final output carries it.
        delta = st.detok.flush() if st.detok is not None and st.detok.stop_reason is None else ""
        st.text += delta
        return self._make_output(st, [], delta, reason, None, force=True)

    def _add_logprobs(self, st: RequestState, lp: TokenLogprobs) -> None:
        # Token texts only when the request wants text (decoded_token None otherwise, as in vLLM).
        text = (lambda tid: self.tokenizer.decode([tid], skip_special_tokens=False)) if st.detok is not None \
            else (lambda tid: None)
        entry = {tid: Logprob(v, rank + 1, text(tid)) for rank, (tid, v) in enumerate(lp.top)}
        entry[lp.token_id] = Logprob(lp.logprob, lp.rank, text(lp.token_id))
        st.logprobs.append(entry)
        st.cumulative_logprob += lp.logprob

    def _make_output(self, st: RequestState, new_ids, delta, finish_reason, stop_reason, force=False):
        finished = finish_reason is not None
        if st.output_kind is OutputKind.FINAL_ONLY and not finished:
            return None
        if st.output_kind is OutputKind.DELTA:
            if not (new_ids or delta or finished or force):
                return None
            n = len(new_ids)
            text, ids = delta, new_ids
            logprobs = st.logprobs[len(st.logprobs) - n:] if st.logprobs is not None and n else ([] if st.logprobs is not None else None)
        else:
            text, ids, logprobs = st.text, list(st.token_ids), st.logprobs
        comp = CompletionOutput(0, text, ids, st.cumulative_logprob, logprobs, finish_reason, stop_reason)
        return RequestOutput(st.request_id, st.prompt, st.prompt_token_ids, [comp], finished, st.num_cached_tokens,
                             st.metrics)
