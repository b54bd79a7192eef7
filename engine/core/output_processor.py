r"""Turns the scheduler's token outputs into RequestOutputs: detokenize, stop strings, logprobs.

Incremental detokenization: token ids in, text deltas out, stop strings cut.

Decoding the whole output every step costs O(n) per token (O(n^2) per
request); instead, as in vLLM, we decode only a short window of trailing tokens:

    ids:  ... | prefix_offset ........ read_offset ........ end |
                \___ prefix_text ___/
                \______________ new_text _________________/

`prefix_text` was already emitted; the delta is `new_text[len(prefix_text):]`.
Decoding both from the same `prefix_offset` keeps context-dependent decoders
(SentencePiece's leading-space rule) consistent. A byte-level BPE token can end
inside a multi-byte UTF-8 character; the decoder then yields U+FFFD, so such a
window is held back until a later token completes the character.

With a `tokenizers` tokenizer the same window runs in Rust (`DecodeStream`, as vLLM's fast incremental
detokenizer does: one call per token instead of two decodes and the list slicing in Python, decode_stream.py);
the Python window above serves every other tokenizer, and takes over a stream the Rust one refuses.
"""
from __future__ import annotations

import numpy as np

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

from moelink.scheduler.outputs import TokenLogprobs

from .outputs import CompletionOutput, Logprob, OutputKind, RequestOutput, WeightVersionSpan
from ..contract.sampling_params import SamplingParams
from .decode_stream import StreamDecoder, stream_decoder
from .tokenizer import Tokenizer


# How many prompt tokens seed the first window (vLLM uses the same number):
# enough context for leading-space rules, small enough to be cheap.
_INITIAL_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text deltas for one request.

    `update(new_ids)` returns the text that became final with those ids;
    `flush()` returns whatever was still held back once generation ends. Once
    a stop string matched, `stop_reason` holds it and later calls return "".
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
        deferred: bool = False,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        if isinstance(stop, str):
            stop = [stop]
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop={list(stop)!r} is invalid: stop strings must be non-empty strings.")
        if deferred and stop:
            raise ValueError("IncrementalDetokenizer(deferred=True) is invalid with stop strings: their search needs "
                             "the text as it grows.")
        # Deferred: no text until flush(), which decodes the whole output once (a request whose output is seen
        # only when it ends and that no stop string can end: LLM.generate's common case). Per token it is then a
        # list append instead of a decode step.
        self.deferred = deferred
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        # As in vLLM, stop strings (like EOS and stop ids) do not end a request
        # before min_tokens tokens: only text decoded after them is searched.
        self.min_tokens = min_tokens
        self.stop_reason: Optional[str] = None
        self.output_token_ids: list[int] = []
        # A suffix shorter than the longest stop string may still grow into one.
        self._max_stop_len = max((len(s) for s in self.stop), default=0)

        context = list(prompt_token_ids[-_INITIAL_CONTEXT_TOKENS:])
        # A prompt ending inside a UTF-8 character would make our first
        # deltas depend on the prompt's bytes; start without context then.
        if context and self._decode(context).endswith(_REPLACEMENT_CHAR):
            context = []
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._text = ""          # decoded output text (cut at a stop string once one matched)
        self._emitted_len = 0    # how much of _text the caller has received
        self._context = context
        # The Rust window (decode_stream.py) where the tokenizer has one; None: the Python window below.
        self._stream: StreamDecoder | None = None if deferred else stream_decoder(
            tokenizer, skip_special_tokens, context, spaces_between_special_tokens)

    @property
    def output_text(self) -> str:
        """All output text decoded so far, including text still held back."""
        return self._text

    @property
    def finished(self) -> bool:
        return self.stop_reason is not None

    def update(self, new_token_ids: Sequence[int]) -> str:
        """Append generated ids; return the new text that is safe to show."""
        if self.stop_reason is not None:
            return ""
        self.output_token_ids.extend(new_token_ids)
        if self.deferred:
            return ""
        if self._stream is not None:
            delta = self._stream.step(new_token_ids)
            if delta is not None:
                self._text += delta
                if not self.stop:  # nothing to hold back or search: the delta is final (the common case)
                    self._emitted_len = len(self._text)
                    return delta
                return self._release(final=False)
            self._leave_stream()  # refused: the Python window takes the stream over, these ids in it already
        else:
            self._ids.extend(new_token_ids)
        self._text += self._decode_window(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """End of generation: return text held back for UTF-8 or stop-string reasons."""
        if self.stop_reason is not None:
            return ""
        if self.deferred:
            self._text = self._whole_text()
            return self._release(final=True)
        if self._stream is not None:  # the bytes of an unfinished character, and any text still held
            full = self._whole_text()
            if full.startswith(self._text):
                self._text = full
            return self._release(final=True)
        self._text += self._decode_window(final=True)
        return self._release(final=True)

    def _whole_text(self) -> str:
        """The output's text as the windows render it: decoded after the prompt context, that context's own text
        cut off (SentencePiece's leading space of the first output token kept)."""
        if not self._context:
            return self._decode(self.output_token_ids)
        return self._decode(self._context + self.output_token_ids)[len(self._decode(self._context)):]

    def _leave_stream(self) -> None:
        """Hand the stream to the Python window (rare: ids no tokenizer would produce), once, in O(output): the
        window's read offset goes where the text decoded so far ends (the fewest output tokens whose text it is;
        the Rust window holds back only an unfinished character's few), so its next delta is the rest."""
        self._stream = None
        ctx, out = self._context, self.output_token_ids
        base = len(self._decode(ctx))
        k = len(out)
        while k > 0 and self._decode(ctx + out[:k])[base:] != self._text:
            k -= 1
        self._ids = ctx + out
        self._prefix_offset, self._read_offset = 0, len(ctx) + k

    # ---- internals -------------------------------------------------------

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_window(self, final: bool) -> str:
        if len(self._ids) == self._read_offset:
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        # Equal length: the new ids were skipped specials (nothing to show yet).
        # Trailing U+FFFD: a character is still incomplete; wait for its bytes.
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_REPLACEMENT_CHAR) and not final):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        # Drop ids before the window so memory stays bounded on long outputs.
        if self._prefix_offset > 0:
            del self._ids[:self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return new_text[len(prefix_text):]

    def _release(self, final: bool) -> str:
        start = self._emitted_len
        if self.stop and len(self.output_token_ids) > self.min_tokens:
            match = self._find_stop(start)
            if match is not None:
                pos, stop_str = match
                end = pos + len(stop_str) if self.include_stop_str_in_output else pos
                self.stop_reason = stop_str
                self._text = self._text[:end]
                self._emitted_len = end
                return self._text[start:end]
        end = len(self._text) if final else len(self._text) - self._held_suffix_len()
        end = max(end, start)
        self._emitted_len = end
        return self._text[start:end]

    def _find_stop(self, start: int) -> Optional[tuple[int, str]]:
        # Text before `start` was released, so no stop string can begin there:
        # any stop string's start stayed in the held-back suffix until now.
        best: Optional[tuple[int, str]] = None
        for s in self.stop:
            pos = self._text.find(s, start)
            if pos < 0:
                continue
            # Earliest match wins; at the same position the longer string.
            if best is None or pos < best[0] or (pos == best[0] and len(s) > len(best[1])):
                best = (pos, s)
        return best

    def _held_suffix_len(self) -> int:
        # Longest tail of the text that is a proper prefix of some stop
        # string; holding exactly that (not always max_len - 1 characters)
        # keeps streaming latency low while never releasing a stop's start.
        text = self._text
        for k in range(min(self._max_stop_len - 1, len(text) - self._emitted_len), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0


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
    # SamplingParams.prompt_logprobs: [None, then one entry per prompt token after the first], once the scheduler's
    # first output brought them; `prompt_logprobs_new` until a delta output has carried them.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    prompt_logprobs_new: bool = False
    # SamplingParams.return_routed_experts: the steps' rows so far (scheduler/outputs.RoutedExperts), made into
    # CompletionOutput.routed_experts when the request finishes; None when not asked.
    routed: list | None = None
    num_cached_tokens: int = 0
    # The weight versions its outputs came from, oldest first (RequestOutput.weight_version / weight_versions).
    versions: list = field(default_factory=list)
    # Where each labelled version's output tokens begin, (version, index): CompletionOutput.weight_versions' spans.
    version_starts: list = field(default_factory=list)
    first_token_time: float | None = None
    # Text emitted so far (for cumulative outputs); deltas are tracked by the detokenizer.
    text: str = ""
    # OutputProcessor.add_request: an unfinished output of this request is only its tokens, counted (no output).
    quiet: bool = False
    # RequestOutput.metrics: one dict per request, made again only when first_token_time is set (every output
    # of a request shares it; readers treat it as read-only).
    metrics: dict = field(init=False)

    def __post_init__(self) -> None:
        self._make_metrics()

    def _make_metrics(self) -> None:
        # A finished request's last output adds "scheduled_time" and "num_preemptions" (the scheduler's; absent when
        # a stop string or an abort ended it), vLLM's queue / prefill / inference phases.
        self.metrics = {"arrival_time": self.arrival_time, "first_token_time": self.first_token_time,
                        "output_kind": self.output_kind.value}


class OutputProcessor:
    """Keeps per-request detokenizers; returns outputs and the ids a stop string finished."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, output_kind: OutputKind) -> None:
        final_only = output_kind is OutputKind.FINAL_ONLY
        detok = IncrementalDetokenizer(
            self.tokenizer, prompt_token_ids, params.skip_special_tokens, params.stop, params.include_stop_str_in_output,
            min_tokens=params.min_tokens,
            # the whole decode at the end knows no spaces_between_special_tokens=False (the Rust window's rule)
            deferred=final_only and not params.stop and (params.skip_special_tokens
                                                         or params.spaces_between_special_tokens),
            spaces_between_special_tokens=params.spaces_between_special_tokens,
        ) if params.detokenize else None
        st = RequestState(request_id, prompt, prompt_token_ids, params, output_kind, detok)
        # Nothing to compute for its unfinished outputs: seen only when it ends, no text to grow (none, or decoded
        # whole at the end), no logprob entries to make.
        st.quiet = final_only and (detok is None or detok.deferred) and params.logprobs is None
        if params.logprobs is not None:
            st.logprobs, st.cumulative_logprob = [], 0.0
        if params.return_routed_experts:
            st.routed = []
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
            versions = st.versions
            if co.earlier_weight_versions is not None or not versions or versions[-1] != co.weight_version:
                _note_versions(st, co)  # a version it has not seen (this check is _note_versions' common no-op)
            if st.quiet and co.finish_reason is None and co.prompt_logprobs is None and co.routed_experts is None:
                if st.detok is not None:
                    st.detok.update(new_ids)  # deferred: the ids kept for the one decode at the end
                continue
            if co.routed_experts is not None and st.routed is not None:
                st.routed.extend(co.routed_experts)
            if st.detok is None and co.finish_reason is None and st.logprobs is None and co.prompt_logprobs is None:
                # Token ids only, not finished: nothing to detokenize or check (a stream's common step).
                if st.output_kind is final_only:
                    continue  # nothing to deliver until it finishes (LLM.generate's token-id requests)
                if st.output_kind is delta_kind:
                    if not new_ids:
                        continue
                    comp = CompletionOutput(0, "", new_ids, None, None)
                else:
                    comp = CompletionOutput(0, st.text, list(st.token_ids), None, None)
                results.append(_versioned(RequestOutput(st.request_id, st.prompt, st.prompt_token_ids, [comp], False,
                                                        st.num_cached_tokens, st.metrics), st))
                continue
            for lp in co.new_logprobs or []:
                self._add_logprobs(st, lp)
            if co.prompt_logprobs is not None:
                scored: list[dict[int, Logprob] | None] = [None]  # the first prompt token has none
                scored += [self._entry(st, lp) if lp is not None else None for lp in co.prompt_logprobs]
                st.prompt_logprobs = scored
                st.prompt_logprobs_new = True
            finish_reason, stop_reason = co.finish_reason, co.stop_reason
            if co.timing is not None:  # its last output: when it was first scheduled, how often preempted
                st.metrics = {**st.metrics, "scheduled_time": co.timing[0], "num_preemptions": co.timing[1]}
            delta = ""
            if st.detok is not None:
                if finish_reason == "stop" and new_ids and not st.params.include_stop_str_in_output:
                    # The scheduler's stop (EOS or a stop token id) is the last id: vLLM leaves its text out.
                    new_text_ids = new_ids[:-1]
                else:
                    new_text_ids = new_ids
                delta = st.detok.update(new_text_ids) if new_text_ids else ""
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
        st.logprobs.append(self._entry(st, lp))
        st.cumulative_logprob += lp.logprob

    def _entry(self, st: RequestState, lp: TokenLogprobs) -> dict[int, Logprob]:
        """One position's {token id: Logprob}: the top-n, and the token itself with its rank (vLLM's)."""
        # Token texts only when the request wants text (decoded_token None otherwise, as in vLLM).
        text = (lambda tid: self.tokenizer.decode([tid], skip_special_tokens=False)) if st.detok is not None \
            else (lambda tid: None)
        # The chosen token first, then the top-n (vLLM's order, also when it is among them).
        entry = {lp.token_id: Logprob(lp.logprob, lp.rank, text(lp.token_id))}
        for rank, (tid, v) in enumerate(lp.top):
            if tid != lp.token_id:
                entry[tid] = Logprob(v, rank + 1, text(tid))
        return entry

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
        if finished and st.version_starts:
            comp.weight_versions = _version_spans(st)
        if finished and st.routed is not None and finish_reason != "abort":
            comp.routed_experts = _routed_array(st.routed, len(st.prompt_token_ids) + len(st.token_ids) - 1)
        out = _versioned(RequestOutput(st.request_id, st.prompt, st.prompt_token_ids, [comp], finished,
                                       st.num_cached_tokens, st.metrics), st)
        if st.prompt_logprobs is not None and (st.prompt_logprobs_new or st.output_kind is not OutputKind.DELTA):
            out.prompt_logprobs = st.prompt_logprobs  # a stream's first output carries them; the others every one
            st.prompt_logprobs_new = False
        return out


def _note_versions(st: RequestState, co) -> None:
    """The versions a core output's tokens (and, after an update that reached the request held, its earlier KV) came
    from, appended where they differ from the last one seen."""
    if not co.new_token_ids and co.earlier_weight_versions is None:
        return  # no tokens: no weights computed anything this output reports (an abort, a finish on a stop string)
    for v in (*(co.earlier_weight_versions or ()), co.weight_version):
        if not st.versions or st.versions[-1] != v:
            st.versions.append(v)
    # vLLM's span starts (OutputProcessor.track_weight_version): the first of these tokens is that version's; weights
    # no update labelled are vLLM's "default" (EngineCore._weight_version)
    v = "default" if co.weight_version is None else co.weight_version
    if co.new_token_ids and (not st.version_starts or st.version_starts[-1][0] != v):
        st.version_starts.append((v, len(st.token_ids) - len(co.new_token_ids)))


def _version_spans(st: RequestState) -> list[WeightVersionSpan]:
    """vLLM's CompletionOutput.weight_versions: each labelled version's [start, end) over the output tokens."""
    starts = st.version_starts
    ends = [start for _, start in starts[1:]] + [len(st.token_ids)]
    return [WeightVersionSpan(v, start, end) for (v, start), end in zip(starts, ends)]


def _versioned(out: RequestOutput, st: RequestState) -> RequestOutput:
    if st.versions:
        out.weight_version = st.versions[-1]
        if len(st.versions) > 1:
            out.weight_versions = tuple(st.versions)
    return out


def _routed_array(chunks: list, positions: int) -> np.ndarray:
    """The request's routed experts [positions, L, K] from the steps' rows in step order (a later step's rows for a
    position, after a preemption or rejected drafts, replace the earlier ones); every forwarded position is set."""
    first = chunks[0].ids_PLK
    out = np.full((positions, *first.shape[1:]), -1, dtype=max((c.ids_PLK.dtype for c in chunks),
                                                               key=lambda d: d.itemsize))
    covered = np.zeros(positions, dtype=bool)
    for c in chunks:
        end = min(c.first_position + len(c.ids_PLK), positions)
        if end > c.first_position:
            out[c.first_position: end] = c.ids_PLK[: end - c.first_position]
            covered[c.first_position: end] = True
    if not covered.all():  # a position no step reported: an engine bug, never a silent -1 row
        raise RuntimeError(f"routed experts missing for positions {np.flatnonzero(~covered)[:8].tolist()} of "
                           f"{positions}.")
    return out
