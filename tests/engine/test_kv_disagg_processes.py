"""Prefill/decode disaggregation across processes over TCP (engine/cluster/kv_remote.py): a prefill engine in a
process this test starts (tests/helpers/kv_prefill_process.py, on 127.0.0.1) prefills each prompt with
max_tokens=1 and serves the saved KV; an engine here fetches it by the prefill request's id, decodes, and its
greedy outputs equal one engine's that did everything, for GQA (Qwen3-MoE), MLA (DeepSeek-V3) and gpt-oss
(sliding window on shared tensors). Faults: the prefill process killed before the fetch, or in the middle of
one, or a fetch that runs past its deadline: the request is recomputed, its reason kept, and every KV block is
back in the pool. float64, as in test_kv_connector_engine.py (the decode engine computes the last prompt token
alone)."""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from moelink.engine import LLM, SamplingParams
from moelink.engine.cluster.kv_remote import RemoteKVConfig, RemoteKVConnector
from moelink.engine.contract.kv_transfer_params import KVTransferParams
from moelink.scheduler.request import RequestStatus

from tests.helpers.gpt_oss_checkpoints import save_gpt_oss
from tests.helpers.local_ray import LOOPBACK_ENV
from tests.helpers.net import free_port, listening
from tests.helpers.parity import prompts

MAX_NEW = 6
ROOT = Path(__file__).resolve().parents[2]
KW = dict(dtype="float64", num_kv_blocks=96, block_size=4, max_num_batched_tokens=32, max_model_len=128,
          skip_warmup=True)
READY_S = 240.0  # the prefill process: imports, checkpoint, prefill (and a Ray, for EP 2) on a busy 2-core host


class PrefillProcess:
    """tests/helpers/kv_prefill_process.py in a subprocess of its own; stdout lines read on a thread, stderr to a
    temp file. `close()` closes its stdin (it shuts down and reports its store) or kills it, by PID."""

    def __init__(self, spec: dict, env: dict | None = None):
        self.log = tempfile.NamedTemporaryFile("w+", prefix="kv-prefill-", suffix=".log", delete=False)
        # One intra-op thread (a 2-core host runs both engines); a Ray it starts stays on loopback.
        env = {**os.environ, "OMP_NUM_THREADS": "1", LOOPBACK_ENV: "0", "MOELINK_MASTER_ADDR": "127.0.0.1",
               **(env or {})}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(ROOT)) if p)
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.kv_prefill_process", json.dumps(spec)],
                                     cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env)
        self.pid = self.proc.pid
        self.lines: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.put(json.loads(line))
        self.lines.put(None)  # EOF

    def expect(self, key: str, timeout: float) -> dict:
        """The next stdout message that has `key`; AssertionError (with the log's tail) if the process ends or
        the time runs out first."""
        while True:
            try:
                msg = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {key!r} from the prefill process within {timeout:g} s{self._tail()}") from None
            if msg is None:
                raise AssertionError(f"the prefill process exited ({self.proc.poll()}) before {key!r}{self._tail()}")
            if key in msg:
                return msg

    def _tail(self) -> str:
        with open(self.log.name) as f:
            return "\n--- its log ---\n" + f.read()[-3000:]

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL, this PID only
        self.proc.wait(30)

    def close(self) -> dict | None:
        """Stop it (stdin closed: it shuts its engine down) and return its {"closed"} message; killed if it does
        not end within 60 s."""
        msg = None
        if self.log.closed:
            return None  # closed already
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                msg = self.expect("closed", 60.0)
                self.proc.wait(30)
            except (AssertionError, subprocess.TimeoutExpired, OSError):
                self.kill()
        self._reader.join(10)
        self.log.close()
        os.unlink(self.log.name)
        return msg


@pytest.fixture(scope="module")
def gpt_oss_paired(tmp_path_factory):
    return save_gpt_oss(tmp_path_factory.mktemp("kv_gpt_oss"), num_hidden_layers=2)


def _path(kind, tiny_model, hf_tiny_model, gpt_oss_paired):
    return {"gqa": lambda: tiny_model("qwen3_e6k3"), "mla": lambda: hf_tiny_model("dsv3_lora"),
            "sliding": lambda: gpt_oss_paired}[kind]()


def _one_engine(path, ps):
    with LLM(path, **KW) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
        return [o.outputs[0].token_ids for o in llm.generate(ps, params, use_tqdm=False)]


def _decode_params(kv_params):
    return [SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True,
                           kv_transfer_params=KVTransferParams(**p)) for p in kv_params]


class Decoder:
    """An engine here that loads over TCP; counts the tokens it computes."""

    def __init__(self, path, config: RemoteKVConfig | None = None, **kw):
        self.llm = LLM(path, kv_connector=RemoteKVConnector(config or RemoteKVConfig()), **{**KW, **kw})
        self.computed = 0
        real = self.llm.engine.executor.launch

        def launch(sched_outs):
            self.computed += sum(so.total_num_scheduled_tokens for so in sched_outs)
            return real(sched_outs)

        self.llm.engine.executor.launch = launch

    @property
    def worker(self):
        return self.llm.engine.executor.runner.kv_connector

    def free_blocks(self) -> tuple[int, int]:
        s = self.llm.engine.stats()
        return s.num_free_blocks, s.num_total_blocks

    def add(self, ps, params) -> None:
        for i, (p, sp) in enumerate(zip(ps, params)):
            self.llm.engine.add_request(f"d{i}", p, sp)

    def run(self, n: int, timeout: float = 180.0) -> list[list[int]]:
        """Step until every request ends; AssertionError past `timeout` s (a load that never reports hangs)."""
        got = {}
        deadline = time.monotonic() + timeout
        while self.llm.engine.has_requests():
            assert time.monotonic() < deadline, f"requests still unfinished after {timeout:g} s"
            got.update({o.request_id: o.outputs[0].token_ids for o in self.llm.engine.step() if o.finished})
        return [got[f"d{i}"] for i in range(n)]

    def close(self) -> None:
        self.llm.engine.shutdown()


@pytest.mark.parametrize("kind", ["gqa", "mla", "sliding"])
def test_prefill_in_another_process_decode_here(kind, tiny_model, hf_tiny_model, gpt_oss_paired):
    path = _path(kind, tiny_model, hf_tiny_model, gpt_oss_paired)
    ps = prompts(200, seed=3, n=4, lo=5, hi=23)  # one block and a bit, up to six blocks; partial last blocks
    want = _one_engine(path, ps)
    port = free_port()
    pre = PrefillProcess({"model": path, "port": port, "prompts": ps, "llm": KW})
    try:
        ready = pre.expect("ready", READY_S)
        assert ready["first"] == [w[:1] for w in want]
        assert listening(port, pids=[pre.pid]) == {("127.0.0.1", port)}  # only where asked
        dec = Decoder(path)
        try:
            dec.add(ps, _decode_params(ready["params"]))
            got = dec.run(len(ps))
            assert got == want
            # Only each prompt's last token computed here, then the decode steps: no prompt was recomputed.
            assert dec.computed == len(ps) * MAX_NEW
            stats = dec.worker.stats
            assert stats.num_loaded == len(ps) and stats.num_failed == 0 and stats.bytes_loaded > 0
            assert dec.free_blocks()[0] == dec.free_blocks()[1]
        finally:
            dec.close()
        closed = pre.close()
        # Fetched once each, then dropped: the prefill side holds nothing.
        assert closed["store"]["num_saved"] == len(ps) and closed["store"]["num_served"] == len(ps)
        assert closed["store"]["held"] == 0
    finally:
        pre.close()


def test_prefill_killed_before_the_fetch_recomputes(tiny_model):
    path = tiny_model("qwen3_e6k3")
    ps = prompts(200, seed=8, n=3, lo=6, hi=14)
    want = _one_engine(path, ps)
    pre = PrefillProcess({"model": path, "port": free_port(), "prompts": ps, "llm": KW})
    try:
        params = _decode_params(pre.expect("ready", READY_S)["params"])
        pre.kill()
        dec = Decoder(path)
        try:
            dec.add(ps, params)
            assert dec.run(len(ps)) == want
            assert dec.worker.stats.num_failed == len(ps) and dec.worker.stats.num_loaded == 0
            assert all("refused" in reason.lower() for _, reason in dec.worker.stats.failures)
            assert dec.computed == sum(map(len, ps)) + len(ps) * (MAX_NEW - 1)  # every prompt computed here
            assert dec.free_blocks()[0] == dec.free_blocks()[1]
        finally:
            dec.close()
    finally:
        pre.close()


@pytest.mark.parametrize("fault", ["killed", "deadline"])
def test_fetch_cut_off_midway_frees_the_blocks_and_recomputes(fault, tiny_model):
    """The prefill server sends a reply's header and half a tensor, then stops: killed there ("killed"), or left
    silent past the decode side's fetch_timeout_s ("deadline")."""
    path = tiny_model("qwen3_e6k3")
    ps = prompts(200, seed=9, n=2, lo=9, hi=17)
    want = _one_engine(path, ps)
    pre = PrefillProcess({"model": path, "port": free_port(), "prompts": ps, "llm": KW, "stall": True})
    try:
        params = _decode_params(pre.expect("ready", READY_S)["params"])
        timeout = 2.0 if fault == "deadline" else 120.0
        dec = Decoder(path, RemoteKVConfig(fetch_timeout_s=timeout))
        try:
            free, total = dec.free_blocks()
            assert free == total
            dec.add(ps, params)
            dec.llm.engine.step()  # schedules the loads: the blocks are reserved, the fetches start
            sched = dec.llm.engine.schedulers[0]
            assert all(r.status is RequestStatus.WAITING_FOR_KV for r in sched.requests.values())
            pre.expect("stalled", 60.0)  # a fetch is mid-reply
            assert dec.free_blocks()[0] < total  # reserved on arrival, held while loading
            if fault == "killed":
                pre.kill()
            assert dec.run(len(ps)) == want
            stats = dec.worker.stats
            assert stats.num_failed == len(ps) and stats.num_loaded == 0
            words = ("timed out",) if fault == "deadline" else ("closed", "reset")  # EOF, or an RST
            assert all(any(w in reason for w in words) for _, reason in stats.failures), list(stats.failures)
            assert dec.computed == sum(map(len, ps)) + len(ps) * (MAX_NEW - 1)
            assert dec.free_blocks() == (total, total)
            sched.check_invariants()
        finally:
            dec.close()
    finally:
        pre.kill() if pre.proc.poll() is None else None
        pre.close()
