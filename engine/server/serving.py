"""What both gRPC services share: prompt checks, admission, running a request (n samples), status codes.

`Serving.run` is the one place a request meets the engine. It validates
before admitting (a rejected request never holds a queue slot or a KV block),
admits against the queue limits, and streams `(sample_index, RequestOutput)`.
Whoever iterates it must close it (`contextlib.aclosing`): closing, like a
cancelled RPC, aborts every sample still running, so its blocks are freed
within one engine step.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import AsyncIterator, Optional

import grpc

from ..async_engine import AsyncEngine, EngineDeadError
from ..outputs import OutputKind, RequestOutput
from ..sampling_params import SamplingParams
from .config import ServerConfig
from .registry import Draining, DuplicateRequest, Overloaded, RequestRegistry

logger = logging.getLogger(__name__)

MAX_N = 64  # samples per request
MAX_REQUEST_ID_LEN = 256


class Serving:
    """The engine plus the server-side state both services read and write."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.model = engine.engine.config.model
        self.tokenizer = engine.tokenizer
        self.registry = RequestRegistry(config.max_queued_requests, config.max_queued_tokens)
        self.served_model_name = config.served_model_name or Path(self.model.model).name
        self.model_path = str(Path(self.model.model).resolve())
        self.start_time = time.time()
        # Engine ids are the client's id plus a per-admission number, never the bare client id: a retry
        # that reuses the id of a request just cancelled (whose abort the engine has not applied yet)
        # must not receive that request's late outputs, and client ids like "x#0" must not collide
        # with the sample ids of a request "x" with n > 1.
        self._admissions = itertools.count()

    # -- facts ----------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self.engine.engine.config.scheduler.max_model_len

    @property
    def max_num_seqs(self) -> int:
        return self.engine.engine.config.scheduler.max_num_seqs

    @property
    def block_size(self) -> int:
        return self.engine.engine.config.cache.block_size

    @property
    def expert_parallel_size(self) -> int:
        parallel = getattr(self.engine.engine.config, "parallel", None)
        return int(getattr(parallel, "expert_parallel_size", 1) or 1)

    @property
    def eos_token_ids(self) -> list[int]:
        return sorted(self.engine.engine.eos_token_ids)

    @property
    def device_name(self) -> str:
        device = self.engine.engine.config.device
        if device.type == "cuda":
            import torch

            return f"cuda ({torch.cuda.get_device_name(device)})"
        return str(device.type)

    def stats(self):
        return self.engine.stats()

    def rank_stats(self) -> list:
        per_rank = getattr(self.engine.engine, "rank_stats", None)
        return list(per_rank()) if callable(per_rank) else [self.engine.stats()]

    @property
    def healthy(self) -> bool:
        return self.engine.is_healthy

    # -- inputs ---------------------------------------------------------------
    def request_id(self, given: str) -> str:
        if not given:
            return f"req-{uuid.uuid4().hex}"
        if len(given) > MAX_REQUEST_ID_LEN:
            raise ValueError(f"request_id has {len(given)} characters: at most {MAX_REQUEST_ID_LEN} are allowed.")
        return given

    def encode(self, text: str, field: str) -> list[int]:
        if not text:
            raise ValueError(f"{field} is empty: give at least one character or token id.")
        return self.tokenizer.encode(text)

    def check_prompt_ids(self, ids: list[int], field: str) -> list[int]:
        """Raises ValueError naming `field` (the proto field the ids came from)."""
        if not ids:
            raise ValueError(f"{field} is empty: give at least one token id.")
        vocab = self.model.vocab_size
        if max(ids) >= vocab:
            i = next(i for i, t in enumerate(ids) if t >= vocab)
            raise ValueError(f"{field}[{i}]={ids[i]} is out of range: token ids must be in [0, {vocab}).")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"{field} has {len(ids)} tokens, too long: max_model_len={self.max_model_len} leaves room for at "
                f"most {self.max_model_len - 1} prompt tokens.")
        return ids

    # -- running --------------------------------------------------------------
    async def run(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                  n: int = 1) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Admit and stream one request's `n` samples as deltas; raises before yielding anything if refused.

        Always OutputKind.DELTA, even for a caller that answers once at the end:
        the first delta is what ends a request's time in the queue.
        """
        kind = OutputKind.DELTA
        if not 1 <= n <= MAX_N:
            raise ValueError(f"sampling_params.n={n} is invalid: must be in [1, {MAX_N}].")
        base = f"{request_id}|{next(self._admissions)}"
        samples = [(base, params)] if n == 1 else [
            (f"{base}#{i}", params if params.seed is None else replace(params, seed=params.seed + i))
            for i in range(n)]
        # Validate every sample before admitting any, so a refusal leaves nothing behind.
        for eid, p in samples:
            self.engine.engine.process_inputs(eid, prompt_ids, p)
        if not self.engine.is_healthy:
            raise Draining(f"the engine is not running ({self.engine.dead_error}); retry on another replica.")
        entry = self.registry.admit(request_id, [eid for eid, _ in samples], len(prompt_ids) * n)
        t0, generated, reasons = time.monotonic(), 0, []
        logger.info("request admitted", extra={"request_id": request_id, "prompt_tokens": len(prompt_ids), "n": n})
        try:
            if n == 1:
                stream = self._one(samples[0][0], prompt_ids, params, kind)
            else:
                stream = self._many(entry, samples, prompt_ids, kind)
            async with contextlib.aclosing(stream):
                async for index, out in stream:
                    self.registry.mark_started(entry)
                    self.registry.record_tokens(len(out.outputs[0].token_ids))
                    generated += len(out.outputs[0].token_ids)
                    if out.finished:
                        reasons.append(out.outputs[0].finish_reason)
                    yield index, out
        finally:
            self.registry.release(entry)
            # One structured line per request (with --log-format json, one JSON object).
            logger.info("request finished", extra={
                "request_id": request_id, "prompt_tokens": len(prompt_ids), "completion_tokens": generated,
                "finish_reason": ",".join(r or "" for r in reasons) or "cancelled",
                "latency_s": round(time.monotonic() - t0, 4)})

    async def _one(self, eid, prompt_ids, params, kind):
        gen = self.engine.generate(eid, prompt_ids, params, kind)
        async with contextlib.aclosing(gen):
            async for out in gen:
                yield 0, out

    async def _many(self, entry, samples, prompt_ids, kind):
        """Merge n sample streams; closing this closes (and so aborts) all of them."""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i, eid, p):
            try:
                gen = self.engine.generate(eid, prompt_ids, p, kind)
                async with contextlib.aclosing(gen):
                    async for out in gen:
                        queue.put_nowait((i, out))
            except Exception as exc:  # handed to the consumer, which raises it
                queue.put_nowait((i, exc))
            finally:
                queue.put_nowait((i, done))

        tasks = [asyncio.create_task(pump(i, eid, p)) for i, (eid, p) in enumerate(samples)]
        try:
            # Let every pump take its first step (which queues its sample in the engine), then repeat an
            # Abort that came between admission and that point: the engine drops an abort of an id it
            # has not seen yet, so without this the samples would run to the end.
            await asyncio.sleep(0)
            if entry.aborted:
                for eid, _ in samples:
                    await self.engine.abort(eid)
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def abort(self, request_ids) -> int:
        """Abort by client request id (every sample); returns how many were running."""
        ids = list(request_ids)
        running = [rid for rid in ids if rid in self.registry.active]
        for rid in running:
            self.registry.active[rid].aborted = True
        for eid in self.registry.engine_ids(running):
            await self.engine.abort(eid)
        return len(running)

    async def abort_all(self) -> None:
        await self.abort(list(self.registry.active))

    def end_all(self, reason: str = "abort") -> int:
        """End every running stream now with finish_reason `reason`, without waiting for the engine thread
        (it may be stuck in a step); the engine frees the requests when it can. Returns how many ended."""
        running = list(self.registry.active)
        for rid in running:
            self.registry.active[rid].aborted = True
        return self.engine.end_streams(self.registry.engine_ids(running), reason)


# -- errors --------------------------------------------------------------------
def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status a request failure maps to (one sentence for the user)."""
    if isinstance(exc, ValueError):
        # Engine messages name SamplingParams fields; on the wire they are sampling_params.<field>.
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc).replace("SamplingParams.", "sampling_params.")
    if isinstance(exc, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, DuplicateRequest):
        return grpc.StatusCode.ALREADY_EXISTS, str(exc)
    if isinstance(exc, Draining):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, EngineDeadError):
        return grpc.StatusCode.UNAVAILABLE, f"{exc}; retry on another replica."
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


async def abort_rpc(context: grpc.aio.ServicerContext, exc: BaseException, what: str) -> None:
    code, message = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        logger.error("%s failed", what, exc_info=exc)
    else:
        logger.info("%s refused: %s %s", what, code.name, message)
    await context.abort(code, message)


def optional(msg, field: str, default=None):
    """The value of a proto3 `optional` field, or `default` when it is unset."""
    return getattr(msg, field) if msg.HasField(field) else default


def top_logprobs(entry: dict, n: Optional[int]) -> list[tuple[int, object]]:
    """The n most likely (token_id, Logprob) of one position, by rank (the sampled token may be outside)."""
    if not n:
        return []
    return sorted(((tid, lp) for tid, lp in entry.items() if lp.rank <= n), key=lambda kv: kv[1].rank)[:n]
