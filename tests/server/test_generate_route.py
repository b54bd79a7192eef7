"""SGLang's native `POST /generate` on the HTTP front (engine/server/gateway/generate_route.py; docs/rl.md#over-http),
answered from the engine beside it: the same tokens, logprobs and routed experts as the Python API (AsyncEngine on
the same engine) for the same greedy request; streamed as SGLang streams; each refusal names its field; the API key
asked for though the route is not under /v1. (Without --enable-return-routed-experts the field is refused naming
the flag: test_rl_http_routes.py, whose engine runs without it.)"""
from __future__ import annotations

import base64
import http.client
import json

import numpy as np
import pytest

from moelink.engine import SamplingParams
from moelink.engine.server.gateway.generate_route import GenerateRoute
from moelink.engine.server.gateway.http_front import HttpFront
from moelink.engine.server.gateway.rl_routes import ChainedRoutes

from tests.helpers.grpc_server import ENGINE_KW, ThreadServer
from tests.helpers.net import free_port

KEY = "generate-key"
PROMPT_IDS = [5, 17, 99, 23, 42, 7, 300]
GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}


def post(port: int, body, key: str | None = KEY, raw: bool = False) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        conn.request("POST", "/generate", body=body if raw else json.dumps(body), headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def ok(port: int, body) -> dict:
    status, out = post(port, body)
    assert status == 200, out
    return json.loads(out)


def refused(port: int, body, raw: bool = False) -> tuple[str, str]:
    status, out = post(port, body, raw=raw)
    assert status == 400, out
    err = json.loads(out)["error"]
    return err["param"], err["message"]


class _NoModels:
    async def answer(self, method, path, body, query="", client=()):
        return None


@pytest.fixture(scope="module")
def front(model_path):
    srv = ThreadServer(model_path, {**ENGINE_KW, "enable_return_routed_experts": True})
    f = HttpFront("127.0.0.1", free_port(), free_port(), KEY,
                  local=ChainedRoutes(_NoModels(), GenerateRoute(srv.server.serving)))
    srv.call(f.start())
    try:
        yield srv, f.port
    finally:
        srv.call(f.stop())
        srv.close()


def _python_api(srv, prompt, **sp):
    """The finished RequestOutput of the Python API (AsyncEngine.generate) on the same engine."""
    async def run():
        last = None
        async for last in srv.engine.generate("oracle-" + str(hash(str(prompt)) % 1000), prompt, SamplingParams(**sp)):
            pass
        return last
    return srv.call(run(), timeout=60)


@pytest.mark.slow  # over 1 s (an engine start and a few short generations)
def test_generate_matches_the_python_api(front):
    srv, port = front
    assert post(port, {"input_ids": PROMPT_IDS}, key=None)[0] == 401  # not under /v1, still the key's
    got = ok(port, {"input_ids": PROMPT_IDS, "sampling_params": GREEDY, "return_logprob": True,
                    "return_routed_experts": True, "rid": "r3"})
    want = _python_api(srv, PROMPT_IDS, temperature=0, max_tokens=6, ignore_eos=True, logprobs=0,
                       return_routed_experts=True)
    comp = want.outputs[0]
    assert got["output_ids"] == comp.token_ids and got["text"] == comp.text
    meta = got["meta_info"]
    assert meta["id"] == "r3" and meta["finish_reason"] == {"type": "length", "length": 6}
    assert (meta["prompt_tokens"], meta["completion_tokens"]) == (len(PROMPT_IDS), 6)
    assert [t for _, t, _ in meta["output_token_logprobs"]] == comp.token_ids
    assert [lp for lp, _, _ in meta["output_token_logprobs"]] == pytest.approx(
        [e[t].logprob for t, e in zip(comp.token_ids, comp.logprobs)], abs=1e-6)
    assert meta["input_token_logprobs"] == [] and meta["routed_experts_dtype"] == "int32"
    rx = np.frombuffer(base64.b64decode(meta["routed_experts"]), dtype="<i4")  # as slime decodes it
    assert rx.size == comp.routed_experts.size
    rx = rx.reshape(comp.routed_experts.shape)
    assert rx.shape[0] == len(PROMPT_IDS) + 6 - 1 and np.array_equal(rx, comp.routed_experts)

    # text gives the tokens the Python API gives the same text; no logprobs or experts unless asked
    text = ok(port, {"text": "The quick brown fox", "sampling_params": GREEDY})
    want = _python_api(srv, "The quick brown fox", temperature=0, max_tokens=6, ignore_eos=True).outputs[0]
    assert text["output_ids"] == want.token_ids and text["text"] == want.text
    assert not {"output_token_logprobs", "routed_experts"} & set(text["meta_info"])

    # top_logprobs_num: the n most likely of each position, by rank, the Python API's
    tops = ok(port, {"input_ids": PROMPT_IDS, "sampling_params": GREEDY, "return_logprob": True,
                     "top_logprobs_num": 2})["meta_info"]["output_top_logprobs"]
    want = _python_api(srv, PROMPT_IDS, temperature=0, max_tokens=6, ignore_eos=True, logprobs=2).outputs[0]
    assert [[t for _, t, _ in row] for row in tops] == [
        [t for t, _ in sorted(e.items(), key=lambda kv: kv[1].rank)[:2]] for e in want.logprobs]
    assert [row[0][1] for row in tops] == want.token_ids  # greedy: the top token is the one sampled

    # prompt logprobs from logprob_start_len, SGLang's [logprob, id, null] with null for the first token
    start = ok(port, {"input_ids": PROMPT_IDS, "sampling_params": GREEDY, "return_logprob": True,
                      "logprob_start_len": 0})["meta_info"]["input_token_logprobs"]
    assert [t for _, t, _ in start] == PROMPT_IDS and start[0][0] is None and all(lp < 0 for lp, _, _ in start[1:])

    # streamed: SGLang's `data:` events, cumulative, ending with [DONE]; the last equals the whole answer
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/generate", body=json.dumps({"input_ids": PROMPT_IDS, "sampling_params": GREEDY,
                                                        "stream": True, "return_routed_experts": True}),
                 headers={"Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type") == "text/event-stream"
    events = [e[len("data: "):] for e in resp.read().decode().split("\n\n") if e]
    conn.close()
    assert events[-1] == "[DONE]" and len(events) >= 3
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["output_ids"] == got["output_ids"] and chunks[-1]["text"] == got["text"]
    assert chunks[-1]["meta_info"]["routed_experts"] == meta["routed_experts"]
    assert [len(c["output_ids"]) for c in chunks] == sorted(len(c["output_ids"]) for c in chunks)


def test_a_batch_of_prompts_with_n_samples_each(front):
    """SGLang's batch and parallel sampling: 2 prompts x n=2, each prompt its own seed; the answer is a list, prompt
    by prompt with each prompt's samples together, each result the tokens and logprobs the Python API gives that
    prompt's sample (SamplingParams(n=2, seed).sample(j): seed + j, as LLM.generate runs n). Streamed, every event
    carries its result's index, and each index's last event is that result."""
    srv, port = front
    prompts = [PROMPT_IDS, [9, 8, 7, 6]]
    sp = [{"temperature": 0.9, "max_new_tokens": 5, "ignore_eos": True, "n": 2, "seed": seed} for seed in (11, 23)]
    body = {"input_ids": prompts, "sampling_params": sp, "return_logprob": True, "rid": "b"}
    got = ok(port, body)
    assert isinstance(got, list) and len(got) == 4
    for i, prompt in enumerate(prompts):
        params = SamplingParams(temperature=0.9, max_tokens=5, ignore_eos=True, n=2, seed=sp[i]["seed"], logprobs=0)
        for j in range(2):
            async def run(p=params.sample(j), prompt=prompt, rid=f"oracle-b-{i}-{j}"):
                last = None
                async for last in srv.engine.generate(rid, prompt, p):
                    pass
                return last.outputs[0]
            want = srv.call(run(), timeout=60)
            res = got[2 * i + j]
            assert res["output_ids"] == want.token_ids and res["meta_info"]["id"] == f"b_{i}"
            assert res["meta_info"]["prompt_tokens"] == len(prompt)
            assert [t for _, t, _ in res["meta_info"]["output_token_logprobs"]] == want.token_ids
            # four requests batched against one alone, float32 without the batch-invariant mode: the last bits move
            # (2.4e-6 measured here; docs/rl.md, "Batch-invariant mode")
            assert [lp for lp, _, _ in res["meta_info"]["output_token_logprobs"]] == pytest.approx(
                [e[t].logprob for t, e in zip(want.token_ids, want.logprobs)], abs=1e-4)
    # one prompt with n = 2 is a list too (SGLang's is_single is false); text prompts as a batch
    two = ok(port, {"text": "The quick brown fox", "sampling_params": {**sp[0], "n": 2}})
    assert isinstance(two, list) and len(two) == 2
    texts = ok(port, {"text": ["The quick", "brown fox"], "sampling_params": GREEDY})
    for res, text in zip(texts, ["The quick", "brown fox"]):
        want = _python_api(srv, text, temperature=0, max_tokens=6, ignore_eos=True).outputs[0]
        assert res["output_ids"] == want.token_ids and res["text"] == want.text

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/generate", body=json.dumps({**body, "stream": True, "rid": "s"}),
                 headers={"Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    events = [e[len("data: "):] for e in resp.read().decode().split("\n\n") if e]
    conn.close()
    assert resp.status == 200 and events[-1] == "[DONE]"
    last: dict = {}
    for e in events[:-1]:
        chunk = json.loads(e)
        last[chunk["index"]] = chunk
    assert sorted(last) == [0, 1, 2, 3]
    for k, res in last.items():
        assert res["output_ids"] == got[k]["output_ids"] and res["meta_info"]["finish_reason"] is not None
        assert res["meta_info"]["id"] == f"s_{k // 2}"
    assert not srv.server.serving.registry.active


def test_generate_refusals_name_the_field(front):
    _, port = front
    assert refused(port, b"{not json", raw=True)[0] == "body"
    assert refused(port, {"input_ids": PROMPT_IDS, "image_data": "x"})[0] == "image_data"
    assert refused(port, {})[0] == "text"
    assert refused(port, {"text": []})[0] == "text"
    assert refused(port, {"text": ["a", 3]})[0] == "text[1]"
    assert refused(port, {"input_ids": [PROMPT_IDS, [1, "x"]]})[0] == "input_ids[1]"
    assert refused(port, {"input_ids": [1, [2]]})[0] == "input_ids"
    batch = {"input_ids": [PROMPT_IDS, PROMPT_IDS[:3]]}
    assert refused(port, {**batch, "sampling_params": [{}]})[0] == "sampling_params"  # one per prompt
    assert refused(port, {"input_ids": PROMPT_IDS, "sampling_params": [{}]})[0] == "sampling_params"
    assert refused(port, {**batch, "sampling_params": [{"n": 2}, {"n": 3}]})[0] == "sampling_params[1].n"
    assert refused(port, {**batch, "sampling_params": [{}, {"temperature": "hot"}]})[0] == \
        "sampling_params[1].temperature"
    max_n = front[0].server.serving.limits.max_n  # --max-n (vLLM's 16384)
    assert refused(port, {**batch, "sampling_params": {"n": max_n + 1}})[0] == "sampling_params.n"
    assert refused(port, {**batch, "rid": ["only-one"]})[0] == "rid"
    assert refused(port, {**batch, "rid": ["same", "same"]})[0] == "rid"
    assert refused(port, {**batch, "return_logprob": [True, False]})[0] == "return_logprob"
    assert refused(port, {**batch, "lora_path": ["a"]})[0] == "lora_path"
    param, message = refused(port, {"input_ids": PROMPT_IDS, "sampling_params": {"beam_width": 2}})
    assert param == "sampling_params.beam_width" and "max_new_tokens" in message
    assert refused(port, {"input_ids": PROMPT_IDS, "sampling_params": {"temperature": "hot"}})[0] == \
        "sampling_params.temperature"
    assert refused(port, {"input_ids": PROMPT_IDS, "sampling_params": {"n": 0}})[0] == "sampling_params.n"
    assert refused(port, {"input_ids": PROMPT_IDS, "return_logprob": "yes"})[0] == "return_logprob"
    assert refused(port, {"input_ids": PROMPT_IDS, "logprob_start_len": 0})[0] == "return_logprob"
    assert refused(port, {"input_ids": PROMPT_IDS, "return_logprob": True, "logprob_start_len": 99})[0] == \
        "logprob_start_len"
    assert refused(port, {"input_ids": PROMPT_IDS, "stream": 1})[0] == "stream"
    assert refused(port, {"input_ids": PROMPT_IDS, "return_logprob": True, "top_logprobs_num": 21})[0] == \
        "top_logprobs_num"  # --max-logprobs (20)
    assert refused(port, {"input_ids": PROMPT_IDS, "sampling_params": {"stop": ["x"] * 33}})[0] == \
        "sampling_params.stop"  # --max-stop-strings (32)
    param, message = refused(port, {"input_ids": PROMPT_IDS, "sampling_params": {"max_new_tokens": 0}})
    assert param == "sampling_params.max_new_tokens" and message.startswith("sampling_params.max_new_tokens=0 is "
                                                                            "invalid: must be")  # SamplingParams' check
    status, out = post(port, {"input_ids": PROMPT_IDS, "lora_path": "nope"})
    assert status == 400 and "lora_path" in json.loads(out)["error"]["message"]
    # Issue 76 (found beside item 12): a seed past int64 killed the engine loop at the rank (torch's generator
    # overflowed: every user 503 after it); a lone surrogate in text was a 500 from the tokenizer.
    param, message = refused(port, {"input_ids": PROMPT_IDS, "sampling_params": {"seed": 1 << 70}})
    assert param == "sampling_params.seed" and "[-2^63, 2^63)" in message
    assert refused(port, b'{"text": ["ok", "a\\udfff"]}', raw=True)[0] == "text[1]"
    assert ok(port, {"input_ids": PROMPT_IDS, "sampling_params": {**GREEDY, "temperature": 0.8, "seed": (1 << 63) - 1,
                                                                  "n": 2}})
    # n greedy samples are refused, as vLLM 0.32's SamplingParams refuses them (n copies)
    assert refused(port, {"input_ids": PROMPT_IDS, "sampling_params": {**GREEDY, "n": 2}})[0] == "sampling_params.n"


def test_a_client_that_leaves_ends_its_request(front):
    """A streamed and a non-streamed /generate whose client closes its connection end in the engine (nothing left
    running or holding KV blocks), well before max_new_tokens."""
    import socket

    from tests.helpers.waits import wait_until

    srv, port = front
    serving = srv.server.serving
    for stream in (True, False):
        body = json.dumps({"input_ids": PROMPT_IDS, "stream": stream, "sampling_params": {
            "max_new_tokens": 400, "ignore_eos": True, "temperature": 0}}).encode()
        before = serving.registry.generated_tokens_total
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(b"POST /generate HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + KEY.encode()
                     + b"\r\ncontent-type: application/json\r\ncontent-length: " + str(len(body)).encode()
                     + b"\r\n\r\n" + body)
        wait_until(lambda: serving.registry.active, 30, "the request to start")
        sock.close()
        wait_until(lambda: not serving.registry.active and serving.stats().num_running == 0, 30,
                   "the request of the client that left to end")
        assert serving.registry.generated_tokens_total - before < 400
    assert wait_until(lambda: serving.stats().num_free_blocks == serving.stats().num_total_blocks, 10,
                      "every KV block to be free")


def test_abort_request_ends_a_request_by_its_rid(front):
    """SGLang's /abort_request (what slime sends each worker): `rid` ends that request, its stream closing with
    finish_reason abort; `abort_all` refused naming --enable-weight-updates on a server without it; the key asked."""
    import threading

    from tests.helpers.waits import wait_until

    srv, port = front
    serving = srv.server.serving
    got: dict = {}

    def run():
        got["answer"] = post(port, {"input_ids": PROMPT_IDS, "rid": "to-abort", "sampling_params": {
            "max_new_tokens": 400, "ignore_eos": True, "temperature": 0}})
    t = threading.Thread(target=run)
    t.start()
    wait_until(lambda: serving.registry.running("to-abort", "host:127.0.0.1"), 30, "the request to start")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/abort_request", body=json.dumps({"rid": "to-abort"}),
                 headers={"Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert (resp.status, json.loads(resp.read())) == (200, {"success": True, "num_aborted": 1})
    conn.close()
    t.join(30)
    status, out = got["answer"]
    meta = json.loads(out)["meta_info"]
    assert status == 200 and meta["finish_reason"]["type"] == "abort" and meta["completion_tokens"] < 400

    def abort(body, key=KEY):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("POST", "/abort_request", body=json.dumps(body), headers={"Authorization": f"Bearer {key}"})
        r = c.getresponse()
        try:
            return r.status, json.loads(r.read())
        finally:
            c.close()
    assert abort({"rid": "to-abort"}, key="wrong")[0] == 401
    status, out = abort({"abort_all": True})
    assert status == 403 and "--enable-weight-updates" in out["error"]["message"]
    assert abort({"rid": "gone-already"}) == (200, {"success": True, "num_aborted": 0})
    assert abort({"rid": 5})[1]["error"]["param"] == "rid" and abort({"all": True})[1]["error"]["param"] == "all"


# -- issue 76 (hardening round 6) ---------------------------------------------------------------------------------
def _send_raw(port: int, body: bytes, headers: dict | None = None, method: bytes = b"POST",
              path: bytes = b"/generate"):
    """A connection that sent one request (the key, `headers`), for a test to read from or to hang up. It asks
    `connection: close`: a test reads its answer to the end of the connection (the front keeps one otherwise)."""
    import socket

    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = [method + b" " + path + b" HTTP/1.1", b"host: x", b"authorization: Bearer " + KEY.encode(),
            b"content-type: application/json", b"content-length: " + str(len(body)).encode(), b"connection: close"]
    head += [k.encode() + b": " + v.encode() for k, v in (headers or {}).items()]
    sock.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
    return sock


def test_a_hung_up_batch_is_aborted_in_one_pass(front):
    """Issue 76 item 2: a client sends a batch of B prompts x n samples and hangs up; its B x n aborts reach the
    engine thread together and end in one pass over the scheduler's queues (one finish_requests for all of them),
    not one pass per sequence (quadratic: 128,000 sequences held every user's steps for over 25 minutes). The
    engine thread is held inside a step while the aborts queue up, so they are all there when it drains them."""
    from tests.helpers.engine_steps import EngineSteps
    from tests.helpers.waits import wait_until

    srv, port = front
    llm = srv.engine.engine
    sched = llm.schedulers[0]
    calls: list[int] = []
    real = sched.finish_requests

    def counting(ids, status):
        ids = list(ids)
        calls.append(len(ids))
        return real(ids, status)

    sched.finish_requests = counting
    steps = EngineSteps(llm)
    total = 2 * 64
    try:
        body = json.dumps({"input_ids": [PROMPT_IDS, PROMPT_IDS[:4]], "sampling_params": {
            "n": 64, "max_new_tokens": 400, "ignore_eos": True, "temperature": 0.8}}).encode()
        sock = _send_raw(port, body)
        wait_until(lambda: sched.get_num_unfinished_requests() == total, 60, "the batch's sequences to be added")
        steps.hold()
        assert steps.wait_parked(30)
        sock.close()  # the hang-up: every sequence's abort is sent while the engine thread is parked
        wait_until(lambda: srv.engine._commands.qsize() >= total, 30, "every sequence's abort to be queued")
        calls.clear()
        steps.release()
        wait_until(lambda: sched.get_num_unfinished_requests() == 0, 30, "the batch to be aborted")
    finally:
        steps.close()
        del sched.finish_requests
    assert calls == [total], f"finish_requests calls (ids in each): {calls[:8]}... ({len(calls)} calls)"


def test_prompt_logprobs_are_sent_once_per_prompt(front):
    """Issue 76 item 10: a prompt's logprobs (logprob_start_len) are the same for its n samples; they come once, in
    its sample 0's meta_info (streamed: the first event that has them), never once per sample or per event (a 0.09 MB
    request was answered with 85.5 MB)."""
    _, port = front
    body = {"input_ids": PROMPT_IDS, "return_logprob": True, "logprob_start_len": 0,
            "sampling_params": {"n": 3, "max_new_tokens": 3, "ignore_eos": True, "temperature": 0.8, "seed": 5}}
    got = ok(port, body)
    lps = [r["meta_info"]["input_token_logprobs"] for r in got]
    assert [t for _, t, _ in lps[0]] == PROMPT_IDS and lps[1:] == [None, None]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/generate", body=json.dumps({**body, "stream": True}),
                 headers={"Authorization": f"Bearer {KEY}"})
    events = [json.loads(e[len("data: "):]) for e in conn.getresponse().read().decode().split("\n\n")
              if e and e != "data: [DONE]"]
    conn.close()
    carrying = [e for e in events if e["meta_info"]["input_token_logprobs"] is not None]
    assert len(events) >= 6 and len(carrying) == 1 and carrying[0]["index"] == 0
    assert carrying[0]["meta_info"]["input_token_logprobs"] == lps[0]


def test_generate_requests_carry_their_client(front):
    """Issue 76 item 10: a /generate request carries who sent it to the scheduler's fair shares, as a gRPC call
    does: its host, then the user its `x-client-id` names (the server requires a key) or else its connection.
    Before, every /generate user was one client: a 20,000-prompt batch kept another waiting 261 s."""
    srv, port = front
    llm = srv.engine.engine
    seen: list[tuple] = []
    real = llm.add_core

    def recording(processed):
        seen.append(processed.client)
        return real(processed)

    llm.add_core = recording
    try:
        assert post(port, {"input_ids": PROMPT_IDS, "sampling_params": GREEDY})[0] == 200
        sock = _send_raw(port, json.dumps({"input_ids": PROMPT_IDS, "sampling_params": GREEDY}).encode(),
                         {"x-client-id": "alice"})
        assert sock.recv(12) == b"HTTP/1.1 200"
        sock.close()
    finally:
        del llm.add_core
    assert seen[0][0] == "host:127.0.0.1" and seen[0][1].startswith("conn:")
    assert seen[1] == ("host:127.0.0.1", "user:alice")  # the name under its host (issue 95)


def test_a_rid_is_scoped_to_its_client(front):
    """Issue 76 item 12: two clients may use the same `rid` at once; neither learns that the other's runs (a 409
    said it), and /abort_request ends the caller's own request, never another's."""
    import threading

    from tests.helpers.waits import wait_until

    srv, port = front
    serving = srv.server.serving
    long_body = json.dumps({"input_ids": PROMPT_IDS, "rid": "same", "sampling_params": {
        "max_new_tokens": 400, "ignore_eos": True, "temperature": 0}}).encode()
    got: dict = {}

    def alice():
        sock = _send_raw(port, long_body, {"x-client-id": "alice"})
        got["alice"] = b"".join(iter(lambda: sock.recv(1 << 16), b""))
        sock.close()
    t = threading.Thread(target=alice)
    t.start()
    wait_until(lambda: serving.registry.running("same", "user:alice"), 30, "alice's request to start")

    def as_bob(body, path=b"/generate"):
        sock = _send_raw(port, json.dumps(body).encode(), {"x-client-id": "bob"}, path=path)
        answer = b"".join(iter(lambda: sock.recv(1 << 16), b""))
        sock.close()
        head, _, out = answer.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(out.split(b"\r\n", 1)[1].rsplit(b"\r\n0\r\n", 1)[0]
                                                if b"chunked" in head.lower() else out)
    status, out = as_bob({"input_ids": PROMPT_IDS, "rid": "same", "sampling_params": GREEDY})
    assert status == 200 and out["meta_info"]["id"] == "same", out
    assert as_bob({"rid": "same"}, b"/abort_request") == (200, {"success": True, "num_aborted": 0})
    assert serving.registry.running("same", "user:alice")  # bob's abort did not reach it
    sock = _send_raw(port, json.dumps({"rid": "same"}).encode(), {"x-client-id": "alice"}, path=b"/abort_request")
    assert b'"num_aborted": 1' in b"".join(iter(lambda: sock.recv(1 << 16), b""))
    sock.close()
    t.join(30)
    meta = json.loads(got["alice"].partition(b"\r\n\r\n")[2])["meta_info"]
    assert meta["finish_reason"]["type"] == "abort" and meta["completion_tokens"] < 400


def test_batch_and_body_bounds(front):
    """Issue 76 items 2 and 8: a /generate batch over --max-batch-sequences (prompts x n) is refused with a 400
    naming the prompts' field and the flag, before anything runs; a body over --max-http-body-bytes gets a 413 from
    its Content-Length, before a byte of it is read."""
    srv, port = front
    limits = srv.server.serving.limits
    n = limits.max_batch_sequences // 2 + 1  # two prompts x n: one sequence past the bound
    param, message = refused(port, {"text": ["a"] * 2, "sampling_params": {"n": n}})
    assert param == "text" and f"{2 * n} sequences" in message and "--max-batch-sequences" in message
    param, message = refused(port, {"input_ids": [[1]] * (limits.max_prompts_per_request + 1)})
    assert param == "input_ids" and "--max-prompts-per-request" in message  # counted before any is read (issue 95)
    import socket

    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /generate HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + KEY.encode()
                 + b"\r\ncontent-length: " + str(limits.max_http_body_bytes + 1).encode() + b"\r\n\r\n")
    answer = sock.recv(1 << 16)  # no body was sent: the answer comes from the head alone
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413") and b"--max-http-body-bytes" in answer, answer[:300]


def test_head_requests_get_an_answer(front):
    """Issue 76 item 12: HEAD on a route the front answers itself gets the GET's status and headers without a body
    (or 404 / 405), never a dropped connection with a traceback in the log."""
    _, port = front
    for path, status in (("/version", 200), ("/generate", 405), ("/nope", 404), ("/metrics", 404)):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("HEAD", path, headers={"Authorization": f"Bearer {KEY}"})
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (status, b""), path
        assert int(resp.getheader("content-length")) > 0  # the headers a GET would get
        conn.close()


def test_large_bodies_are_parsed_off_the_event_loop(monkeypatch):
    """Issue 76 item 8: the body of /generate and of an RL control route, when large, is parsed and checked on a
    worker thread, not on the event loop every stream shares (a 60 MB body paused every stream 9.5 s); a small one
    stays on the loop. In process: the parsers are wrapped to say which thread they ran on."""
    import asyncio
    import threading

    from moelink.engine.server.gateway import generate_route, rl_routes
    from moelink.engine.server.gateway.json_body import INLINE_BODY_BYTES
    from moelink.engine.server.gateway.openai_fields import HttpFieldError

    threads: list[str] = []

    def generate_parse(body, serving):
        threads.append(threading.current_thread().name)
        raise HttpFieldError("text", "stop here")

    def rl_parse(route, path, body, query):
        threads.append(threading.current_thread().name)
        raise rl_routes._Refused("stop here", None)

    monkeypatch.setattr(generate_route, "read_request", generate_parse)
    monkeypatch.setattr(rl_routes, "_body", rl_parse)
    big, small = b" " * (INLINE_BODY_BYTES + 1) + b"{}", b"{}"

    async def run():
        loop_thread = threading.current_thread().name
        route, rl = generate_route.GenerateRoute(serving=None), rl_routes.RlRoutes(engine=None, enabled=True)
        for body in (big, small):
            assert (await route.answer(b"POST", "/generate", body))[0] == 400
            assert (await rl.answer(b"POST", "/update_weights_from_disk", body))[0] == 400
        return loop_thread

    loop_thread = asyncio.run(run())
    assert threads[0] != loop_thread and threads[1] != loop_thread, threads
    assert threads[2:] == [loop_thread, loop_thread]
