"""Two engines in two processes for the disaggregation tests (tests/engine/test_kv_disagg_processes.py,
tests/ep/test_ep_kv_disagg.py): `PrefillProcess` starts tests/helpers/kv_prefill_process.py and reads what it
reports; `Decoder` is the engine in the test's process that loads over TCP and counts the tokens it computes."""
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

from moelink.engine import LLM, SamplingParams
from moelink.engine.kv_transfer.remote import RemoteKVConfig, RemoteKVConnector
from moelink.engine.contract.kv_transfer_params import KVTransferParams

from . import zygote
from .local_ray import LOOPBACK_ENV

MAX_NEW = 6
ROOT = Path(__file__).resolve().parents[2]  # the repository root
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
        # Forked from the test zygote (tests/helpers/zygote.py: torch imported once for all of them), else exec'd.
        self.proc = zygote.popen([sys.executable, "-m", "tests.helpers.kv_prefill_process", json.dumps(spec)],
                                 cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                 env=env)
        self.pid = self.proc.pid
        self.lines: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue  # not one of its messages (a library printing to stdout)
            if isinstance(msg, dict):
                self.lines.put(msg)
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


def one_engine(path, ps):
    with LLM(path, **KW) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
        return [o.outputs[0].token_ids for o in llm.generate(ps, params, use_tqdm=False)]


def decode_params(kv_params):
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
        return self.llm.engine.executor.runner.plugin("kv_transfer").connector

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


def check_pd_transfer(path, ps) -> None:
    """A prefill engine saves each prompt's KV (do_remote_decode), a decode engine here loads it over TCP: the decode
    side computes only each prompt's last token and then decodes, its tokens equal one engine's, both pools end
    free (prompts of 2 tokens or more: a one-token prompt moves nothing)."""
    from .net import free_port

    want = one_engine(path, ps)
    save = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True,
                          kv_transfer_params=KVTransferParams(do_remote_decode=True))
    pre = LLM(path, kv_connector=RemoteKVConnector(RemoteKVConfig(port=free_port(), transport="tcp")), **KW)
    dec = None
    try:
        outs = pre.generate(ps, save, use_tqdm=False)
        dec = Decoder(path, RemoteKVConfig(transport="tcp"))
        dec.add(ps, [SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True,
                                    kv_transfer_params=o.kv_transfer_params) for o in outs])
        assert dec.run(len(ps)) == want
        assert dec.computed == len(ps) * MAX_NEW and dec.worker.stats.num_loaded == len(ps)
        for llm in (pre, dec.llm):
            stats = llm.engine.stats()
            assert stats.num_free_blocks == stats.num_total_blocks
    finally:
        if dec is not None:
            dec.close()
        pre.engine.shutdown()
