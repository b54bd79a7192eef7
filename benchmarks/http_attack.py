"""Issue 95's HTTP-front attack (hardening round 7), reduced for a small machine, and the same checks on the RL
routes of issue 97, against a running `moelink serve` (docs/security.md).

    moelink serve builtin-model --http-port 8000 --api-key K --enable-weight-updates --enable-return-routed-experts \\
        --enable-lora &            # VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 in its environment for the LoRA routes
    python -m moelink.benchmarks.http_attack --port 8000 --key K --pid $!   # --only keyless,body_caps,...

A victim streams greedy 64-token /v1/completions from 127.0.0.2 throughout; each scenario prints one JSON line: what
was sent, what came back, the victim's token gaps (p50, max) during it, and the server's RSS change (--pid: the
server's process group). A flood runs in a process of its own; a request's own "victim gap max" is timed after its
body was serialized (the victim shares this process' GIL: a scenario's whole-window gap includes that, e.g. 3 s for
issue95's 39 MB prompt). Scenarios:

  keyless      a keyless 64 MiB Content-Length to every RL/SGLang/vLLM route: 401 from the head, the body unread
  body_caps    the same with the key: 413 from Content-Length, the cap and flag named
  lora_60mb    a 60 MB JSON body to each LoRA load/unload route (was parsed on the event loop: 5.5 s stalls)
  token_lists  /inference/v1/generate's list fields, n and the answer budget (each one 400 naming the field)
  pickles      /update_weights_from_tensor pickles: arbitrary callables, a class called, segment paths and sizes,
               a shared-memory manager that is some other socket (torch waits on it with the GIL held)
  health_flood 16 keyless connections looping GET /health (the baseline) and then GET /health_generate
  issue95      its items reduced: 32 keyless 64 MiB bodies, 3,000 idle connections, allowed_token_ids x n,
               a 39 MB prompt, ambiguous framings and two Authorization headers
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import multiprocessing as mp
import os
import socket
import threading
import time

HOST = "127.0.0.1"
RL_ROUTES = [("POST", "/inference/v1/generate"), ("POST", "/skyrl/v1/generate"), ("GET", "/get_world_size"),
             ("POST", "/init_weight_transfer_engine"), ("POST", "/update_weights"), ("POST", "/collective_rpc"),
             ("POST", "/fetch_weights"), ("POST", "/skyrl/v1/load_lora_adapter"), ("GET", "/get_server_info"),
             ("GET", "/server_info"), ("GET", "/get_load"), ("GET", "/v1/loads"), ("POST", "/load_lora_adapter"),
             ("POST", "/unload_lora_adapter"), ("POST", "/update_weights_from_tensor"),
             ("POST", "/post_process_weights"), ("POST", "/weights_checker"), ("POST", "/pull_weights"),
             ("GET", "/health_generate")]


class Target:
    def __init__(self, port: int, key: str | None, pid: int | None):
        self.port, self.key, self.pid = port, key, pid

    def auth(self, key: bool = True) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if key and self.key else {}

    def call(self, method, path, body=None, timeout=60.0, src="127.0.0.1", headers=None):
        """(status or exception name, body, seconds); `body` bytes or JSON-able."""
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        c = http.client.HTTPConnection(HOST, self.port, timeout=timeout, source_address=(src, 0))
        t0 = time.monotonic()
        try:
            c.request(method, path, body=body, headers={**self.auth(), "content-type": "application/json",
                                                        **(headers or {})})
            r = c.getresponse()
            return r.status, r.read(), time.monotonic() - t0
        except Exception as e:  # noqa: BLE001
            return type(e).__name__, b"", time.monotonic() - t0
        finally:
            c.close()

    def head(self, method, path, length, key=False, extra=b"") -> bytes:
        h = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
        if key and self.key:
            h += f"Authorization: Bearer {self.key}\r\n"
        return h.encode() + extra + b"\r\n"

    def raw(self, data: bytes, timeout=5.0) -> str:
        """Send `data`, then the answer's status and its message (or what went wrong) with the seconds it took."""
        s = socket.create_connection((HOST, self.port), timeout=timeout)
        t0 = time.monotonic()
        try:
            s.sendall(data)
            got = b""
            while b"\r\n\r\n" not in got or len(got) < 200:
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
        except Exception as e:  # noqa: BLE001
            return f"{type(e).__name__} {time.monotonic() - t0:.2f}s"
        finally:
            s.close()
        status = got.split(b"\r\n", 1)[0].split(b" ")[1:2]
        message = _message(got.split(b"\r\n\r\n", 1)[-1])
        return f"{(status or [b'?'])[0].decode()} {time.monotonic() - t0:.2f}s {message}".strip()

    def rss_mb(self) -> int | None:
        if not self.pid:
            return None
        total = 0
        for pid in os.listdir("/proc"):
            try:
                if pid.isdigit() and os.getpgid(int(pid)) == self.pid:
                    total += next(int(line.split()[1]) for line in open(f"/proc/{pid}/status")
                                  if line.startswith("VmRSS"))
            except (OSError, StopIteration):
                pass
        return total // 1024


def _message(body: bytes) -> str:
    try:
        data = json.loads(body)
        return (data.get("error", {}).get("message") or data.get("message") or "")[:110]
    except Exception:  # noqa: BLE001
        return ""


class Victim(threading.Thread):
    """Greedy 64-token streams from 127.0.0.2 in a loop; the time of every streamed token."""

    def __init__(self, t: Target):
        super().__init__(daemon=True)
        self.t, self.stamps, self.stop, self.errors = t, [], False, 0

    def run(self):
        body = json.dumps({"model": "builtin-model", "prompt": "The module", "max_tokens": 64, "stream": True,
                           "ignore_eos": True, "temperature": 0}).encode()
        while not self.stop:
            try:
                c = http.client.HTTPConnection(HOST, self.t.port, timeout=120, source_address=("127.0.0.2", 0))
                c.request("POST", "/v1/completions", body=body,
                          headers={**self.t.auth(), "content-type": "application/json"})
                r = c.getresponse()
                last = None
                while (line := r.fp.readline()) and not line.startswith(b"data: [DONE]"):
                    if line.startswith(b"data: {"):
                        now = time.monotonic()
                        if last is not None:
                            self.stamps.append((now, now - last))
                        last = now
                c.close()
            except Exception:  # noqa: BLE001
                self.errors += 1
                time.sleep(0.2)

    def window(self, t0: float, t1: float) -> dict:
        gaps = sorted(g for t, g in self.stamps if t0 <= t <= t1)
        if not gaps:
            return {"victim_tokens": 0}
        return {"victim_tokens": len(gaps), "gap_p50": round(gaps[len(gaps) // 2], 3), "gap_max": round(gaps[-1], 3)}


def timed(t: Target, v: Victim, method, path, body: bytes, timeout=60.0) -> str:
    t0 = time.monotonic()
    status, data, secs = t.call(method, path, body, timeout)
    size = f"{len(data)} bytes" if status == 200 else _message(data)
    return f"{status} {secs:.2f}s {size} | victim gap max {v.window(t0, time.monotonic()).get('gap_max')}"


# -- scenarios ------------------------------------------------------------------------------------------------------
def keyless(t, v):
    return {p: t.raw(t.head(m, p, 64 << 20) + b"x" * 4096) for m, p in RL_ROUTES}


def body_caps(t, v):
    return {p: t.raw(t.head(m, p, 64 << 20, key=True) + b"x" * 4096) for m, p in RL_ROUTES}


def lora_60mb(t, v):
    body = json.dumps({"lora_name": "x", "lora_path": "/nonexistent", "pad": [1] * 20_000_000}).encode()
    return {p: timed(t, v, "POST", p, body) for p in ("/load_lora_adapter", "/v1/load_lora_adapter",
                                                       "/unload_lora_adapter", "/skyrl/v1/load_lora_adapter")}


def token_lists(t, v):
    sp = {"max_tokens": 4}
    big = list(range(1_000_000))
    cases = {
        "token_ids 1M, truncate 1": {"token_ids": big, "sampling_params": {**sp, "truncate_prompt_tokens": 1}},
        "allowed_token_ids 1M, n 64": {"token_ids": [1], "sampling_params": {**sp, "n": 64, "allowed_token_ids": big}},
        "allowed_token_ids 8k equal, n 16": {"token_ids": [1], "sampling_params": {**sp, "n": 16, "temperature": 1.0,
                                                                                    "allowed_token_ids": [5] * 8000}},
        "logit_bias 300k": {"token_ids": [1], "sampling_params": {**sp, "logit_bias": {str(i): 1 for i in
                                                                                         range(300_000)}}},
        "stop_token_ids 1M": {"token_ids": [1], "sampling_params": {**sp, "stop_token_ids": big}},
        "stop 200k": {"token_ids": [1], "sampling_params": {**sp, "stop": ["ab"] * 200_000}},
        "bad_words 200k": {"token_ids": [1], "sampling_params": {**sp, "bad_words": ["ab"] * 200_000}},
        "n 100000": {"token_ids": [1], "sampling_params": {**sp, "n": 100_000, "temperature": 1.0}},
        "n 64 x 1000 tokens x logprobs 20": {"token_ids": [1], "sampling_params": {"max_tokens": 1000, "n": 64,
                                                                                   "logprobs": 20}},
        "1000 tokens x logprobs 20 (bytes/token)": {"token_ids": [1], "sampling_params": {
            "max_tokens": 1000, "logprobs": 20, "ignore_eos": True}},
        "request_id lone surrogate": {"request_id": "\ud800", "token_ids": [1], "sampling_params": sp},
        "cache_salt lone surrogate": {"token_ids": [1], "cache_salt": "\ud800", "sampling_params": sp},
    }
    out = {}
    for name, body in cases.items():
        raw = json.dumps(body).encode()  # serialized before the window
        time.sleep(0.3)
        out[name] = timed(t, v, "POST", "/inference/v1/generate", raw, timeout=120)
    return out


def _fs_pickle(handle: bytes, manager: bytes, size: int = 16) -> bytes:
    """torch's "file_system" storage pickle, written by hand: rebuild_storage_filename(UntypedStorage, manager,
    handle, size)."""
    return (b"\x80\x02ctorch.multiprocessing.reductions\nrebuild_storage_filename\n(ctorch\nUntypedStorage\n"
            + b"C" + bytes([len(manager)]) + manager + b"C" + bytes([len(handle)]) + handle
            + b"J" + size.to_bytes(4, "little") + b"NtR.")


def pickles(t, v):
    hang = f"/tmp/http_attack_{os.getpid()}.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(hang)
    listener.listen(64)  # accepts, never answers: torch's manager client waits for "OK"
    cases = {
        "os.system": b"\x80\x02cos\nsystem\n(X\x02\x00\x00\x00idtR.",
        "builtins.eval": b"\x80\x02cbuiltins\neval\n(X\x03\x00\x00\x001+1tR.",
        "torch.Tensor(1e12) called": b"\x80\x02ctorch\nTensor\n(J\x00\x10\xa5\xd4tR.",
        "segment /../etc/passwd": _fs_pickle(b"/../etc/passwd", b"/tmp/x"),
        "segment of 2 GiB": _fs_pickle(b"/torch_1_2_3", b"/tmp/x", 2 ** 31 - 1),
        **{f"manager: another socket, spelling {k}": _fs_pickle(b"/torch_1_2_%d" % k, hang.replace(
            "/tmp/", "/tmp/" + "./" * k).encode()) for k in range(3)},
    }
    fds = lambda: len(os.listdir(f"/proc/{t.pid}/fd")) if t.pid else None  # noqa: E731
    out = {"server fds before": fds()}
    try:
        for name, p in cases.items():
            body = json.dumps({"serialized_named_tensors": [base64.b64encode(p).decode()]}).encode()
            out[name] = timed(t, v, "POST", "/update_weights_from_tensor", body, timeout=30)
    finally:
        listener.close()
        os.unlink(hang)
    out["server fds after"] = fds()
    return out


def _flood(port: int, path: str, conns: int, secs: float, q) -> None:
    stop, done = time.monotonic() + secs, [0]

    def loop():
        c = None
        while time.monotonic() < stop:
            try:
                c = c or http.client.HTTPConnection(HOST, port, timeout=30)
                c.request("GET", path)
                c.getresponse().read()
                done[0] += 1
            except Exception:  # noqa: BLE001
                c = None
    threads = [threading.Thread(target=loop, daemon=True) for _ in range(conns)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    q.put(done[0])


def health_flood(t, v, conns=16, secs=15.0):
    out = {}
    for path in ("/health", "/health_generate"):
        q = mp.Queue()
        p = mp.Process(target=_flood, args=(t.port, path, conns, secs, q))
        t0 = time.monotonic()
        p.start()
        done = q.get()
        p.join()
        out[path] = {"probes_per_s": round(done / secs), **v.window(t0, time.monotonic())}
    return out


def issue95(t, v):
    out = {}
    socks = []
    for _ in range(32):
        s = socket.create_connection((HOST, t.port))
        s.sendall(t.head("POST", "/v1/completions", 64 << 20) + b"x" * (1 << 20))
        socks.append(s)
    codes = []
    for s in socks:
        s.settimeout(5)
        try:
            codes.append(s.recv(100).split(b"\r\n")[0].decode())
        except Exception as e:  # noqa: BLE001
            codes.append(type(e).__name__)
        s.close()
    out["32 keyless 64 MiB /v1/completions"] = {c: codes.count(c) for c in set(codes)}
    idle = []
    for _ in range(3000):
        try:
            idle.append(socket.create_connection((HOST, t.port), timeout=5))
        except OSError:
            break
    out["/health beside 3000 idle"] = [f"{s} {secs:.2f}s" for s, _, secs in
                                       (t.call("GET", "/health", timeout=10, src="127.0.0.3") for _ in range(3))]
    time.sleep(11)  # past --http-head-timeout
    closed = 0
    for s in idle:
        s.settimeout(0.01)
        try:
            closed += s.recv(1) == b""
        except (socket.timeout, BlockingIOError):
            pass
        except OSError:
            closed += 1
        s.close()
    out["idle closed after 11 s"] = f"{closed}/{len(idle)}"
    body = json.dumps({"model": "builtin-model", "prompt": "x", "max_tokens": 2, "n": 64, "temperature": 1.0,
                       "allowed_token_ids": [5] * 200_000}).encode()
    out["allowed_token_ids 200k equal x n 64"] = timed(t, v, "POST", "/v1/completions", body)
    body = json.dumps({"model": "builtin-model", "prompt": [1] * 13_000_000, "max_tokens": 1}).encode()
    out["39 MB prompt of ids"] = timed(t, v, "POST", "/v1/completions", body)
    k = (t.key or "x").encode()
    out["two Authorization headers"] = t.raw(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer bad\r\n"
                                             b"Authorization: Bearer " + k + b"\r\n\r\n")
    out["Content-Length and chunked"] = t.raw(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                                              b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    out["two Content-Lengths"] = t.raw(t.head("POST", "/inference/v1/generate", 2, True, b"Content-Length: 2\r\n")
                                       + b"{}")
    return out


SCENARIOS = {f.__name__: f for f in (keyless, body_caps, lora_60mb, token_lists, pickles, health_flood, issue95)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--port", type=int, required=True, help="the server's --http-port (on 127.0.0.1)")
    p.add_argument("--key", default=None, help="its --api-key")
    p.add_argument("--pid", type=int, default=None, help="its process (group) id: RSS and file descriptors")
    p.add_argument("--only", default="", help=f"comma-separated, of: {', '.join(SCENARIOS)}")
    ns = p.parse_args(argv)
    t = Target(ns.port, ns.key, ns.pid)
    v = Victim(t)
    v.start()
    time.sleep(5)
    print(json.dumps({"scenario": "victim alone", **v.window(0, time.monotonic())}), flush=True)
    for name, fn in SCENARIOS.items():
        if ns.only and name not in ns.only.split(","):
            continue
        r0, t0 = t.rss_mb(), time.monotonic()
        try:
            out = fn(t, v)
        except Exception as e:  # noqa: BLE001
            out = {"error": repr(e)[:300]}
        rec = {"scenario": name, "secs": round(time.monotonic() - t0, 1), "answers": out,
               **v.window(t0, time.monotonic())}
        if r0 is not None:
            rec["rss_mb_delta"] = t.rss_mb() - r0
        print(json.dumps(rec), flush=True)
    v.stop = True
    print(json.dumps({"victim_errors": v.errors}))


if __name__ == "__main__":
    main()
