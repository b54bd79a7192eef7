"""The SGLang-shaped RL frameworks (issue 97): slime's, verl's and AReaL's client code against moelink's HTTP port
(engine/server/gateway/rl_routes.py, generate_route.py, sglang_routes.py; docs/rl.md#slime, #verl, #areal).

Each framework's recorded transcript (tests/fixtures/rl_transcripts/{slime,verl,areal}.json: the method, path and
body sequence its client sends in one rollout cycle, read from its source) is replayed against a server with
--enable-weight-updates and --enable-return-routed-experts; every answer is 2xx and parsed the way the framework
parses SGLang's /generate (meta_info.output_token_logprobs as [logprob, id], meta_info.routed_experts as base64 int32
of (prompt + completion - 1) rows), and the generation after the update equals a fresh server's on the new weights.
slime's and AReaL's weights come from a trainer whose group is made exactly as SGLang's init_custom_process_group
makes it (torch's tcp rendezvous, PrefixStore(group_name), _new_process_group_helper) and broadcast tensor by tensor
on gloo; verl's as SGLang's flattened buckets, serialized by ForkingPickler of CPU tensors (the "file_system"
sharing strategy) and base64, as MultiprocessingSerializer.serialize(..., output_str=True) writes them."""
from __future__ import annotations

import base64
import dataclasses
import datetime
import http.client
import io
import json
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from moelink.engine.server.gateway.generate_route import GenerateRoute
from moelink.engine.server.gateway.http_front import HttpFront
from moelink.engine.server.gateway.rl_routes import ChainedRoutes, RlRoutes
from moelink.engine.server.gateway.sglang_routes import SglangRoutes

from tests.helpers.net import free_port
from tests.helpers.weight_checkpoints import checkpoint_tensors, filled, perturbed, saved_checkpoint

KEY = "sglang-rl-key"
TRANSCRIPTS = Path(__file__).resolve().parents[1] / "fixtures" / "rl_transcripts"
PROMPT = [5, 17, 42, 8, 99, 3, 61]
ROUTED_ENGINE = {"enable_weight_updates": True, "enable_return_routed_experts": True}


class _NoModels:
    async def answer(self, method, path, body, query="", client=()):
        return None


class _Front:
    """moelink's HTTP front over a thread server's engine with the routes `moelink serve` chains (managed.py)."""

    def __init__(self, srv, key=KEY):
        serving = srv.server.serving
        self.srv, self.key = srv, key
        local = ChainedRoutes(_NoModels(), RlRoutes(srv.engine, srv.engine.takes_control_calls,
                                                    abort_all=serving.abort_all),
                              GenerateRoute(serving), SglangRoutes(serving))
        # not_serving: the managed gateway is up (no smg here), so /health is answered as `moelink serve` answers it
        self.front = HttpFront("127.0.0.1", free_port(), free_port(), key, local=local, not_serving=lambda: None)
        srv.call(self.front.start())

    def call(self, method: str, path: str, body=None, key: str | None = KEY) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.front.port, timeout=120)
        try:
            headers = {"Content-Type": "application/json"}
            if key:
                headers["Authorization"] = f"Bearer {key}"
            conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def close(self) -> None:
        self.srv.call(self.front.stop())


# -- the frameworks' side ------------------------------------------------------------------------------------------

def sglang_generate(raw: bytes) -> dict:
    """What slime's generate (sglang_rollout.py) and AReaL's parse_generation_response read of SGLang's answer."""
    out = json.loads(raw)
    meta = out["meta_info"]
    assert isinstance(out["text"], str) and meta["finish_reason"]["type"] in ("length", "stop")
    ids = [x[1] for x in meta["output_token_logprobs"]]
    lps = [x[0] for x in meta["output_token_logprobs"]]
    rows = meta["prompt_tokens"] + meta["completion_tokens"] - 1
    routed = np.frombuffer(base64.b64decode(meta["routed_experts"].encode()), dtype=np.int32).reshape(rows, -1)
    return {"ids": ids, "logprobs": lps, "routed_experts": routed}


PARSERS = {"sglang_generate": sglang_generate}


def sglang_trainer_group(port: int, world_size: int, group_name: str, timeout_s: float = 60.0):
    """Rank 0 of a group made as SGLang's init_custom_process_group makes it (slime's and AReaL's copies of it):
    torch's tcp:// rendezvous, the store wrapped in PrefixStore(group_name), then _new_process_group_helper."""
    from torch.distributed.distributed_c10d import (Backend, PrefixStore, _new_process_group_helper, _world,
                                                    rendezvous)

    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world = next(rendezvous(f"tcp://127.0.0.1:{port}", 0, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(world, rank, [], Backend("gloo"), store, group_name=group_name,
                                      backend_options=None, timeout=timeout, group_desc=group_name)
    _world.pg_group_ranks[pg] = {i: i for i in range(world)}
    return pg, store


class _Trainer(threading.Thread):
    """The trainer's rank 0: makes its group as SGLang's helper does, then broadcasts each tensor (slime's
    update_weights_from_distributed, AReaL's)."""

    def __init__(self, port: int, world_size: int, group_name: str, send: list):
        super().__init__(daemon=True)
        self.port, self.world_size, self.group_name, self.send = port, world_size, group_name, send
        self.go, self.done = threading.Event(), threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        import torch.distributed as dist

        try:
            pg, _store = sglang_trainer_group(self.port, self.world_size, self.group_name)
            self.go.wait(60.0)
            for _, t in self.send:
                dist.broadcast(t.contiguous(), 0, group=pg)
            self.done.wait(60.0)
        except BaseException as exc:  # pragma: no cover - reported by the test
            self.error = exc


def _sglang_metadata_class():
    """SGLang's FlattenedTensorMetadata as its pickle names it (sglang.srt.weight_sync.tensor_bucket), for a
    trainer without SGLang installed."""
    name = "sglang.srt.weight_sync.tensor_bucket"
    if name not in sys.modules:
        for parent in ("sglang", "sglang.srt", "sglang.srt.weight_sync"):
            sys.modules.setdefault(parent, types.ModuleType(parent))
        mod = types.ModuleType(name)

        @dataclasses.dataclass
        class FlattenedTensorMetadata:
            name: str
            shape: torch.Size
            dtype: torch.dtype
            start_idx: int
            end_idx: int
            numel: int

        FlattenedTensorMetadata.__module__ = name
        FlattenedTensorMetadata.__qualname__ = "FlattenedTensorMetadata"
        mod.FlattenedTensorMetadata = FlattenedTensorMetadata
        sys.modules[name] = mod
    return sys.modules[name].FlattenedTensorMetadata


def serialize(obj) -> str:
    """SGLang's MultiprocessingSerializer.serialize(obj, output_str=True)."""
    from multiprocessing.reduction import ForkingPickler

    buf = io.BytesIO()
    ForkingPickler(buf).dump(obj)
    return base64.b64encode(buf.getvalue()).decode("utf-8")


def flattened_bucket(named: list) -> dict:
    """SGLang's FlattenedTensorBucket (multi-dtype: every tensor flattened to bytes) as slime and verl send it."""
    meta_cls = _sglang_metadata_class()
    parts, metas, at = [], [], 0
    for name, t in named:
        b = t.contiguous().reshape(-1).view(torch.uint8)
        metas.append(meta_cls(name, t.shape, t.dtype, at, at + b.numel(), t.numel()))
        parts.append(b)
        at += b.numel()
    return {"flattened_tensor": torch.cat(parts), "metadata": metas}


# -- the replay ------------------------------------------------------------------------------------------------------

def _replay(front: _Front, transcript: dict, names: dict, trainer: _Trainer | None = None) -> dict:
    kept = {}
    for step in transcript["steps"]:
        if step.get("trainer") == "join":
            trainer.start()
        if step.get("trainer") == "broadcast":
            trainer.go.set()
        status, raw = front.call(step["method"], step["path"], filled(step.get("json"), names))
        assert 200 <= status < 300, (step["name"], status, raw[:2000])
        if step.get("parse"):
            kept[step["keep"]] = PARSERS[step["parse"]](raw)
        elif raw:
            answer = json.loads(raw)
            if "expect" in step:
                assert {k: answer.get(k) for k in step["expect"]} == step["expect"], (step["name"], answer)
            if "success" in answer:  # SGLang's {"success", "message"}: the frameworks check success
                assert answer["success"] is True, (step["name"], answer)
    return kept


@pytest.fixture
def servers(thread_server):
    made = []

    def make(path: str | None = None):
        if path is None:
            return thread_server(engine_kw=ROUTED_ENGINE)
        from tests.helpers.grpc_server import ENGINE_KW, ThreadServer

        srv = ThreadServer(path, {**ENGINE_KW, **ROUTED_ENGINE})
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.close()


def _fresh_generate(servers, path: str, transcript: dict, names: dict) -> dict:
    step = [s for s in transcript["steps"] if s.get("keep") == "after"][0]
    front = _Front(servers(path))
    try:
        status, raw = front.call(step["method"], step["path"], filled(step["json"], names))
        assert status == 200, raw
        return PARSERS[step["parse"]](raw)
    finally:
        front.close()


def _check_cycle(kept: dict, want: dict) -> None:
    before, after = kept["before"], kept["after"]
    assert len(after["logprobs"]) == len(after["ids"]) > 0
    assert after["routed_experts"].shape[0] == len(PROMPT) + len(after["ids"]) - 1
    assert before["ids"] != after["ids"] or before["logprobs"] != after["logprobs"], "the update changed nothing"
    assert after["ids"] == want["ids"]
    assert np.allclose(after["logprobs"], want["logprobs"], atol=1e-5), (after["logprobs"], want["logprobs"])
    assert np.array_equal(after["routed_experts"], want["routed_experts"])


def _distributed_cycle(servers, model_path, tmp_path, framework: str, group: str) -> None:
    transcript = json.loads((TRANSCRIPTS / f"{framework}.json").read_text())
    front = _Front(servers())
    new = perturbed(checkpoint_tensors(model_path), seed=11)
    port = free_port()
    names = {"PROMPT": PROMPT, "MASTER_PORT": port, "MASTER_PORT_STR": str(port), "WORLD_SIZE": 2,
             "NAMES": list(new), "DTYPES": [str(t.dtype).removeprefix("torch.") for t in new.values()],
             "SHAPES": [list(t.shape) for t in new.values()]}
    trainer = _Trainer(port, 2, group, list(new.items()))
    try:
        kept = _replay(front, transcript, names, trainer)
    finally:
        trainer.done.set()
        front.close()
    trainer.join(60.0)
    assert trainer.error is None, trainer.error
    _check_cycle(kept, _fresh_generate(servers, saved_checkpoint(model_path, new, tmp_path / "new"), transcript, names))


@pytest.mark.slow  # two engines, a gloo group made as SGLang makes it and a broadcast: about 10 s
def test_slime_transcript(servers, model_path, tmp_path):
    _distributed_cycle(servers, model_path, tmp_path, "slime", "slime-pp_0")


@pytest.mark.slow  # two engines, a gloo group (master_port sent as a string) and a broadcast: about 10 s
def test_areal_transcript(servers, model_path, tmp_path):
    _distributed_cycle(servers, model_path, tmp_path, "areal", "update_weight_group")


@pytest.mark.slow  # two engines and an update from serialized CPU buckets: about 8 s
def test_verl_transcript(servers, model_path, tmp_path):
    import torch.multiprocessing as mp

    transcript = json.loads((TRANSCRIPTS / "verl.json").read_text())
    front = _Front(servers())
    new = perturbed(checkpoint_tensors(model_path), seed=11)
    was = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")  # CPU tensors by named shared memory (verl's CPU senders set it too)
    try:
        bucket = flattened_bucket(list(new.items()))
        entry = serialize(bucket)
        names = {"PROMPT": PROMPT, "SERIALIZED_BUCKETS": [entry, entry]}  # one per TP rank of the sender
        kept = _replay(front, transcript, names)
    finally:
        mp.set_sharing_strategy(was)
        front.close()
    _check_cycle(kept, _fresh_generate(servers, saved_checkpoint(model_path, new, tmp_path / "new"), transcript, names))


def test_trainer_group_made_as_sglang_makes_it_meets_the_engine_side():
    """The process-group join alone (no engine): a trainer's group made as SGLang's init_custom_process_group makes
    it (one more PrefixStore(group_name) than torch's new_group) and moelink's side of it (comm/process_group.
    side_group, what every engine rank joins with) meet, and a broadcast arrives."""
    from moelink.comm.process_group import side_group

    port, got, errors = free_port(), {}, []

    def trainer():
        try:
            pg, _ = sglang_trainer_group(port, 2, "g-sglang", timeout_s=20.0)
            import torch.distributed as dist

            dist.broadcast(torch.arange(6, dtype=torch.float32), 0, group=pg)
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    th = threading.Thread(target=trainer, daemon=True)
    th.start()
    group, _store = side_group("127.0.0.1", port, 1, 2, "g-sglang", "gloo", 20.0)
    t = torch.zeros(6)
    group.broadcast(t, 0).wait()
    got["t"] = t
    th.join(30.0)
    assert not errors and torch.equal(got["t"], torch.arange(6, dtype=torch.float32))


def test_bad_fields_are_one_400_naming_the_field(servers):
    """What cannot be honoured is refused naming the field; what SGLang takes at its default is taken."""
    srv = servers()
    front = _Front(srv)
    try:
        def call(method, path, body=None):
            status, raw = front.call(method, path, body)
            return status, json.loads(raw or b"{}")

        status, body = call("POST", "/generate", {"input_ids": PROMPT, "image_data": ["aGk="]})
        assert status == 400 and body["error"]["param"] == "image_data"
        status, body = call("POST", "/generate", {"input_ids": PROMPT, "custom_logit_processor": "x"})
        assert status == 400 and body["error"]["param"] == "custom_logit_processor"
        status, body = call("POST", "/generate", {"input_ids": PROMPT, "sampling_params": {
            "max_new_tokens": 2, "custom_params": {"return_top_p_token_ids": True},
            "spaces_between_special_tokens": False}})
        assert status == 200, body
        status, body = call("POST", "/generate", {"input_ids": PROMPT, "sampling_params": {"custom_params": [1]}})
        assert status == 400 and body["error"]["param"] == "sampling_params.custom_params"
        status, body = call("POST", "/release_memory_occupation", {"tags": ["kv_cache"]})
        assert status == 400 and body["error"]["param"] == "tags"
        status, body = call("POST", "/init_weights_update_group", {"master_address": "127.0.0.1",
                                                                   "master_port": "29x", "rank_offset": 1,
                                                                   "world_size": 2})
        assert status == 400 and body["error"]["param"] == "master_port"
        status, body = call("POST", "/init_weights_update_group", {"master_address": "127.0.0.1",
                                                                   "master_port": "2950", "rank_offset": 1,
                                                                   "world_size": 2, "pp_rank": 1})
        assert status == 400 and body["error"]["param"] == "pp_rank"
        status, body = call("POST", "/update_weights_from_distributed", {"names": [], "dtypes": [], "shapes": [],
                                                                         "load_format": "flattened_bucket"})
        assert status == 400 and body["error"]["param"] == "load_format"
        status, body = call("POST", "/weights_checker", {"action": "snapshot"})
        assert status == 400 and body["error"]["param"] == "action"
        status, body = call("POST", "/pull_weights", {"target_version": 1})
        assert status == 400 and "update_weights_from_disk" in body["message"]
        status, body = call("POST", "/post_process_weights", {"restore_weights_before_load": True,
                                                              "post_process_quantization": False})
        assert status == 200 and body["success"] is True
        # serialized_named_tensors: not base64, a pickle naming what a payload never needs, a CUDA-less fd share
        status, body = call("POST", "/update_weights_from_tensor", {"serialized_named_tensors": ["%%%"]})
        assert status == 400 and body["error"]["param"] == "serialized_named_tensors"
        import pickle

        # builtins.len: print would do, but a worker that imported Ray pickles print as Ray's tqdm_ray.safe_print
        evil = base64.b64encode(pickle.dumps([("x", len)])).decode()
        status, body = call("POST", "/update_weights_from_tensor", {"serialized_named_tensors": [evil]})
        assert status == 400 and body["error"]["param"] == "serialized_named_tensors" and "builtins" in body["message"]
        import torch.multiprocessing as mp

        was = mp.get_sharing_strategy()
        mp.set_sharing_strategy("file_descriptor")
        try:
            fd_entry = serialize([("lm_head.weight", torch.zeros(2))])
        finally:
            mp.set_sharing_strategy(was)
        status, body = call("POST", "/update_weights_from_tensor", {"serialized_named_tensors": [fd_entry]})
        assert status == 400 and "file_system" in body["message"]
        # the new informational routes: the key, GET, the shapes the clients read
        assert front.call("GET", "/get_server_info", key=None)[0] == 401
        status, body = call("GET", "/get_server_info")
        assert status == 200 and body["enable_return_routed_experts"] is True and body["tp_size"] >= 1
        assert call("GET", "/server_info")[1]["model_path"] == body["model_path"]
        status, body = call("GET", "/v1/loads")
        assert status == 200 and body["loads"][0]["num_reqs"] == 0
        assert front.call("GET", "/health_generate", key=None)[0] == 200
        assert call("POST", "/get_server_info")[0] == 405
        status, body = call("POST", "/load_lora_adapter", {"lora_name": "a", "lora_path": "/nowhere"})
        assert status == 404 and "--enable-lora" in json.dumps(body)
        assert call("POST", "/flush_cache")[0] == 200 and call("GET", "/flush_cache")[0] == 200
    finally:
        front.close()


@pytest.mark.slow  # a `moelink serve` with its smg: about 15 s
def test_moelink_serve_chains_the_sglang_routes(spawn_server, model_path):
    """`moelink serve --enable-weight-updates --enable-return-routed-experts` chains the SGLang-shaped routes
    (managed.py): the info route asks the key, GET /flush_cache and /health_generate answer, and an update's
    abort_all_requests goes through the server's own abort (Serving.abort_all)."""
    from tests.helpers.smg_gateway import smg_executable

    if smg_executable() is None:
        pytest.skip("the smg gateway (PyPI `smg`) is not installed")
    srv = spawn_server("--http-port", str(free_port()), "--api-key", KEY, "--enable-weight-updates",
                       "--enable-return-routed-experts")
    port = int(srv.wait_for_line(r"moelink: OpenAI API on http://127\.0\.0\.1:(\d+)/v1 ", 90, "the API line").group(1))
    front = _Front.__new__(_Front)
    front.key, front.front = KEY, type("F", (), {"port": port})()
    assert front.call("GET", "/get_server_info", key=None)[0] == 401
    status, raw = front.call("GET", "/get_server_info")
    assert status == 200 and json.loads(raw)["enable_return_routed_experts"] is True, raw
    assert front.call("GET", "/flush_cache")[0] == 200
    assert front.call("GET", "/health_generate", key=None)[0] == 200
    status, raw = front.call("POST", "/generate", {"input_ids": PROMPT, "image_data": [], "return_logprob": True,
                                                   "return_routed_experts": True,
                                                   "sampling_params": {"max_new_tokens": 3, "temperature": 0.0}})
    assert status == 200 and len(sglang_generate(raw)["ids"]) == 3, raw
    status, raw = front.call("POST", "/pause_generation", {})
    assert status == 200, raw
    assert front.call("POST", "/continue_generation", {})[0] == 200
    status, raw = front.call("POST", "/update_weights_from_disk", {"model_path": model_path, "abort_all_requests": True,
                                                                   "weight_version": "2"})
    assert status == 200 and json.loads(raw)["weight_version"] == "2", raw


@pytest.mark.slow  # one engine, a long stream and an update from disk: about 5 s
def test_abort_all_requests_ends_the_running_ones_then_updates(servers, model_path):
    """AReaL's abort_all_requests on an update: without it an update beside a running request is refused (no request
    mixes weights); with it the request ends (finish reason abort) and the update lands."""
    front = _Front(servers())
    try:
        conn = http.client.HTTPConnection("127.0.0.1", front.front.port, timeout=120)
        conn.request("POST", "/generate", body=json.dumps({
            "input_ids": PROMPT, "stream": True,
            "sampling_params": {"max_new_tokens": 400, "temperature": 0.0, "ignore_eos": True}}),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")  # it runs
        status, raw = front.call("POST", "/update_weights_from_disk", {"model_path": model_path})
        assert status == 400 and b"requests run" in raw, raw
        status, raw = front.call("POST", "/update_weights_from_disk", {"model_path": model_path,
                                                                       "abort_all_requests": True})
        assert status == 200, raw
        events = [json.loads(line[6:]) for line in resp.read().split(b"\n") if line.startswith(b"data: {")]
        assert events[-1]["meta_info"]["finish_reason"]["type"] == "abort"
        conn.close()
    finally:
        front.close()


def test_a_payload_pickle_cannot_call_or_grow_what_it_names():
    """engine/rl/serialized_tensors.py: a class a pickle names is never called (torch.Tensor(10**12) would allocate),
    and a shared-memory segment is never named larger than the bound (torch grows a segment to the size named)."""
    from torch.multiprocessing import reductions

    from moelink.engine.rl.serialized_tensors import PayloadRefused, decode_named_tensors

    class Alloc:
        def __reduce__(self):
            return (torch.Tensor, (10 ** 12,))

    class Grow:
        def __reduce__(self):
            return (reductions.rebuild_storage_filename, (torch.UntypedStorage, b"/tmp/x", b"/torch_1_2_3", 1 << 40))

    import pickle

    for payload, says in ((Alloc(), "is not a payload"), (Grow(), "more than the served weights")):
        entry = base64.b64encode(pickle.dumps([("x", payload)])).decode()
        with pytest.raises(PayloadRefused, match=says):
            decode_named_tensors([entry], None, max_bytes=1 << 20)


def test_a_payload_pickle_names_only_a_torch_shm_manager_of_this_user(tmp_path):
    """A "file_system" tensor's pickle names the torch_shm_manager socket torch connects to (and waits on, with the
    GIL held, and keeps for good): any other socket, a link to one, or another spelling of one is refused before
    torch connects; torch's own manager is taken."""
    import os
    import pickle
    import re
    import socket
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing as mp
    from torch.multiprocessing import reductions

    from moelink.engine.rl.serialized_tensors import PayloadRefused, decode_named_tensors

    other = tmp_path / "hang.sock"
    lone = socket.socket(socket.AF_UNIX)
    lone.bind(str(other))
    lone.listen(1)
    fake = tmp_path / "torch-shm-dir-x"
    fake.mkdir()
    os.symlink(other, fake / "manager.sock")
    was = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")
    try:
        buf = io.BytesIO()
        ForkingPickler(buf).dump([("x", torch.zeros(2))])
        own = re.search(rb"/[ -~]*torch-shm-dir-[^/]+/manager\.sock", buf.getvalue()).group(0)
        for name in (str(other).encode(), str(fake / "manager.sock").encode(),
                     own.replace(b"/manager.sock", b"/./manager.sock"), own.replace(b"/", b"//", 1)):
            class Named:
                def __reduce__(self, name=name):
                    return (reductions.rebuild_storage_filename, (torch.UntypedStorage, name, b"/torch_1_2_3", 8))
            entry = base64.b64encode(pickle.dumps([("x", Named())])).decode()
            with pytest.raises(PayloadRefused, match="torch_shm_manager"):
                decode_named_tensors([entry], None, max_bytes=1 << 20)
        (name, tensor), = decode_named_tensors([base64.b64encode(buf.getvalue()).decode()], None, 1 << 20)
        assert name == "x" and tensor.tolist() == [0.0, 0.0]  # torch's own manager is taken
    finally:
        mp.set_sharing_strategy(was)
        lone.close()


def test_health_generate_probes_share_one_generation():
    """/health_generate takes no key: probes that come while one generates wait on that one, so a client's many
    connections in a loop keep at most one probe's sequence in the engine; a caller that hangs up does not end it
    for the others; the next probe after it generates again."""
    import asyncio

    class Engine:
        def __init__(self):
            self.started = self.running = self.most = 0

        async def generate(self, rid, ids, params):
            self.started += 1
            self.running += 1
            self.most = max(self.most, self.running)
            try:
                await asyncio.sleep(0.05)
                yield object()
            finally:
                self.running -= 1

    async def run():
        engine = Engine()
        routes = SglangRoutes(types.SimpleNamespace(engine=engine))
        hung_up = asyncio.ensure_future(routes.answer(b"GET", "/health_generate", b""))
        await asyncio.sleep(0)
        others = [routes.answer(b"GET", "/health_generate", b"") for _ in range(31)]
        hung_up.cancel()
        answers = await asyncio.gather(*others)
        assert all(a == (200, b"") for a in answers) and engine.started == 1 and engine.most == 1
        assert await routes.answer(b"GET", "/health_generate", b"") == (200, b"") and engine.started == 2

    asyncio.run(run())
