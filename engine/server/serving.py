"""What both gRPC services share: prompt checks, admission, running a request (n samples), status codes.

`Serving.prepare` tokenizes and validates a request once, whatever its number
of samples, refusing text that cannot fit before tokenizing it and doing the
work for large inputs on a worker thread, so the event loop (every other
stream, health checks) keeps moving. `Serving.run` is the one place a request
meets the engine: it validates before admitting (a rejected request never
holds a queue slot or a KV block), admits against the queue limits, and
streams `(sample_index, RequestOutput)`.
Whoever iterates it must close it (`contextlib.aclosing`): closing, like a
cancelled RPC, aborts every sample still running, so its blocks are freed
within one engine step.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import AsyncIterator, NoReturn, Optional

import grpc

from ..api.async_engine import AsyncEngine, EngineDeadError
from ..core.grammar_compile import GrammarQueueFull
from ..core.llm_engine import ProcessedRequest, too_long
from ..core.no_tokenizer import NoTokenizer
from ..core.outputs import Logprob, OutputKind, RequestOutput
from ..core.prompt_bound import NoBound, bytes_per_token
from ..rl.errors import ControlDisabled, NotServing
from ..contract.lora import LoRARequest
from ..contract.safe_text import MAX_MESSAGE_CHARS, shown
from ..multimodal.spec import multimodal_architecture
from ..contract.sampling_params import SamplingParams
from ..contract.structured_output_params import StructuredOutputParams
from .client_identity import client_of
from .config import ServerConfig
from .gateway.hangups import Abandoned, Hangups, relay_of
from .gateway.options import model_alias_refusal
from .limits import OTHER_FIELD_MAX_BYTES
from .lora_names import ServedAdapters
from .registry import Draining, DuplicateRequest, Overloaded, RequestRegistry

logger = logging.getLogger(__name__)

# Up to this size a prompt is tokenized / validated on the event loop (well under a millisecond);
# beyond it on a worker thread.
INLINE_MAX_CHARS = 2048
INLINE_MAX_IDS = 4096

# With videos on, mm_inputs has no budget of its own: --max-message-size (the receive limit) bounds it.
VIDEO_FIELD_BYTES = 1 << 40


class Serving:
    """The engine plus the server-side state both services read and write."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig):
        self.engine = engine
        self.config = config
        # Model, limits, KV block shape, ranks, EOS ids, device: fixed once the engine has started.
        self.info = engine.info
        self.model = self.info.model
        self.tokenizer = engine.tokenizer
        self.limits = config.limits
        self.registry = RequestRegistry(config.max_queued_requests, config.max_queued_tokens)
        # The model argument as given (a Hugging Face id, or a path as typed): vLLM's default served name and its
        # model card's `root`.
        self.model_arg = self.model.model_id or self.model.model
        # The names clients may send as "model", the first reported (vLLM's --served-model-name, else the model
        # argument as given); /v1/models lists them.
        self.served_model_names = config.served_model_names or (self.model_arg,)
        self.served_model_name = self.served_model_names[0]
        # Every name but the first, aliases of it on the OpenAI gateway (gateway/options.py alias_args): the further
        # served names, and, accepted though not listed, the model argument as given and a directory's own name (what
        # moelink served by default before). One the gateway cannot take as an alias (model_alias_refusal): left out.
        implicit = (self.model_arg,) + (() if self.model.model_id else (Path(self.model.model).name,))
        self.model_aliases = tuple(n for n in dict.fromkeys(self.served_model_names[1:] + implicit)
                                   if n and n != self.served_model_name and model_alias_refusal(n) is None)
        self.model_path = str(Path(self.model.model).resolve())
        self.start_time = time.time()
        # Engine ids are the client's id plus a per-admission number, never the bare client id: a retry
        # that reuses the id of a request just cancelled (whose abort the engine has not applied yet)
        # must not receive that request's late outputs, and client ids like "x#0" must not collide
        # with the sample ids of a request "x" with n > 1.
        self._admissions = itertools.count()
        # Requests being prepared (their grammar may be compiling), and HTTP clients that hung up (hangups.py).
        self.hangups = Hangups()
        # vLLM's Prometheus series (engine/core/vllm_metrics.py), when the server serves metrics: set by server.py.
        self.vllm_metrics = None
        self.bytes_per_token, self.max_prompt_bytes = self._prompt_byte_bound()
        # LoRA adapters by name (--lora-modules, then /v1/load_lora_adapter): checked here, before the server
        # binds, so a bad one stops the start naming it (lora_names.py).
        self.adapters = ServedAdapters(getattr(getattr(engine, "engine", None), "lora_checker", None),
                                       self.served_model_names + self.model_aliases)
        for module in config.lora_modules:
            if module.base_model_name is not None and module.base_model_name not in self.served_model_names + \
                    self.model_aliases:
                raise ValueError(f"lora_modules base_model_name={module.base_model_name!r} (adapter "
                                 f"{module.name!r}) is invalid: this server serves "
                                 f"{', '.join(map(repr, self.served_model_names))}.")
            self.adapters.add(module.name, module.path, "lora_modules name")

    # -- facts (`self.info`) and live numbers ----------------------------------
    def stats(self):
        return self.engine.stats()

    def rank_stats(self) -> list:
        return self.engine.rank_stats()

    @property
    def healthy(self) -> bool:
        return self.engine.is_healthy

    # -- inputs ---------------------------------------------------------------
    @property
    def mm_bytes(self) -> int:
        """The wire budget of VllmEngine's mm_inputs (preprocessed images; with extra_mm_inputs, a video batch):
        twice the float32 pixel values of limit_mm_per_prompt images of mm_max_pixels each (the processor's temporal
        patch doubles each pixel's three channels), plus an ordinary field's bytes for the grids and framing, so that
        a request just past its limits is parsed and refused naming the limit (engine/multimodal/preprocessed.py),
        and a far larger one refused unparsed; 0 when this engine takes no images. With videos on, the message cap
        alone: a video's frames are bounded by its placeholder tokens (within max_model_len), far past any cap. The
        server caps it at --max-message-size."""
        if self.engine.image_token_id is None:
            return 0
        if self.engine.video_token_id is not None:
            return VIDEO_FIELD_BYTES
        mm = self.engine.multimodal_config
        return 2 * mm.images * mm.max_pixels * 3 * 2 * 4 + OTHER_FIELD_MAX_BYTES

    def text_only_reason(self) -> str:
        """Why images, audio or video are refused: what this server runs of the checkpoint."""
        if self.model.text_weights_prefix and multimodal_architecture(self.model.model) is None:
            # a multimodal checkpoint served as its text model (GLM-5.3-Flash; a Qwen3.5-MoE saved without its processor)
            return (f"this server runs the text model of {self.model.name} ({self.model.architecture}); its vision "
                    "tower is not loaded, so only text and token ids are accepted.")
        if self.model.text_weights_prefix:  # a multimodal checkpoint with its processor (Qwen3.5-MoE, Kimi K2.5)
            return (f"{self.model.name} ({self.model.architecture}) takes images as VllmEngine's preprocessed mm_inputs "
                    "(smg's gateway sends them for image_url parts) and through the Python API (multi_modal_data), "
                    "while its images are on (limit_mm_per_prompt), and videos as the processor's outputs where "
                    "limit_mm_per_prompt video is above 0; media_refs are not built (docs/multimodal.md).")
        return "this model takes text only."

    def _prompt_byte_bound(self) -> tuple[Optional[float], Optional[int]]:
        """(most bytes one token stands for, most bytes a text prompt that fits can have); None: no bound."""
        if isinstance(self.tokenizer, NoTokenizer):  # text prompts are refused whole (engine/core/no_tokenizer.py)
            return None, None
        try:
            bpt = bytes_per_token(self.tokenizer.backend.to_str())
        except NoBound as exc:
            logger.warning("text prompts are not refused by size before tokenizing: %s", exc)
            return None, None
        return bpt, int((self.info.max_model_len - 1) * bpt)

    def text_refusal(self, field: str, num_bytes: int) -> Optional[str]:
        """Why a text prompt of (at least) `num_bytes` bytes cannot fit max_model_len, or None if it may."""
        bound = self.max_prompt_bytes
        if bound is None or num_bytes <= bound:
            return None
        return (f"{field} is too long: it has more than {bound} bytes, and one token of this model's tokenizer "
                f"stands for at most {self.bytes_per_token:g} bytes, so it cannot fit in the "
                f"{self.info.max_model_len - 1} prompt tokens max_model_len={self.info.max_model_len} leaves.")

    def ids_refusal(self, field: str, num_ids: int) -> Optional[str]:
        """Why a prompt of at least `num_ids` token ids cannot fit max_model_len, or None if it may."""
        if num_ids < self.info.max_model_len:
            return None
        return (f"{field} has at least {num_ids} tokens, too long: max_model_len={self.info.max_model_len} leaves room "
                f"for at most {self.info.max_model_len - 1} prompt tokens.")

    def client_of(self, context) -> tuple[str, ...]:
        """Who sent the call `context` (engine/server/client_identity.py): a name the caller gives is trusted only
        when the server requires an API key."""
        return client_of(context, authenticated=bool(self.config.api_key))

    def request_id(self, given: str) -> str:
        if not given:
            return f"req-{uuid.uuid4().hex}"
        self.limits.check("max_request_id_chars", len(given))
        return given

    def adapter(self, name: str, field: str) -> LoRARequest:
        """The LoRARequest served as `name`; ValueError naming `field` when none is."""
        request = self.adapters.get(name)
        if request is None:
            served = [a.lora_name for a in self.adapters.served()]
            raise ValueError(f"{field}={shown(name)} is invalid: no LoRA adapter of that name is served "
                             + (f"(served: {', '.join(map(repr, served))})." if served else
                                "(none is)." if self.adapters.enabled else
                                "(start the server with --enable-lora to serve adapters)."))
        return request

    async def prepare(self, request_id: str, prompt, params: SamplingParams, field: str,
                      keep: Optional[int] = None, lora: Optional[LoRARequest] = None,
                      scope: str = "") -> ProcessedRequest:
        """Tokenize (text) and validate a request, once; ValueError names `field` (the proto field).

        `prompt`: text, or token ids (a list or a proto repeated field). `keep`: keep only the last
        `keep` tokens (the VllmEngine protocol's truncate_prompt_tokens); `lora`: the request's adapter; `scope`:
        whose namespace `request_id` is in (registry.RequestKey: "" for the gRPC services). Raises Abandoned when
        the client hung up (through the managed gateway) or an Abort named the request meanwhile.
        """
        with self.hangups.watch(request_id, scope) as watch:
            processed = await self._prepare(request_id, prompt, params, field, keep, lora)
            watch.check()  # it may have left while a long prompt was tokenized on a thread
            if processed.params.structured_outputs is None or processed.grammar is not None:
                return processed
            # The grammar compiles in the engine's compile processes; awaited here, so it holds no thread
            # (tokenizing never waits behind a compile), and a client that leaves (a cancelled RPC, an HTTP
            # hang-up, an Abort) ends this wait and releases the compile: dropped from the queue, or killed.
            return await watch.unless_left(self.engine.with_grammar(processed))

    async def _prepare(self, request_id: str, prompt, params: SamplingParams, field: str,
                       keep: Optional[int], lora: Optional[LoRARequest] = None) -> ProcessedRequest:
        if isinstance(prompt, dict):  # token ids with images (vllm_engine.py's mm_inputs): checked on a thread
            return await asyncio.to_thread(self.engine.process_inputs, request_id, prompt, params, field,
                                           compile_grammar=False, lora_request=lora)
        if isinstance(prompt, str):
            ids = await self._tokenize(prompt, field, keep)
        else:
            kept = len(prompt) if keep is None else min(len(prompt), keep)
            if kept >= self.info.max_model_len:
                # Refused on its length alone (truncated or not): not one of a 5M-id list's entries is looked at
                # or copied.
                raise too_long(field, kept, self.info.max_model_len)
            ids = list(prompt if keep is None else prompt[-keep:])
        process = self.engine.process_inputs
        if len(ids) <= INLINE_MAX_IDS:
            processed = process(request_id, ids, params, field, compile_grammar=False, lora_request=lora)
        else:
            processed = await asyncio.to_thread(process, request_id, ids, params, field, compile_grammar=False,
                                                lora_request=lora)
        return processed

    async def _tokenize(self, text: str, field: str, keep: Optional[int]) -> list[int]:
        if not text:
            raise ValueError(f"{field} is empty: give at least one character or token id.")
        bound = self.max_prompt_bytes
        # len(text) counts characters, each 1 to 4 bytes: encode only when the count alone cannot decide.
        if bound is not None and (len(text) > bound or (4 * len(text) > bound and len(text.encode()) > bound)):
            if keep is None:
                raise ValueError(self.text_refusal(field, max(len(text), bound + 1)))
            # Only the last `keep` <= max_model_len - 1 tokens stay, and 2 * bound bytes of text are at least
            # twice that many tokens: tokenizing this tail gives them (the cut is far before them).
            text = text[-2 * bound:]
        if len(text) <= INLINE_MAX_CHARS:
            ids = self.tokenizer.encode(text)
        else:
            ids = await asyncio.to_thread(self.tokenizer.encode_without_gil, text)
        return ids if keep is None else ids[-keep:]

    # -- running --------------------------------------------------------------
    async def run(self, request_id: str, prompt: ProcessedRequest | list[int], params: SamplingParams | None = None,
                  n: int = 1, client: tuple[str, ...] = (),
                  scope: str = "") -> AsyncIterator[tuple[int, RequestOutput]]:
        """Admit and stream one request's `n` samples as deltas; raises before yielding anything if refused.

        `prompt`: what `prepare` returned (then `params` is already in it), or token ids to validate here.
        `client`: who sent it (`client_of`), which every sample carries to the scheduler's fair shares.
        `scope`: whose namespace `request_id` is in (registry.RequestKey: "" for the gRPC services, the client for
        HTTP /generate).
        Always OutputKind.DELTA, even for a caller that answers once at the end:
        the first delta is what ends a request's time in the queue.
        """
        kind = OutputKind.DELTA
        self.limits.check_n(n)
        processed = prompt if isinstance(prompt, ProcessedRequest) else \
            self.engine.process_inputs(request_id, prompt, params)
        params, prompt_ids = processed.params, processed.prompt_token_ids
        base = f"{request_id}|{next(self._admissions)}"
        # One validated request, n engine requests: only the id (and a seed) differ.
        samples = [replace(processed, request_id=base, client=client)] if n == 1 else [
            replace(processed, request_id=f"{base}#{i}", params=params.sample(i), client=client) for i in range(n)]
        if not self.engine.is_healthy:
            raise Draining(f"the engine is not running ({self.engine.dead_error}); retry on another replica.")
        try:
            entry = self.registry.admit(request_id, [p.request_id for p in samples], len(prompt_ids) * n, scope)
        except Overloaded as e:
            if self.vllm_metrics is not None:
                self.vllm_metrics.rejected(e.reason)
            raise
        t0, generated, reasons, cached = time.monotonic(), 0, [], 0
        per_sample = [0] * n  # tokens each sample generated (vLLM's request_max_num_generation_tokens)
        texts: Optional[list[list[str]]] = [[] for _ in range(n)] if self.config.enable_log_outputs else None
        logger.info("request admitted", extra={"request_id": request_id, "prompt_tokens": len(prompt_ids), "n": n})
        try:
            if n == 1:
                stream = self._one(samples[0], kind)
            else:
                stream = self._many(entry, samples, kind)
            async with contextlib.aclosing(stream):
                async for index, out in stream:
                    self.registry.mark_started(entry)
                    self.registry.record_tokens(len(out.outputs[0].token_ids))
                    generated += len(out.outputs[0].token_ids)
                    per_sample[index] += len(out.outputs[0].token_ids)
                    cached = max(cached, out.num_cached_tokens)
                    if texts is not None:
                        texts[index].append(out.outputs[0].text)
                    if out.finished:
                        reasons.append(out.outputs[0].finish_reason)
                    yield index, out
        finally:
            self.registry.release(entry)
            if self.vllm_metrics is not None and len(reasons) == n:  # every sample ended, as vLLM records them
                self.vllm_metrics.request_params(n, params.max_tokens, max(per_sample))
            # One structured line per request (with --log-format json, one JSON object).
            extra = {"request_id": request_id, "prompt_tokens": len(prompt_ids), "completion_tokens": generated,
                     # prefix-cache hits and KV loaded from a prefill server (prefill/decode disaggregation)
                     "cached_tokens": cached,
                     "finish_reason": ",".join(r or "" for r in reasons) or "cancelled",
                     "latency_s": round(time.monotonic() - t0, 4)}
            if texts is not None:
                extra["output"] = logged_output(texts, self.config.max_log_len)
            logger.info("request finished", extra=extra)

    async def _one(self, sample: ProcessedRequest, kind):
        gen = self.engine.generate_processed(sample, kind)
        async with contextlib.aclosing(gen):
            async for out in gen:
                yield 0, out

    async def _many(self, entry, samples: list[ProcessedRequest], kind):
        """Merge n sample streams; closing this closes (and so aborts) all of them."""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()
        # Each sample's outputs the consumer has not taken yet, bounded as a single stream's are (the engine's
        # backlog limit): a pump past it waits, so its own stream's queue fills and the engine stops scheduling that
        # sample (engine/api/output_thread.py Stream.backlog_limit) instead of this queue growing for ever.
        limit = getattr(self.engine, "backlog_limit", 0)
        room = [asyncio.Semaphore(limit) for _ in samples] if limit else None

        async def pump(i, sample):
            try:
                gen = self.engine.generate_processed(sample, kind)
                async with contextlib.aclosing(gen):
                    async for out in gen:
                        if room is not None:
                            await room[i].acquire()
                        queue.put_nowait((i, out))
            except Exception as exc:  # handed to the consumer, which raises it
                queue.put_nowait((i, exc))
            finally:
                queue.put_nowait((i, done))

        tasks = [asyncio.create_task(pump(i, sample)) for i, sample in enumerate(samples)]
        try:
            # Let every pump take its first step (which queues its sample in the engine), then repeat an
            # Abort that came between admission and that point: the engine drops an abort of an id it
            # has not seen yet, so without this the samples would run to the end.
            await asyncio.sleep(0)
            if entry.aborted:
                for sample in samples:
                    await self.engine.abort(sample.request_id)
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    if room is not None:
                        room[i].release()
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def abort(self, request_ids, scope: str = "") -> int:
        """Abort by client request id (every sample) in `scope` (registry.RequestKey: "" for the gRPC services);
        returns how many were running.

        Uncapped: --max-abort-ids bounds what one Abort RPC may ask (`abort_requested`), not the server's
        own drain, which aborts everything running, however many that is."""
        ids = list(request_ids)
        preparing = self.hangups.abort(ids, scope)  # not admitted yet: a grammar compile may be all they wait for
        return await self._abort_keys([(scope, rid) for rid in ids]) + preparing

    async def _abort_keys(self, keys) -> int:
        """Abort the requests `keys` (RequestKey) still in flight; returns how many were."""
        running = [key for key in keys if key in self.registry.active]
        for key in running:
            self.registry.active[key].aborted = True
        for eid in self.registry.engine_ids(running):
            await self.engine.abort(eid)
        return len(running)

    async def hung_up(self, relay_id: str) -> int:
        """The managed gateway's front lost the HTTP client of `relay_id` before its answer ended (hangups.py):
        end every request under it, those being prepared and those generating. Returns how many."""
        preparing = self.hangups.hung_up(relay_id)
        # Relay ids are smg's gRPC request ids (scope ""); an HTTP /generate id of the same spelling is another's.
        running = [key for key in self.registry.active if not key[0] and relay_of(key[1]) == relay_id]
        aborted = await self._abort_keys(running) if running else 0
        if preparing or aborted:
            logger.info("HTTP client hung up: %d request(s) of relay id %s ended (%d being prepared, %d generating)",
                        preparing + aborted, relay_id, preparing, aborted)
        return preparing + aborted

    async def abort_requested(self, request_ids) -> int:
        """An Abort RPC's ids: refused by their count before any is looked at, then `abort`."""
        self.limits.check("max_abort_ids", len(request_ids))
        return await self.abort(request_ids)

    async def abort_all(self) -> None:
        await self._abort_keys(list(self.registry.active))

    def end_all(self, reason: str = "abort") -> int:
        """End every running stream now with finish_reason `reason`, without waiting for the engine thread
        (it may be stuck in a step); the engine frees the requests when it can. Returns how many ended."""
        running = list(self.registry.active)
        for key in running:
            self.registry.active[key].aborted = True
        return self.engine.end_streams(self.registry.engine_ids(running), reason)


# -- errors --------------------------------------------------------------------
def wire_message(msg: str) -> str:
    """An engine message with its field names as both protos spell them: SamplingParams.<field> is
    sampling_params.<field>; structured outputs are the proto's `constraint` oneof (json is json_schema)."""
    return (msg.replace("SamplingParams.structured_outputs.json=", "sampling_params.json_schema=")
            .replace("SamplingParams.structured_outputs.", "sampling_params.")
            .replace("SamplingParams.", "sampling_params."))


def structured_from_proto(sp) -> StructuredOutputParams | None:
    """The `constraint` oneof of a SamplingParams message (moelink.v1 and vllm.grpc.engine spell it the
    same way), or None when unset."""
    which = sp.WhichOneof("constraint")
    if which is None:
        return None
    if which == "choice":
        return StructuredOutputParams(choice=list(sp.choice.choices))
    if which == "json_schema":
        return StructuredOutputParams(json=sp.json_schema)
    if which == "json_object":
        return StructuredOutputParams(json_object=sp.json_object)
    if which in ("regex", "grammar", "structural_tag"):
        return StructuredOutputParams(**{which: getattr(sp, which)})
    raise ValueError(f"sampling_params.{which} is not supported: moelink serves json_schema, json_object, regex, "
                     f"grammar, choice and structural_tag.")


def logged_output(texts: list[list[str]], max_chars: Optional[int]) -> str:
    """The output a "request finished" line carries under --enable-log-outputs (vLLM's "Generated response ...:
    output: ..." line, which it writes with --enable-log-requests): one sample's text, or n samples' as a JSON list,
    at most `max_chars` characters of each (--max-log-len, vLLM's cut; None: whole, up to the log's own bound)."""
    whole = ["".join(t)[:max_chars] if max_chars is not None else "".join(t) for t in texts]
    return whole[0] if len(whole) == 1 else json.dumps(whole, ensure_ascii=False)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status a request failure maps to (one sentence for the user)."""
    if isinstance(exc, ControlDisabled):  # the server's flag, not the call's arguments
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, wire_message(str(exc))
    if isinstance(exc, Abandoned):
        return grpc.StatusCode.CANCELLED, f"{exc}."
    if isinstance(exc, (Overloaded, GrammarQueueFull)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, DuplicateRequest):
        return grpc.StatusCode.ALREADY_EXISTS, str(exc)
    if isinstance(exc, Draining):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, NotServing):  # asleep, or weights incomplete: another replica, or later
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, EngineDeadError):
        return grpc.StatusCode.UNAVAILABLE, f"{exc}; retry on another replica."
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


async def abort_rpc(context: grpc.aio.ServicerContext, exc: BaseException, what: str) -> NoReturn:
    code, message = status_for(exc)
    # Messages quote client values (each already cut by `shown`); this bounds whatever else got in.
    message = shown(message, MAX_MESSAGE_CHARS, quote=False)
    if code is grpc.StatusCode.INTERNAL:
        logger.error("%s failed", what, exc_info=exc)
    else:
        logger.info("%s refused: %s %s", what, code.name, message)
    await context.abort(code, message)
    raise AssertionError("unreachable: ServicerContext.abort raises")



def optional(msg, field: str, default=None):
    """The value of a proto3 `optional` field, or `default` when it is unset."""
    return getattr(msg, field) if msg.HasField(field) else default


# A logprob as the fronts send it: a token the grammar forbids has -inf, which JSON cannot carry; vLLM's OpenAI
# server sends max(logprob, -9999.0) for it, and so do moelink's wires (the Python API keeps -inf).
MIN_WIRE_LOGPROB = -9999.0


def wire_logprob(logprob: float) -> float:
    return max(logprob, MIN_WIRE_LOGPROB)


def top_logprobs(entry: dict[int, Logprob], n: Optional[int]) -> list[tuple[int, Logprob]]:
    """The n most likely (token_id, Logprob) of one position, by rank (the sampled token may be outside)."""
    if not n:
        return []
    return sorted(((tid, lp) for tid, lp in entry.items() if lp.rank <= n), key=lambda kv: kv[1].rank)[:n]
