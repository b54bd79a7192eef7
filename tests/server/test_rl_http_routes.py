"""The RL control calls on the HTTP port (engine/server/gateway/rl_routes.py; docs/rl.md#over-http): SGLang's routes
and vLLM's, through the front, answered from the engine beside it. The key is asked for them though they are not
under /v1; a call the engine does not take without --enable-weight-updates is 403 naming it; fields are checked
(an unknown one refused, naming it), vLLM's query-string form taken; a front with no engine beside it never relays
them to smg, whose /flush_cache is its control plane's."""
from __future__ import annotations

import asyncio
import http.client
import json

import pytest

from moelink.engine.server.gateway.generate_route import GenerateRoute
from moelink.engine.server.gateway.http_front import HttpFront
from moelink.engine.server.gateway.rl_routes import ChainedRoutes, RlRoutes

from tests.helpers.net import free_port

KEY = "rl-http-key"


def _call(port: int, method: str, path: str, body=None, key: str | None = KEY) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


@pytest.mark.slow  # an engine and a weight update from disk: about 3 s
def test_control_routes_over_http(thread_server, model_path):
    srv = thread_server(engine_kw={"enable_weight_updates": True})
    front = HttpFront("127.0.0.1", free_port(), free_port(), KEY,
                      local=ChainedRoutes(_NoModels(), RlRoutes(srv.engine, srv.engine.takes_control_calls),
                                          GenerateRoute(srv.server.serving)))
    srv.call(front.start())
    port = front.port
    try:
        status, body = _call(port, "POST", "/update_weights_from_disk", {"model_path": model_path}, key=None)
        assert status == 401  # not under /v1, still the key's
        assert _call(port, "GET", "/get_weight_version") == (200, {"weight_version": None})
        # /generate (test_generate_route.py) on an engine started without --enable-return-routed-experts: the
        # field refused naming the flag, as the Python API refuses it
        status, body = _call(port, "POST", "/generate", {"input_ids": [5, 17], "return_routed_experts": True})
        assert status == 400 and "--enable-return-routed-experts" in body["error"]["message"]
        status, body = _call(port, "POST", "/update_weights_from_disk",
                             {"model_path": model_path, "weight_version": "v2"})
        assert status == 200 and body["success"] is True and body["weight_version"] == "v2" and body["bytes_read"] > 0
        assert _call(port, "GET", "/get_weight_version") == (200, {"weight_version": "v2"})
        status, body = _call(port, "POST", "/update_weights_from_disk", {"model_path": model_path, "abort": True})
        assert status == 400 and body["error"]["param"] == "abort" and body["success"] is False
        status, body = _call(port, "POST", "/update_weights_from_disk", {"model_path": "/nowhere"})
        assert status == 400 and "model_path='/nowhere'" in body["message"]
        status, body = _call(port, "POST", "/update_weights_from_disk", {})
        assert status == 400 and body["error"]["param"] == "model_path"
        status, body = _call(port, "POST", "/update_weights_from_disk", {"model_path": model_path,
                                                                         "rollback_bytes": 1000})
        assert status == 400 and "rollback_bytes=1000 is too small" in body["message"]
        assert _call(port, "GET", "/pause_generation")[0] == 405
        status, body = _call(port, "POST", "/pause_generation", {"mode": "abort"})
        assert status == 200 and body["mode"] == "abort"
        assert _call(port, "POST", "/pause_generation", {"mode": "later"})[0] == 400
        assert _call(port, "POST", "/continue_generation")[1]["success"] is True
        # vLLM's /pause, /resume, /is_paused (what smg's RL control plane fans out to a worker it sees as vLLM)
        assert _call(port, "GET", "/is_paused") == (200, {"is_paused": False})
        status, body = _call(port, "POST", "/pause?mode=keep")  # vLLM's default clear_cache=true: refused with keep
        assert status == 400 and "clear_cache" in body["message"] and _call(port, "GET", "/is_paused")[1] == \
            {"is_paused": False}
        status, body = _call(port, "POST", "/pause?mode=keep&clear_cache=false")
        assert status == 200 and body["mode"] == "keep" and "num_blocks_freed" not in body
        assert _call(port, "GET", "/is_paused") == (200, {"is_paused": True})
        assert _call(port, "POST", "/resume")[1]["success"] is True
        assert _call(port, "GET", "/is_paused") == (200, {"is_paused": False})
        status, body = _call(port, "POST", "/pause?wait_for_inflight_requests=true")  # vLLM's older form
        assert status == 200 and body["mode"] == "wait" and body["num_blocks_freed"] >= 0
        assert _call(port, "POST", "/resume")[0] == 200
        status, body = _call(port, "POST", "/pause", {"mode": "wait", "wait_for_inflight_requests": True})
        assert status == 400 and body["error"]["param"] == "wait_for_inflight_requests"
        status, body = _call(port, "POST", "/pause?clear_cache=maybe")
        assert status == 400 and body["error"]["param"] == "clear_cache"
        status, body = _call(port, "POST", "/pause")  # vLLM's defaults: abort, clear the cache
        assert status == 200 and body["mode"] == "abort" and "num_blocks_freed" in body
        assert _call(port, "POST", "/resume")[0] == 200
        status, body = _call(port, "POST", "/flush_cache")
        assert status == 200 and body["num_blocks_freed"] >= 0
        assert _call(port, "POST", "/reset_prefix_cache")[0] == 200
        status, body = _call(port, "POST", "/sleep?level=1")  # vLLM's form
        assert status == 200 and body["level"] == 1 and body["bytes_freed"] > 0
        assert _call(port, "GET", "/is_sleeping") == (200, {"is_sleeping": True})
        assert _call(port, "POST", "/sleep?level=1")[0] == 400  # asleep already, said
        assert _call(port, "POST", "/wake_up?tags=weights&tags=kv_cache")[1]["success"] is True
        assert _call(port, "GET", "/is_sleeping") == (200, {"is_sleeping": False})
        status, body = _call(port, "POST", "/sleep?level=x")
        assert status == 400 and body["error"]["param"] == "level"
        status, body = _call(port, "POST", "/release_memory_occupation", {"tags": ["weights"]})
        assert status == 400 and body["error"]["param"] == "tags"
        assert _call(port, "POST", "/release_memory_occupation", {})[0] == 200
        assert _call(port, "POST", "/resume_memory_occupation", {"tags": ["weights", "kv_cache"]})[0] == 200
        status, body = _call(port, "POST", "/destroy_weights_update_group", {"group_name": "none"})
        assert status == 400 and "'none'" in body["message"]
    finally:
        srv.call(front.stop())


class _NoModels:
    """The model's routes of the chain (vllm_routes.VllmRoutes in a server): none answered here."""

    async def answer(self, method, path, body, query="", client=()):
        return None


class _Disabled:
    async def control(self, call, *args):
        from moelink.engine.rl.errors import ControlDisabled

        raise ControlDisabled(f"{call} is refused: start the engine with enable_weight_updates=True "
                              "(--enable-weight-updates) to take RL control calls.")


def test_without_the_flag_a_call_is_403_naming_it():
    routes = RlRoutes(_Disabled(), True)  # the engine refuses the call itself
    status, body = asyncio.run(routes.answer(b"POST", "/pause_generation", b'{"mode": "wait"}'))
    assert status == 403 and "--enable-weight-updates" in json.loads(body)["message"]
    off = RlRoutes(_Disabled(), False)  # the wire refuses what the engine lets its own callers do: the flush
    status, body = asyncio.run(off.answer(b"POST", "/flush_cache", b""))
    assert status == 403 and "--enable-weight-updates" in json.loads(body)["message"]
    assert asyncio.run(routes.answer(b"POST", "/v1/completions", b"{}")) is None  # not a control route


def test_a_front_with_no_engine_beside_it_never_relays_them():
    async def run():
        front = HttpFront("127.0.0.1", free_port(), free_port())  # `moelink http-front`: nothing answers locally
        await front.start()
        try:
            return await asyncio.to_thread(_call, front.port, "POST", "/flush_cache", None, None)
        finally:
            await front.stop()
    status, body = asyncio.run(run())
    assert status == 404 and "gRPC Control" in body["error"]["message"]


class _Recording:
    """An engine that answers every control call, noting it: what the route refuses never reaches it."""

    def __init__(self):
        self.calls: list = []

    async def control(self, call, *args):
        self.calls.append((call, args))
        return {"bytes_read": 0, "seconds": 0.0, "weight_version": None, "message": "ok"}


def test_a_weight_version_is_a_bounded_label_refused_before_the_engine():
    """issue 76 item 7: a 60 MB weight_version was echoed into every user's outputs; at most 256 printable ASCII
    characters now, refused (400 naming the field) before the engine is asked."""
    engine = _Recording()
    routes = RlRoutes(engine, True)
    for path, body in (("/update_weights_from_disk", {"model_path": "/m"}),
                       ("/update_weights_from_distributed", {"names": ["a"], "dtypes": ["float32"], "shapes": [[1]]})):
        for bad in ("v" * 257, "v2\r\nX-Injected: 1", "v\u00e9"):
            status, raw = asyncio.run(routes.answer(b"POST", path, json.dumps({**body, "weight_version": bad}).encode()))
            err = json.loads(raw)["error"]
            assert status == 400 and err["param"] == "weight_version" and "256 printable ASCII" in err["message"]
            assert len(raw) < 2000  # the label is not echoed back whole
        status, _ = asyncio.run(routes.answer(b"POST", path, json.dumps({**body, "weight_version": "v" * 256}).encode()))
        assert status == 200
    assert [c for c, _ in engine.calls] == ["update_weights_from_disk", "update_weights_from_distributed"]


def test_a_join_takes_its_timeout_and_refuses_a_bad_one():
    engine = _Recording()
    routes = RlRoutes(engine, True)
    body = {"master_address": "127.0.0.1", "master_port": 29500, "rank_offset": 1, "world_size": 2}
    status, _ = asyncio.run(routes.answer(b"POST", "/init_weights_update_group",
                                          json.dumps({**body, "join_timeout_s": 5}).encode()))
    assert status == 200 and engine.calls[-1][1][-1] == 5
    status, raw = asyncio.run(routes.answer(b"POST", "/init_weights_update_group",
                                            json.dumps({**body, "join_timeout_s": "forever"}).encode()))
    assert status == 400 and json.loads(raw)["error"]["param"] == "join_timeout_s" and len(engine.calls) == 1
