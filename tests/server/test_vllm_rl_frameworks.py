"""The vLLM-shaped RL frameworks (issue 97): SkyRL's and prime-rl's client code against moelink's HTTP port
(engine/server/gateway/vllm_token_generate.py, vllm_rl_routes.py; docs/rl.md#skyrl, #prime-rl).

Each framework's recorded transcript (tests/fixtures/rl_transcripts/{skyrl,prime_rl}.json: the method, path, query
and body sequence its client sends in one rollout cycle, read from its source) is replayed against a server with
--enable-weight-updates and --enable-return-routed-experts; each answer is parsed the way that framework's client
parses it (SkyRL's RemoteInferenceClient._generate_single and decode_packed_routed_experts; prime-rl's renderers'
parse_generate_response and _parse_completion_logprobs, its prefill_logprobs), and the generation after the update
equals a fresh server's on the new weights. SkyRL's weights come over the weight-transfer API from a trainer thread on
gloo (vLLM's packed broadcast, as NCCLWeightTransferEngine.trainer_send_weights sends it), prime-rl's from a
checkpoint directory. Token-in/token-out generate: greedy ids equal /v1/completions' with the same token prompt,
the logprobs too, and the routed experts decode alike in both packed forms."""
from __future__ import annotations

import base64
import http.client
import io
import json
import math
import threading
import types
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest
import torch

from moelink.engine.rl.trainer import TrainerGroup
from moelink.engine.server.gateway.completions_route import CompletionsRoute
from moelink.engine.server.gateway.generate_route import GenerateRoute
from moelink.engine.server.gateway.http_front import HttpFront
from moelink.engine.server.gateway.rl_routes import ChainedRoutes, RlRoutes
from moelink.engine.server.gateway.vllm_rl_routes import GROUP, VllmRlRoutes
from moelink.engine.server.gateway.vllm_token_generate import FORM_ENV, TokenGenerateRoute

from tests.helpers.net import free_port
from tests.helpers.weight_checkpoints import checkpoint_tensors, filled, perturbed, saved_checkpoint

KEY = "vllm-rl-key"
TRANSCRIPTS = Path(__file__).resolve().parents[1] / "fixtures" / "rl_transcripts"
PROMPT = [5, 17, 42, 8, 99, 3, 61]
SERVED = "policy"
ROUTED_ENGINE = {"enable_weight_updates": True, "enable_return_routed_experts": True}


class _NoModels:
    async def answer(self, method, path, body, query="", client=()):
        return None


class _Front:
    """moelink's HTTP front over a thread server's engine with the routes `moelink serve` chains (managed.py)."""

    def __init__(self, srv, environ=None, key=KEY):
        serving = srv.server.serving
        self.srv, self.key = srv, key
        self.front = HttpFront("127.0.0.1", free_port(), free_port(), key,
                               local=ChainedRoutes(_NoModels(), RlRoutes(srv.engine, srv.engine.takes_control_calls),
                                                   GenerateRoute(serving), VllmRlRoutes(serving),
                                                   TokenGenerateRoute(serving, environ or {})),
                               completions=CompletionsRoute(serving))
        srv.call(self.front.start())
        self.model = serving.served_model_name

    def call(self, method: str, path: str, body=None, params=None, key: str | None = "default",
             raw: bool = False):
        key = self.key if key == "default" else key
        conn = http.client.HTTPConnection("127.0.0.1", self.front.port, timeout=120)
        try:
            headers = {"Content-Type": "application/json"}
            if key:
                headers["Authorization"] = f"Bearer {key}"
            target = path + ("?" + urlencode(params, doseq=True) if params else "")
            conn.request(method, target, body=None if body is None else json.dumps(body), headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, (data if raw else json.loads(data or b"{}"))
        finally:
            conn.close()

    def close(self):
        self.srv.call(self.front.stop())


# -- the frameworks' parsers (what their clients read of an answer) ------------------------------------------------

def skyrl_decode_packed(payload: dict) -> np.ndarray:
    """SkyRL's generate_wire.decode_packed_routed_experts: canonical compact dtype, 3-d shape, exact byte count."""
    dtypes = {d.name: d for d in (np.dtype(np.uint8), np.dtype(np.int16), np.dtype(np.int32))}
    assert isinstance(payload, dict)
    dtype, shape = dtypes[payload["dtype"]], tuple(payload["shape"])
    data = base64.b64decode(payload["data"], validate=True)
    assert len(shape) == 3 and all(isinstance(d, int) and d >= 0 for d in shape)
    assert len(data) == math.prod(shape) * dtype.itemsize
    arr = np.frombuffer(data, dtype=dtype).reshape(shape)
    top = int(arr.max(initial=0))
    assert dtype == (np.dtype(np.uint8) if top < 2 ** 8 else np.dtype(np.int16) if top < 2 ** 15 else np.int32)
    return arr


def skyrl_generate(resp: dict) -> dict:
    """RemoteInferenceClient._generate_single with enable_return_routed_experts."""
    choice = resp["choices"][0]
    out = {"response_ids": choice["token_ids"], "stop_reason": choice["finish_reason"], "response_logprobs": None}
    logprobs = choice.get("logprobs")
    if logprobs is not None and logprobs.get("content", []):
        out["response_logprobs"] = [info["logprob"] for info in logprobs["content"]]
    packed = choice.get("routed_experts")
    assert isinstance(packed, dict), "/skyrl/v1/generate must return packed routed_experts"
    out["routed_experts"] = skyrl_decode_packed(packed)
    return out


def renderers_generate(raw: bytes) -> dict:
    """prime-rl's renderers client: parse_generate_response (the routed experts' base64 spliced out of the raw
    JSON by its prefix) and _parse_completion_logprobs."""
    prefix = b'"routed_experts":{"data":"'
    start = raw.find(prefix)
    assert start >= 0, "the packed routed experts are where renderers' fast path finds them"
    payload = json.loads(raw)
    choice = payload["choices"][0]
    ids = choice.get("token_ids") or []
    content = choice["logprobs"]["content"]
    assert isinstance(content, list) and len(content) == len(ids)
    lps = []
    for i, entry in enumerate(content):
        assert entry.get("token") == f"token_id:{ids[i]}"
        lp = entry.get("logprob")
        assert isinstance(lp, (int, float)) and not isinstance(lp, bool) and math.isfinite(lp) and lp != -9999.0
        lps.append(float(lp))
    routed = choice["routed_experts"]
    arr = np.frombuffer(base64.b64decode(routed["data"]), dtype=np.dtype(routed["dtype"])).reshape(routed["shape"])
    return {"request_id": payload.get("request_id") or "", "usage": payload.get("usage"), "completion_ids": ids,
            "completion_logprobs": lps, "finish_reason": choice.get("finish_reason"), "routed_experts": arr}


def prefill_logprobs(resp: dict) -> list[float]:
    """prime-rl's prefill_logprobs flattening of prompt_logprobs."""
    flat = []
    for entry in resp.get("prompt_logprobs") or []:
        if not entry:
            flat.append(0.0)
            continue
        first = next(iter(entry.values()))
        flat.append(float(first["logprob"]) if first.get("logprob") is not None else 0.0)
    return flat


PARSERS = {"skyrl_generate": lambda raw: skyrl_generate(json.loads(raw)), "renderers_generate": renderers_generate,
           "prefill_logprobs": lambda raw: prefill_logprobs(json.loads(raw))}


class _Trainer(threading.Thread):
    """SkyRL's trainer rank 0, on gloo: joins the weight-transfer group, then sends vLLM's packed broadcast."""

    def __init__(self, port: int, world_size: int, send: list):
        super().__init__(daemon=True)
        self.port, self.world_size, self.send = port, world_size, send
        self.go, self.done = threading.Event(), threading.Event()
        self.sent = 0
        self.packed, self.buffer = True, 1 << 30  # vLLM's default packed_buffer_size_bytes
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            group = TrainerGroup("127.0.0.1", self.port, self.world_size, GROUP, "gloo", timeout_s=60.0)
            self.go.wait(60.0)
            if self.packed:
                self.sent = group.broadcast_packed(self.send, self.buffer)
            else:
                self.sent = group.broadcast(self.send)
            self.done.wait(60.0)
            group.close()
        except BaseException as exc:  # pragma: no cover - reported by the test
            self.error = exc


def _replay(front: _Front, transcript: dict, names: dict, trainer: _Trainer | None = None) -> dict:
    """Each step sent as the framework sends it; every answer 2xx and parsed by the framework's parser. The parsed
    answers kept by the step's `keep` label."""
    kept = {}
    for step in transcript["steps"]:
        body = filled(step.get("json"), names)
        params = filled(step.get("params"), names)
        if step.get("trainer") == "join":
            trainer.start()
        if step.get("trainer") == "send_packed":
            trainer.go.set()
        status, raw = front.call(step["method"], step["path"], body, params, raw=True)
        assert 200 <= status < 300, (step["name"], status, raw[:2000])
        if step.get("parse"):
            parsed = PARSERS[step["parse"]](raw)
            if step.get("keep"):
                kept[step["keep"]] = parsed
        else:
            kept.setdefault("answers", {})[step["name"]] = json.loads(raw or b"{}")
    return kept


@pytest.fixture
def servers(thread_server):
    made = []

    def make(path: str | None = None):
        """The server under test (the tiny model, served as SERVED); a fresh one on `path`'s weights under the same
        name."""
        if path is None:
            srv = thread_server(engine_kw=ROUTED_ENGINE, served_model_name=SERVED)
        else:
            from tests.helpers.grpc_server import ENGINE_KW, ThreadServer

            srv = ThreadServer(path, {**ENGINE_KW, **ROUTED_ENGINE}, served_model_name=SERVED)
            made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.close()


def _assert_same_generation(got: dict, want: dict, ids: str, lps: str) -> None:
    assert got[ids] == want[ids]
    assert np.allclose(got[lps], want[lps], atol=1e-5), (got[lps], want[lps])
    assert np.array_equal(got["routed_experts"], want["routed_experts"])


@pytest.mark.slow  # two engines, a gloo group and a packed broadcast: about 10 s
def test_skyrl_transcript(servers, model_path, tmp_path):
    transcript = json.loads((TRANSCRIPTS / "skyrl.json").read_text())
    srv = servers()
    front = _Front(srv)
    new = perturbed(checkpoint_tensors(model_path), seed=7)
    specs = TrainerGroup.specs(new.items())
    world = front.call("GET", "/get_world_size", {})[1]["world_size"]
    names = {"MODEL": front.model, "PROMPT": PROMPT, "MASTER_PORT": free_port(), "WORLD_SIZE_PLUS_1": world + 1,
             "NAMES": specs["names"], "DTYPE_NAMES": specs["dtypes"], "SHAPES": specs["shapes"]}
    trainer = _Trainer(names["MASTER_PORT"], world + 1, list(new.items()))
    try:
        kept = _replay(front, transcript, names, trainer)
    finally:
        trainer.done.set()
        front.close()
    trainer.join(60.0)
    assert trainer.error is None and trainer.sent == sum(t.numel() * t.element_size() for t in new.values())
    before, after = kept["before"], kept["after"]
    assert len(after["response_logprobs"]) == len(after["response_ids"]) > 0
    assert after["routed_experts"].shape[0] == len(PROMPT) + len(after["response_ids"]) - 1
    assert before["response_ids"] != after["response_ids"], "the new weights must change the answer"
    want = _fresh_generate(servers, saved_checkpoint(model_path, new, tmp_path / "new"), transcript, names)
    _assert_same_generation(after, want, "response_ids", "response_logprobs")


@pytest.mark.slow  # two engines and an update from disk: about 8 s
def test_prime_rl_transcript(servers, model_path, tmp_path):
    transcript = json.loads((TRANSCRIPTS / "prime_rl.json").read_text())
    srv = servers()
    environ = {FORM_ENV: "packed"}
    front = _Front(srv, environ)
    weight_dir = saved_checkpoint(model_path, perturbed(checkpoint_tensors(model_path), seed=7), tmp_path / "step_1")
    names = {"MODEL": front.model, "PROMPT": PROMPT, "STOP_IDS": list(srv.server.serving.info.eos_token_ids),
             "WEIGHT_DIR": weight_dir}
    try:
        kept = _replay(front, transcript, names)
        prefill = front.call("POST", "/inference/v1/generate", filled(transcript["steps"][1]["json"], names))[1]
    finally:
        front.close()
    flat = prefill_logprobs(prefill)
    assert len(flat) == len(PROMPT) and flat[0] == 0.0 and all(v < 0 for v in flat[1:])
    before, after = kept["before"], kept["after"]
    assert before["completion_ids"] != after["completion_ids"], "the new weights must change the answer"
    assert after["routed_experts"].shape[0] == len(PROMPT) + len(after["completion_ids"]) - 1
    want = _fresh_generate(servers, weight_dir, transcript, names, environ)
    _assert_same_generation(after, want, "completion_ids", "completion_logprobs")


def _fresh_generate(servers, path: str, transcript: dict, names: dict, environ=None) -> dict:
    step = [s for s in transcript["steps"] if s.get("keep") == "after"][0]
    front = _Front(servers(path), environ)
    try:
        status, raw = front.call(step["method"], step["path"], filled(step["json"], names), raw=True)
        assert status == 200, raw
        return PARSERS[step["parse"]](raw)
    finally:
        front.close()


@pytest.mark.slow  # one engine: about 4 s
def test_token_generate_equals_completions_and_both_routed_forms(servers):
    srv = servers()
    front = _Front(srv)
    try:
        sp = {"max_tokens": 10, "temperature": 0.0, "logprobs": 2}
        status, npy = front.call("POST", "/inference/v1/generate", {"token_ids": PROMPT, "sampling_params": sp})
        assert status == 200, npy
        status, packed = front.call("POST", "/skyrl/v1/generate", {"token_ids": PROMPT, "sampling_params": sp,
                                                                   "model": front.model})
        assert status == 200, packed
        status, comp = front.call("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 10, "temperature": 0.0,
                                                              "logprobs": 2, "return_token_ids": True})
        assert status == 200, comp
        a, b, c = npy["choices"][0], packed["choices"][0], comp["choices"][0]
        assert a["token_ids"] == b["token_ids"] == c["token_ids"] and len(a["token_ids"]) == 10
        lps = [e["logprob"] for e in a["logprobs"]["content"]]
        assert np.allclose(lps, c["logprobs"]["token_logprobs"], atol=1e-6)
        assert all(e["token"] == f"token_id:{t}" for e, t in zip(a["logprobs"]["content"], a["token_ids"]))
        first = a["logprobs"]["content"][0]["top_logprobs"]  # vLLM's order: the sampled token first
        assert first[0]["token"] == f"token_id:{a['token_ids'][0]}" and len(first) == 2
        assert a["finish_reason"] == "length" and npy["usage"]["completion_tokens"] == 10
        from_npy = np.load(io.BytesIO(base64.b64decode(a["routed_experts"])))
        from_packed = skyrl_decode_packed(b["routed_experts"])
        model = srv.server.serving.info.model
        assert from_npy.shape == (len(PROMPT) + 9, len(model.sparse_layers), model.top_k)
        assert np.array_equal(from_npy, from_packed) and b["routed_experts"]["start"] == 0
        # streamed: the same ids as they come, then usage, then [DONE]
        status, raw = front.call("POST", "/inference/v1/generate",
                                 {"token_ids": PROMPT, "sampling_params": sp, "stream": True,
                                  "stream_options": {"include_usage": True}}, raw=True)
        events = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert [t for ch in chunks for c in ch["choices"] for t in c["token_ids"]] == a["token_ids"]
        assert chunks[-1]["usage"]["completion_tokens"] == 10
    finally:
        front.close()


@pytest.mark.slow  # one engine: about 3 s
def test_bad_input_is_one_400_naming_the_field_and_the_key_is_asked(servers):
    srv = servers()
    front = _Front(srv)
    ok = {"token_ids": PROMPT, "sampling_params": {"max_tokens": 2}}
    try:
        assert front.call("POST", "/inference/v1/generate", ok, key=None)[0] == 401
        assert front.call("GET", "/get_world_size", key=None)[0] == 401
        assert front.call("POST", "/update_weights", {"weight_dir": "/x"}, key=None)[0] == 401
        for body, field in [
            ({"sampling_params": {}}, "token_ids"),
            ({"token_ids": PROMPT}, "sampling_params"),
            ({**ok, "features": {"mm_hashes": {}}}, "features"),
            ({**ok, "priority": 3}, "priority"),
            ({**ok, "kv_transfer_params": {"x": 1}}, "kv_transfer_params"),
            ({**ok, "nope": 1}, "nope"),
            ({**ok, "sampling_params": {"max_tokens": 2, "bogus": 1}}, "sampling_params.bogus"),
            ({**ok, "sampling_params": {"max_tokens": 0}}, "sampling_params.max_tokens"),
            ({**ok, "sampling_params": {"temperature": "hot"}}, "sampling_params.temperature"),
            ({**ok, "sampling_params": {"logprobs": 10 ** 6}}, "sampling_params.logprobs"),
            ({**ok, "sampling_params": {"extra_args": {"x": 1}}}, "sampling_params.extra_args.x"),
            ({**ok, "sampling_params": {"structured_outputs": {"json": {}}}}, "sampling_params.structured_outputs"),
            ({**ok, "token_ids": [1, -2]}, "token_ids"),
            ({**ok, "token_ids": list(range(600))}, "token_ids"),
            ({**ok, "cache_salt": ""}, "cache_salt"),
        ]:
            status, got = front.call("POST", "/inference/v1/generate", body)
            assert status == 400 and got["error"]["param"] == field, (body, got)
        assert front.call("POST", "/inference/v1/generate", {**ok, "model": "other"})[0] == 404
        assert front.call("POST", "/inference/v1/generate", {**ok, "cache_salt": "s"})[0] == 200
        assert front.call("POST", "/inference/v1/generate",
                          {**ok, "sampling_params": {"max_tokens": 2, "extra_args": {"prl_compact_logprobs": True},
                                                     "detokenize": False, "flat_logprobs": True}})[0] == 200
        for path, body, field in [
            ("/init_weight_transfer_engine", {"init_info": {"master_address": "127.0.0.1", "master_port": 1,
                                                            "rank_offset": 1, "world_size": 2, "backend": "nccl"}},
             "init_info.backend"),
            ("/init_weight_transfer_engine", {"init_info": {"master_port": 1}}, "init_info.master_address"),
            ("/init_weight_transfer_engine", {"init_info": {"x": 1}}, "init_info.x"),
            ("/update_weights", {"update_info": {"names": [], "dtype_names": [], "shapes": [],
                                                 "is_checkpoint_format": False}}, "update_info.is_checkpoint_format"),
            ("/update_weights", {"weight_dir": None}, "weight_dir"),
            ("/collective_rpc", {"method": "update_weights_ipc", "kwargs": {}}, "method"),
            ("/collective_rpc", {"method": "skyrl_wake_for_weight_sync", "kwargs": {"tags": ["gpu"]}}, "kwargs.tags"),
            ("/collective_rpc", {"method": "skyrl_start_weight_update", "kwargs": {"x": 1}}, "kwargs.x"),
            ("/fetch_weights", {"target_version": 1, "sync_dir": "/tmp/x"}, "sync_dir"),
            ("/reset_prefix_cache", {"reset_running_requests": True}, "reset_running_requests"),
        ]:
            status, got = front.call("POST", path, body)
            assert status == 400 and got["error"]["param"] == field, (path, body, got)
        assert front.call("POST", "/skyrl/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/x"})[0] == 404
        assert front.call("POST", "/get_world_size")[0] == 405
        # SkyRL's fully-async sync: answered, nothing released (the update is written in place)
        status, got = front.call("POST", "/collective_rpc", {"method": "skyrl_sleep_for_weight_sync",
                                                             "kwargs": {"offload_kv": True}})
        assert status == 200 and got["released"] == [], got
        assert front.call("POST", "/collective_rpc", {"method": "skyrl_wake_for_weight_sync",
                                                      "kwargs": {"tags": ["weights"]}})[0] == 200
    finally:
        front.close()


@pytest.mark.slow  # one engine: about 3 s
def test_without_the_flag_the_weight_routes_are_403(thread_server):
    srv = thread_server()
    front = _Front(srv)
    try:
        assert front.call("GET", "/get_world_size")[1] == {"world_size": 1}
        for path, body in [("/update_weights", {"weight_dir": "/x"}), ("/collective_rpc", {"method": "x"}),
                           ("/init_weight_transfer_engine", {"init_info": {}})]:
            status, got = front.call("POST", path, body)
            assert status == 403 and "--enable-weight-updates" in got["error"]["message"], (path, got)
    finally:
        front.close()


@pytest.mark.slow  # one engine, two peft adapters: about 8 s
def test_skyrl_load_lora_adapter_reloads_in_place(thread_server, model_path, tmp_path):
    """SkyRL's /skyrl/v1/load_lora_adapter (RemoteInferenceClient.load_lora_adapter): the same name loaded again with
    new files serves the new adapter; generation naming it (`model`) follows."""
    pytest.importorskip("peft")
    from tests.helpers.lora_peft import make_adapter

    fields = dict(r=2, lora_alpha=4, target_modules=["o_proj"])
    a = make_adapter(model_path, str(tmp_path / "a"), fields, 1)
    b = make_adapter(model_path, str(tmp_path / "b"), fields, 2)
    srv = thread_server(engine_kw={**ROUTED_ENGINE, "enable_lora": True, "max_lora_rank": 8},
                        served_model_name=SERVED)
    front = _Front(srv)
    sp = {"max_tokens": 8, "temperature": 0.0}

    def ids(model: str) -> list:
        status, got = front.call("POST", "/inference/v1/generate", {"model": model, "token_ids": PROMPT,
                                                                    "sampling_params": sp})
        assert status == 200, got
        return got["choices"][0]["token_ids"]

    try:
        status, got = front.call("POST", "/skyrl/v1/load_lora_adapter", {"lora_name": "policy-lora", "lora_path": a})
        assert status == 200 and got["reloaded"] is False, got
        first = ids("policy-lora")
        status, got = front.call("POST", "/skyrl/v1/load_lora_adapter", {"lora_name": "policy-lora", "lora_path": b})
        assert status == 200 and got["reloaded"] is True, got
        second = ids("policy-lora")
        assert front.call("POST", "/skyrl/v1/load_lora_adapter", {"lora_name": "fresh-b", "lora_path": b})[0] == 200
        assert second == ids("fresh-b") and first != second and ids(SERVED) not in (first, second)
        status, got = front.call("POST", "/skyrl/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nowhere"})
        assert status == 400 and got["error"]["param"] == "lora_path"
    finally:
        front.close()


@pytest.mark.slow  # two engines and two broadcasts: about 10 s
def test_vllm_update_weights_packed_in_small_buffers_and_whole(servers, model_path, tmp_path):
    """vLLM's own /update_weights {"update_info"} (what SkyRL's update_named_weights sends): packed in buffers of
    4 KiB (many buckets, each closed by the tensor that passes the bound, as vLLM packs) lands the new weights, a
    fresh server's answer; then unpacked (each tensor broadcast whole) the old ones, the first answer again."""
    srv = servers()
    front = _Front(srv)
    old = checkpoint_tensors(model_path)
    new = perturbed(old, seed=11)
    ask = {"model": SERVED, "token_ids": PROMPT, "sampling_params": {"max_tokens": 10, "temperature": 0.0,
                                                                       "logprobs": 0}}

    def generate(f) -> dict:
        status, raw = f.call("POST", "/skyrl/v1/generate", ask, raw=True)
        assert status == 200, raw
        return skyrl_generate(json.loads(raw))

    def update(tensors: dict, packed: bool) -> dict:
        port = free_port()
        trainer = _Trainer(port, 2, list(tensors.items()))
        trainer.buffer = 4096
        trainer.packed = packed
        trainer.start()
        status, got = front.call("POST", "/init_weight_transfer_engine", {"init_info": {
            "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2}})
        assert status == 200 and got["backend"] == "gloo", got
        trainer.go.set()
        specs = TrainerGroup.specs(tensors.items())
        info = {"names": specs["names"], "dtype_names": specs["dtypes"], "shapes": specs["shapes"], "packed": packed}
        if packed:
            info.update(packed_buffer_size_bytes=4096, packed_num_buffers=2)
        status, got = front.call("POST", "/update_weights", {"update_info": info})
        trainer.done.set()
        trainer.join(60.0)
        assert status == 200 and trainer.error is None, got
        assert got["bytes_read"] == sum(t.numel() * t.element_size() for t in tensors.values())
        return got  # the group stays joined: the next init replaces it, as vLLM's does

    try:
        first = generate(front)
        update(new, packed=True)
        after = generate(front)
        update(old, packed=False)
        again = generate(front)
    finally:
        front.close()
    assert after["response_ids"] != first["response_ids"]
    _assert_same_generation(again, first, "response_ids", "response_logprobs")
    fresh = _Front(servers(saved_checkpoint(model_path, new, tmp_path / "new")))
    try:
        want = generate(fresh)
    finally:
        fresh.close()
    _assert_same_generation(after, want, "response_ids", "response_logprobs")


@pytest.mark.slow  # one engine: about 4 s
def test_bounds_answer_budget_body_and_hang_up(thread_server):
    """--max-answer-bytes (routed experts counted) and --max-http-body-bytes bound the route, n samples are
    answered as vLLM's choices, and a client that hangs up ends its request in the engine."""
    import socket
    import time

    from moelink.engine.server.limits import RequestLimits

    srv = thread_server(engine_kw=ROUTED_ENGINE, served_model_name=SERVED,
                        limits=RequestLimits(max_answer_bytes=64 << 10, max_http_body_bytes=4096))
    front = _Front(srv)
    serving = srv.server.serving
    try:
        big = {"token_ids": PROMPT, "sampling_params": {"max_tokens": 400, "logprobs": 5, "n": 4}}
        status, got = front.call("POST", "/inference/v1/generate", big)
        assert status == 400 and got["error"]["param"] == "sampling_params.max_tokens", got
        assert "--max-answer-bytes" in got["error"]["message"] and "routed experts" in got["error"]["message"]
        status, got = front.call("POST", "/inference/v1/generate", {**big, "stream": True}, raw=True)
        assert status == 200 and got.endswith(b"data: [DONE]\n\n")  # streamed: not bounded by it
        status, _ = front.call("POST", "/inference/v1/generate", {"token_ids": list(range(2000)),
                                                                  "sampling_params": {}})
        assert status == 413
        status, got = front.call("POST", "/inference/v1/generate",
                                 {"token_ids": PROMPT, "sampling_params": {"max_tokens": 3, "n": 3,
                                                                           "temperature": 1.0, "seed": 1}})
        assert status == 200 and [c["index"] for c in got["choices"]] == [0, 1, 2], got
        assert got["usage"]["completion_tokens"] == 9
        # a client that leaves while its request waits (generation paused) ends it
        assert front.call("POST", "/pause", params={"mode": "keep", "clear_cache": "false"})[0] == 200
        body = json.dumps({"token_ids": PROMPT, "sampling_params": {"max_tokens": 50}}).encode()
        sock = socket.create_connection(("127.0.0.1", front.front.port))
        sock.sendall(b"POST /inference/v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                     + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 10
        while not serving.registry.active and time.monotonic() < deadline:
            time.sleep(0.02)
        assert serving.registry.active, "the request was admitted"
        sock.close()
        while serving.registry.active and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not serving.registry.active, "the hang-up ended the request"
        assert front.call("POST", "/resume")[0] == 200
    finally:
        front.close()


@pytest.mark.slow  # a `moelink serve` with its smg: about 15 s
def test_moelink_serve_answers_the_routes(spawn_server, model_path):
    """`moelink serve --enable-weight-updates --enable-return-routed-experts` chains the routes (managed.py): the
    key asked, the token route answering vLLM's .npy form (or the packed one with the environment's switch), prime-rl's
    update from a directory."""
    from tests.helpers.smg_gateway import smg_executable

    if smg_executable() is None:
        pytest.skip("the smg gateway (PyPI `smg`) is not installed")
    import os

    srv = spawn_server("--served-model-name", SERVED, "--http-port", str(free_port()), "--api-key", KEY,
                       "--enable-weight-updates", "--enable-return-routed-experts",
                       env={**os.environ, FORM_ENV: "packed"})
    port = int(srv.wait_for_line(r"moelink: OpenAI API on http://127\.0\.0\.1:(\d+)/v1 ", 90, "the API line").group(1))

    class _Port(_Front):
        def __init__(self):
            self.key, self.front = KEY, type("F", (), {"port": port})()

    front = _Port()
    assert front.call("GET", "/get_world_size", {}, key=None)[0] == 401
    assert front.call("GET", "/get_world_size", {})[1] == {"world_size": 1}
    status, raw = front.call("POST", "/inference/v1/generate",
                             {"model": SERVED, "token_ids": PROMPT,
                              "sampling_params": {"max_tokens": 4, "temperature": 0.0, "logprobs": 1}}, raw=True)
    assert status == 200, raw
    got = renderers_generate(raw)
    assert len(got["completion_ids"]) == 4 and got["routed_experts"].shape[0] == len(PROMPT) + 3
    status, body = front.call("POST", "/update_weights", {"weight_dir": model_path})
    assert status == 200 and body["status"] == "ok" and body["bytes_read"] > 0, body


def test_packed_buckets_are_vllms():
    """DistributedUpdate(packed=True).buckets(): vLLM's packing (packed_tensor.pack_tensors / the consumer): a buffer
    takes tensors until its bytes pass the bound, the tensor that passes it included; unpacked, SGLang's (at most
    the bound, a larger tensor alone). TrainerGroup.broadcast_packed sends the same buffers."""
    from moelink.engine.contract.weight_sync import DistributedUpdate

    sizes = [40, 40, 40, 200, 8, 8, 100]  # float32 elements: 160, 160, 160, 800, 32, 32, 400 bytes
    tensors = tuple((f"t{i}", torch.float32, (n,)) for i, n in enumerate(sizes))
    assert DistributedUpdate("g", tensors, 300, packed=True).buckets() == [[0, 1], [2, 3], [4, 5, 6]]
    assert DistributedUpdate("g", tensors, 300).buckets() == [[0], [1], [2], [3], [4, 5], [6]]
    with pytest.raises(ValueError, match="packed=1 is invalid"):
        DistributedUpdate("g", tensors, 300, packed=1)

    sent = []

    class _Group:
        def broadcast(self, buf, src):
            sent.append(buf.numel())
            return type("W", (), {"wait": lambda self: None})()

    group = TrainerGroup.__new__(TrainerGroup)
    group.group = _Group()
    group.broadcast_packed([(n, torch.zeros(s)) for (n, _, _), s in zip(tensors, sizes)], 300)
    assert sent == [320, 960, 464]


@pytest.mark.parametrize("logprobs", [0, 1, 20])
def test_the_answer_budget_estimate_covers_the_token_routes_logprobs(logprobs):
    """--max-answer-bytes admits no /inference/v1/generate answer larger than itself: its logprobs entries (the token
    as "token_id:N", "bytes": null, at least one top entry) were counted as completions' and came to 1.6x the
    estimate. Worst case here: six-digit ids, 17-digit logprobs."""
    from moelink.engine.contract.sampling_params import SamplingParams
    from moelink.engine.core.outputs import Logprob
    from moelink.engine.server.gateway import vllm_token_generate as tg
    from moelink.engine.server.gateway.openai_fields import HttpFieldError
    from moelink.engine.server.limits import RequestLimits

    n, tokens, prompt = 2, 50, [151_000] * 8
    req = tg.TokenRequest("r", prompt, SamplingParams(max_tokens=tokens), n, logprobs, None, False, False, None, None,
                          None)
    answer = tg._Answer(req, "m", "npy")
    entry = {151_000 + i: Logprob(-12.345678901234567 - i, i + 1) for i in range(max(logprobs, 1) + 1)}
    comp = types.SimpleNamespace(token_ids=[151_000] * tokens, logprobs=[entry] * tokens, finish_reason="length",
                                 routed_experts=None)
    out = types.SimpleNamespace(outputs=[comp], prompt_token_ids=prompt, num_cached_tokens=0, prompt_logprobs=None)
    for sample in range(n):
        answer.add(sample, out)
    size = len(tg._dumps(answer.body()))
    serving = types.SimpleNamespace(limits=RequestLimits(max_answer_bytes=size - 1))
    with pytest.raises(HttpFieldError, match="--max-answer-bytes"):  # the estimate is at least the answer
        tg.check_answer(serving, req, len(prompt), 0)
