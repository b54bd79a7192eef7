"""The scheduler tests' simulation: a fake worker that checks KV contents, and an unbatched oracle.

The fake worker is the oracle for the scheduler's block bookkeeping. It keeps
what a real worker keeps (token ids and block table per request, updated only
from `SchedulerOutput`) and a fake KV store where every slot holds a
fingerprint of the *whole prefix* ending at that position. Before computing a
chunk it verifies that every earlier position of the request reads back its
own prefix's fingerprint, so a block handed to two sequences at once, a wrong
prefix-cache hit, a block table that drifts from the scheduler's, or a KV slot
overwritten while in use all fail loudly.

The fake model's next token is a pure function of the token ids so far, so a
request's output must not depend on batching, chunking or preemption.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from moelink.scheduler import (
    CacheConfig,
    ModelRunnerOutput,
    Request,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
    TokenLogprobs,
)

VOCAB = 50


def toy_model(tokens: list[int]) -> int:
    """Deterministic next token from the last few tokens (never EOS-biased)."""
    return (tokens[-1] * 7 + tokens[-2 if len(tokens) > 1 else -1] * 13 + len(tokens)) % VOCAB


@dataclass
class _WorkerReq:
    tokens: list[int]
    block_ids: list[int]
    num_computed: int
    fps: list[int] = field(default_factory=list)  # fps[p]: fingerprint of tokens[:p+1]

    def extend_fps(self) -> None:
        while len(self.fps) < len(self.tokens):
            prev = self.fps[-1] if self.fps else 0
            self.fps.append(hash((prev, self.tokens[len(self.fps)])))


class FakeWorker:
    """Keeps per-request state across steps like a real worker, checks KV.

    `extra_tokens(req_id)`: how many tokens a sampling row emits after its first (a speculative step's accepted
    drafts; the model's own next tokens, whose KV the next step computes); None: one token per row. A later step
    of the request launched before that output is collected keeps only the first, as a real worker must
    (scheduler/step_output.py).

    `kv_store`: a KV connector's store (request id -> the KV fingerprints of its saved positions): the worker
    runs the step's loads before its compute and its saves after, and reports each `report_delay()` steps later
    (default at once); `load_fails()` True makes a load fail (default never)."""

    def __init__(self, num_blocks: int, block_size: int, model=toy_model, extra_tokens=None, kv_store=None,
                 report_delay=None, load_fails=None) -> None:
        self.bs = block_size
        self.kv: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.reqs: dict[str, _WorkerReq] = {}
        self.model = model
        self.extra_tokens = extra_tokens
        # Request -> (step, extra tokens it emitted) for the last sampling step of each, until it is collected.
        self.uncollected: dict[str, tuple[int, int]] = {}
        self.kv_store = kv_store
        self.report_delay = report_delay or (lambda: 0)
        self.load_fails = load_fails or (lambda: False)
        self._reports: list[list] = []  # [steps to wait, transfer id, ok]

    def collected(self, so: SchedulerOutput) -> None:
        for rid in so.num_scheduled_tokens:
            if self.uncollected.get(rid, (None,))[0] == so.step_id:
                del self.uncollected[rid]

    def ahead(self, rid: str) -> int:
        """Extra tokens emitted for `rid` by a step not collected yet."""
        return self.uncollected.get(rid, (0, 0))[1]

    def _check_prefix(self, rid: str, st: _WorkerReq, upto: int) -> None:
        for p in range(upto):
            got = self.kv[st.block_ids[p // self.bs]][p % self.bs]
            assert got == st.fps[p], f"{rid}: KV at position {p} is not this request's prefix"

    def _load(self, t) -> bool:
        saved = self.kv_store.get(t.req_id)
        if saved is None or len(saved) < t.num_tokens or self.load_fails():
            return False
        for p in range(t.first_block * self.bs, t.num_tokens):
            self.kv[t.block_ids[p // self.bs]][p % self.bs] = saved[p]
        return True

    def _save(self, t) -> None:
        self.kv_store[t.req_id] = [self.kv[t.block_ids[p // self.bs]][p % self.bs] for p in range(t.num_tokens)]

    def _transfers(self, transfers, run) -> None:
        for t in transfers:
            self._reports.append([self.report_delay(), t.transfer_id, run(t) is not False])

    def _due_reports(self) -> dict[int, bool] | None:
        done = {}
        for r in list(self._reports):
            if r[0] <= 0:
                done[r[1]] = r[2]
                self._reports.remove(r)
            else:
                r[0] -= 1
        return done or None

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        plan = so.kv_transfers
        if plan is not None:
            assert self.kv_store is not None, "KV transfers planned without a connector"
            self._transfers(plan.loads, self._load)
        for rid in so.finished_req_ids | so.preempted_req_ids:
            self.reqs.pop(rid, None)
            self.uncollected.pop(rid, None)
        for nr in so.scheduled_new_reqs:
            assert nr.req_id not in self.reqs, f"{nr.req_id} sent as new twice"
            st = _WorkerReq(list(nr.prompt_token_ids) + list(nr.output_token_ids), list(nr.block_ids),
                            nr.num_computed_tokens)
            st.extend_fps()
            self.reqs[nr.req_id] = st
        for cr in so.scheduled_cached_reqs:
            st = self.reqs[cr.req_id]
            assert st.num_computed == cr.num_computed_tokens, f"{cr.req_id}: progress drifted"
            st.block_ids.extend(cr.new_block_ids)
        assert set(so.num_scheduled_tokens) == (
            {r.req_id for r in so.scheduled_new_reqs} | {r.req_id for r in so.scheduled_cached_reqs})
        assert so.total_num_scheduled_tokens == sum(so.num_scheduled_tokens.values())
        sampled: dict[str, list[int]] = {}
        logprobs: dict[str, list[TokenLogprobs]] = {}
        for rid, n in so.num_scheduled_tokens.items():
            st = self.reqs[rid]
            extra = self.uncollected.pop(rid, (0, 0))[1]
            if extra:  # launched before the output with the extra tokens was collected: only its first is kept
                del st.tokens[-extra:]
                del st.fps[-extra:]
            start = st.num_computed
            assert n >= 1 and start + n <= len(st.tokens), f"{rid}: scheduled past its tokens"
            assert len(st.block_ids) * self.bs >= start + n, f"{rid}: not enough blocks"
            assert len(set(st.block_ids)) == len(st.block_ids), f"{rid}: block twice in its table"
            self._check_prefix(rid, st, start)  # attention reads the cached/computed prefix
            for p in range(start, start + n):
                self.kv[st.block_ids[p // self.bs]][p % self.bs] = st.fps[p]
            st.num_computed = start + n
            if st.num_computed == len(st.tokens):
                toks = [self.model(st.tokens)]
                for _ in range(self.extra_tokens(rid) if self.extra_tokens is not None else 0):
                    toks.append(self.model(st.tokens + toks))
                sampled[rid] = toks
                logprobs[rid] = [TokenLogprobs(t, -0.25, 1, [(t, -0.25)]) for t in toks]
                st.tokens.extend(toks)
                st.extend_fps()
                if len(toks) > 1:
                    self.uncollected[rid] = (so.step_id, len(toks) - 1)
        # Nobody's writes in this step clobbered another request's KV.
        for rid, st in self.reqs.items():
            self._check_prefix(rid, st, st.num_computed)
        if plan is not None:
            self._transfers(plan.saves, self._save)
        return ModelRunnerOutput(so.step_id, sampled, logprobs,
                                 kv_transfers_done=self._due_reports() if self.kv_store is not None else None)


class Sim:
    """Scheduler + fake worker + output collection, with checks every step.

    `overlap`: the engine's overlapped loop (async scheduling). The fake worker is the device: it runs each
    step when it is scheduled, but the scheduler takes a step's output only after scheduling the next one."""

    def __init__(self, sched: Scheduler, model=toy_model, overlap: bool = False, extra_tokens=None,
                 **worker_kw) -> None:
        self.sched = sched
        pool = sched.kv.pool
        self.worker = FakeWorker(pool.num_blocks, pool.block_size, model, extra_tokens, **worker_kw)
        self.tokens: dict[str, list[int]] = defaultdict(list)
        self.finish: dict[str, tuple[str, int | None]] = {}
        self.cached: dict[str, int] = {}
        self.steps: list[SchedulerOutput] = []
        self.overlap = overlap
        self._in_flight: tuple[SchedulerOutput, ModelRunnerOutput] | None = None

    def step(self, in_flight=None) -> SchedulerOutput:
        """One engine step; `in_flight(so)` runs between schedule and execute
        (e.g. to abort requests while their step is on the device)."""
        so = self.sched.schedule()
        self.sched.check_invariants()
        cfg = self.sched.scheduler_config
        assert so.total_num_scheduled_tokens <= cfg.max_num_batched_tokens
        assert len(so.num_scheduled_tokens) <= cfg.max_num_seqs
        self.steps.append(so)
        if in_flight is not None:
            in_flight(so)
        ro = self.worker.execute(so)
        if self.overlap:
            done, self._in_flight = self._in_flight, (so, ro)
            if done is not None:
                self._take(*done)
        else:
            self._take(so, ro)
        return so

    def _take(self, so: SchedulerOutput, ro: ModelRunnerOutput) -> None:
        self.worker.collected(so)
        for out in self.sched.update_from_output(so, ro):
            assert out.request_id not in self.finish, "output after finish"
            self.tokens[out.request_id].extend(out.new_token_ids)
            assert [lp.token_id for lp in out.new_logprobs] == out.new_token_ids
            self.cached[out.request_id] = out.num_cached_tokens
            if out.finish_reason is not None:
                self.finish[out.request_id] = (out.finish_reason, out.stop_reason)
        self.sched.check_invariants()
        for rid, st in self.worker.reqs.items():  # both sides agree on the tokens
            req = self.sched.requests.get(rid)
            if req is None:
                continue
            if self.overlap:  # the worker is ahead by the tokens still in flight
                n = req.num_tokens
                ahead = req.num_output_placeholders + self.worker.ahead(rid)
                assert st.tokens[:n] == req.all_token_ids and len(st.tokens) - n <= ahead
                assert st.num_computed <= req.num_computed_tokens
            else:
                assert st.tokens == req.all_token_ids and st.num_computed == req.num_computed_tokens

    def flush(self) -> None:
        """Take the output of the step still in flight (overlap)."""
        done, self._in_flight = self._in_flight, None
        if done is not None:
            self._take(*done)

    def run(self, max_steps: int = 10_000) -> None:
        kvt = self.sched.kv_transfers
        for _ in range(max_steps):
            if not self.sched.has_unfinished_requests() and not (kvt is not None and kvt.busy):
                break  # nothing left to run, and no KV transfer still to report
            self.step()
        assert not self.sched.has_unfinished_requests(), "did not finish"
        self.flush()
        self.step()  # flush finished ids to the worker
        self.flush()
        assert not self.worker.reqs
        pool = self.sched.kv.pool
        assert pool.num_free_blocks == pool.num_blocks


def reference_generate(prompt: list[int], *, max_tokens=None, eos=frozenset(), stop_ids=frozenset(),
                       min_tokens=0, ignore_eos=False, max_len=10**9, model=toy_model):
    """Unbatched oracle: what a request must produce, whatever the scheduling."""
    toks, out = list(prompt), []
    while True:
        t = model(toks)
        toks.append(t)
        out.append(t)
        if t in eos and not ignore_eos and len(out) >= min_tokens:
            return out, ("stop", None)
        if t in stop_ids and len(out) >= min_tokens:
            return out, ("stop", t)
        if (max_tokens is not None and len(out) >= max_tokens) or len(toks) >= max_len:
            return out, ("length", None)


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                   max_model_len=512, prefix_caching=True, **config) -> Scheduler:
    """`config`: more SchedulerConfig fields (e.g. the speculative or fairness knobs)."""
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                     max_model_len=max_model_len, **config),
                     CacheConfig(block_size=block_size, num_kv_blocks=num_blocks,
                                 enable_prefix_caching=prefix_caching))


_arrival = iter(range(10**9))


def make_request(rid: str, prompt: list[int], max_tokens: int | None = 8, **kw) -> Request:
    kw.setdefault("arrival_time", float(next(_arrival)))
    return Request(rid, prompt, None, max_tokens=max_tokens, **kw)
