"""`--api-key` behind the real smg gateway, and what a caller without the key can still learn.

smg (1.13) talks to gRPC workers in plaintext and sends them no credentials:
not on its health probes, not on GetModelInfo, not on Generate, even when smg
itself has `--api-key` (that key gates smg's HTTP clients). So a worker with
`--api-key` offers smg `--gateway-port`: a loopback listener with the
VllmEngine service and health only, without the key, while the main port keeps
requiring it for everything but health checks.
"""
from __future__ import annotations

import json

import grpc
import pytest

from moelink.engine import SamplingParams

from tests.helpers.grpc_server import CallDetails
from tests.helpers.grpc_server import make_stubs, pool_is_free
from tests.helpers.smg_gateway import http_request, launch_smg, wait_models
from tests.helpers.waits import wait_until

KEY = "w0rker-key"
SMG_KEY = "gateway-key"
def _gateway_port(srv, timeout: float = 30.0) -> int:
    """The port of the gateway listener, from the line the server prints after its ready line."""
    m = srv.wait_for_line(r"moelink: gateway listener on 127\.0\.0\.1:(\d+) ", timeout, "the gateway listener line")
    return int(m.group(1))


def test_smg_serves_a_worker_that_has_an_api_key(spawn_server, offline):
    """The documented deployment: key on the worker, smg beside it on --gateway-port, smg's own key for clients."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    srv = spawn_server("--served-model-name", "tiny-moe", "--api-key", KEY, "--gateway-port", "0")
    gw = _gateway_port(srv)
    with launch_smg(f"grpc://127.0.0.1:{gw}", "--api-key", SMG_KEY) as (port, proc, log):
        assert wait_models(port, proc, log, headers={"authorization": f"Bearer {SMG_KEY}"}) == ["tiny-moe"]
        body = dict(model="tiny-moe", prompt="Once upon a time", max_tokens=12, temperature=0, ignore_eos=True)
        # smg's --api-key gates its HTTP clients ...
        status, raw = http_request(port, "POST", "/v1/completions", body)
        assert status == 401, raw
        # ... and with it, the request runs on the keyed worker and matches the offline engine.
        status, raw = http_request(port, "POST", "/v1/completions", body, headers={"authorization": f"Bearer {SMG_KEY}"})
        assert status == 200, raw
        out = json.loads(raw)
        ref = offline.generate("Once upon a time", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                               use_tqdm=False)[0]
        assert out["usage"]["completion_tokens"] == 12
        assert out["choices"][0]["text"] in (ref.outputs[0].text, ref.outputs[0].text.rstrip("\ufffd"))
    # Directly, without the key, the main port still refuses generation (both services) and model facts.
    with grpc.insecure_channel(srv.addr) as ch:
        s = make_stubs(ch)
        with pytest.raises(grpc.RpcError) as err:
            list(s.vllm.Generate(s.vpb.GenerateRequest(request_id="direct", tokenized=s.vpb.TokenizedInput(
                input_ids=[5, 6, 7]), sampling_params=s.vpb.SamplingParams(max_tokens=4), stream=True), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            list(s.native.Generate(s.pb.GenerateRequest(prompt="direct"), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            s.vllm.GetModelInfo(s.vpb.GetModelInfoRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # The gateway port offers the VllmEngine service and health only: not the native service, not reflection.
    with grpc.insecure_channel(f"127.0.0.1:{gw}") as ch:
        s = make_stubs(ch)
        with pytest.raises(grpc.RpcError) as err:
            s.native.ServerInfo(s.pb.ServerInfoRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as err:
            list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert s.health.Check(s.hpb.HealthCheckRequest(service="vllm.grpc.engine.VllmEngine"),
                              timeout=5).status == s.hpb.HealthCheckResponse.SERVING
    with grpc.insecure_channel(srv.addr) as ch:
        s = make_stubs(ch)
        assert wait_until(lambda: pool_is_free(s.native, s.pb, metadata=(("authorization", f"Bearer {KEY}"),)), 10,
                          "the pool to be free")


def test_a_request_without_the_key_is_not_parsed(thread_server):
    """UNAUTHENTICATED is answered from the metadata alone: the request's bytes are never deserialized (a keyless
    Generate with 30 M token ids used to be parsed on the event loop first)."""
    import asyncio

    from moelink.engine.server.auth import ApiKeyInterceptor

    parsed = []

    async def behaviour(request, context):
        yield None

    handler = grpc.unary_stream_rpc_method_handler(behaviour, request_deserializer=parsed.append)

    async def continuation(details):
        return handler

    for metadata in ((), (("authorization", "Bearer wrong"),)):
        details = CallDetails(method="/vllm.grpc.engine.VllmEngine/Generate", invocation_metadata=metadata)
        denied = asyncio.run(ApiKeyInterceptor(KEY).intercept_service(continuation, details))
        assert denied is not handler and denied.request_deserializer is None
    srv = thread_server(api_key=KEY)
    with grpc.insecure_channel(srv.addr, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        s = make_stubs(ch)
        big = s.vpb.GenerateRequest(tokenized=s.vpb.TokenizedInput(input_ids=[1] * 300_000))
        with pytest.raises(grpc.RpcError) as err:
            list(s.vllm.Generate(big, timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "missing API key" in err.value.details()


def test_without_the_key_health_checks_answer_and_nothing_else(thread_server):
    from smg_grpc_proto.generated import common_pb2

    srv = thread_server(api_key=KEY)
    auth = (("authorization", f"Bearer {KEY}"),)
    with grpc.insecure_channel(srv.addr) as ch:
        s = make_stubs(ch)
        vpb = s.vpb
        for metadata in (None, (("authorization", "Bearer wrong"),)):
            # What smg (and any vLLM client) probes first: answered, with a fixed message.
            hc = s.vllm.HealthCheck(vpb.HealthCheckRequest(), timeout=5, metadata=metadata)
            assert hc.healthy and hc.message == "healthy"
            assert s.health.Check(s.hpb.HealthCheckRequest(service=""), timeout=5,
                                  metadata=metadata).status == s.hpb.HealthCheckResponse.SERVING
            unary = [(s.vllm.GetModelInfo, vpb.GetModelInfoRequest()), (s.vllm.GetServerInfo, vpb.GetServerInfoRequest()),
                     (s.vllm.GetLoads, vpb.GetLoadsRequest()), (s.vllm.Abort, vpb.AbortRequest(request_ids=["x"])),
                     (s.native.ServerInfo, s.pb.ServerInfoRequest()), (s.native.ExpertLoad, s.pb.ExpertLoadRequest())]
            for rpc, req in unary:
                with pytest.raises(grpc.RpcError) as err:
                    rpc(req, timeout=5, metadata=metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, rpc
            for rpc, req in [(s.vllm.GetTokenizer, common_pb2.GetTokenizerRequest()),
                             (s.vllm.Generate, vpb.GenerateRequest(tokenized=vpb.TokenizedInput(input_ids=[1, 2]))),
                             (s.native.Generate, s.pb.GenerateRequest(prompt="x"))]:
                with pytest.raises(grpc.RpcError) as err:
                    list(rpc(req, timeout=5, metadata=metadata))
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, rpc

        # Once the engine is dead: the keyless answer says so, but not why; the keyed one does.
        def broken_step():
            raise RuntimeError("simulated worker death at /secret/path")

        srv.engine.engine.step = broken_step
        with pytest.raises(grpc.RpcError):
            list(s.native.Generate(s.pb.GenerateRequest(prompt="x", sampling_params=s.pb.SamplingParams(max_tokens=2)),
                                   timeout=10, metadata=auth))
        assert wait_until(lambda: not s.vllm.HealthCheck(vpb.HealthCheckRequest(), timeout=5).healthy, 5,
                          "HealthCheck to say the engine is not healthy")
        hc = s.vllm.HealthCheck(vpb.HealthCheckRequest(), timeout=5)
        assert not hc.healthy and hc.message == "not serving"
        hc = s.vllm.HealthCheck(vpb.HealthCheckRequest(), timeout=5, metadata=auth)
        assert not hc.healthy and "simulated worker death" in hc.message


@pytest.mark.parametrize("kw, field", [
    (dict(gateway_port=-1), "gateway_port"), (dict(gateway_port=70000), "gateway_port"),
    (dict(gateway_port=True), "gateway_port"), (dict(port=50051, gateway_port=50051), "gateway_port"),
    (dict(metrics_port=9090, gateway_port=9090), "gateway_port"), (dict(gateway_host=""), "gateway_host"),
])
def test_gateway_flags_validated(kw, field):
    from moelink.engine.server.config import ServerConfig

    with pytest.raises(ValueError, match=rf"^{field}="):
        ServerConfig(**kw)


def test_gateway_port_in_use_is_named(thread_server):
    import socket

    from moelink.engine.server.config import ServerConfig
    from moelink.engine.server.server import MoelinkServer

    srv = thread_server()  # for its engine and event loop
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        second = MoelinkServer(srv.engine, ServerConfig(port=0, gateway_port=taken.getsockname()[1]))
        try:
            with pytest.raises(ValueError, match=r"^gateway_port=\d+ is invalid: could not bind 127\.0\.0\.1:\d+"):
                srv.call(second.start())
        finally:
            srv.call(second.stop(0))


def test_a_gateway_listener_wider_than_the_main_port_is_warned_about():
    from moelink.engine.server.config import ServerConfig
    from moelink.engine.server.server import gateway_exposure

    def exposure(**kw):
        return gateway_exposure(ServerConfig(port=50051, gateway_port=50052, **kw))

    assert "API key" in exposure(host="127.0.0.1", gateway_host="0.0.0.0", api_key="k")
    assert "--host 127.0.0.1" in exposure(host="127.0.0.1", gateway_host="0.0.0.0")
    assert exposure(host="0.0.0.0", gateway_host="0.0.0.0") is None
    assert exposure(host="127.0.0.1", gateway_host="127.0.0.1", api_key="k") is None
