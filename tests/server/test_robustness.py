"""Overload (and admission into an empty queue), SIGTERM drain, API key, TLS, and a dead engine: the server
says what happened and leaks nothing."""
from __future__ import annotations

import subprocess
import threading
import time

import grpc
import pytest

from moelink.engine import SamplingParams
from moelink.engine.server.registry import Overloaded, RequestRegistry

from tests.helpers.grpc_server import make_stubs, pool_is_free, wait_health
from tests.helpers.waits import wait_until


def _long(pb, n=1000):
    return pb.SamplingParams(max_tokens=n, ignore_eos=True, temperature=0)


def test_overload_is_resource_exhausted(thread_server):
    srv = thread_server(engine_kw=dict(max_num_seqs=1, max_model_len=1024), max_queued_requests=2, max_queued_tokens=300)
    with grpc.insecure_channel(srv.addr) as ch:
        s = make_stubs(ch)
        pb = s.pb
        running = s.native.Generate(pb.GenerateRequest(request_id="A", prompt="a", sampling_params=_long(pb)), timeout=60)
        next(running)  # A has its first token: it runs and holds the only sequence slot
        queued = [s.native.Generate(pb.GenerateRequest(request_id=r, prompt="b", sampling_params=_long(pb)), timeout=60)
                  for r in ("B", "C")]
        info = wait_until(lambda: (i := s.native.ServerInfo(pb.ServerInfoRequest())).queued_requests == 2 and i, 10,
                          "B and C to be queued")
        assert info and info.max_queued_requests == 2 and info.max_queued_tokens == 300
        with pytest.raises(grpc.RpcError) as err:
            list(s.native.Generate(pb.GenerateRequest(request_id="D", prompt="c"), timeout=10))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-queued-requests" in err.value.details()
        # The VllmEngine service shares the same queue.
        with pytest.raises(grpc.RpcError) as err:
            list(s.vllm.Generate(s.vpb.GenerateRequest(request_id="Dv", tokenized=s.vpb.TokenizedInput(input_ids=[5, 6]),
                                                       stream=True), timeout=10))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        queued[0].cancel()
        assert wait_until(lambda: s.native.ServerInfo(pb.ServerInfoRequest()).queued_requests == 1, 10,
                          "the cancelled request to leave the queue")
        # One slot is free again, but 400 more prompt tokens exceed --max-queued-tokens.
        with pytest.raises(grpc.RpcError) as err:
            list(s.native.Generate(pb.GenerateRequest(request_id="E", prompt_token_ids=pb.TokenIds(ids=[7] * 400)),
                                   timeout=10))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-queued-tokens" in err.value.details()
        assert s.native.ServerInfo(pb.ServerInfoRequest()).rejected_total == 3
        for call in (running, queued[1]):
            call.cancel()
        assert wait_until(lambda: pool_is_free(s.native, pb), 10, "the pool to be free")


def test_request_larger_than_token_limit_is_admitted_into_an_empty_queue():
    """Admission limits must never refuse forever a request that fits an empty queue."""
    # RESOURCE_EXHAUSTED says "retry later"; with nothing queued a retry can never succeed,
    # so a lone request over --max-queued-tokens is admitted (the limit bounds the backlog).
    reg = RequestRegistry(max_queued_requests=4, max_queued_tokens=300)
    entry = reg.admit("big", ["big|0"], 400)
    assert reg.queued_tokens == 400
    with pytest.raises(Overloaded):  # but nothing more while it waits
        reg.admit("small", ["small|1"], 10)
    reg.release(entry)
    assert reg.queued_tokens == 0 and reg.queued_requests == 0 and not reg.active


def test_sigterm_drains(spawn_server):
    """Health goes NOT_SERVING, new requests are refused, in-flight ones finish within the grace, the rest abort."""
    srv = spawn_server("--max-model-len", "1024", "--max-num-seqs", "2", "--shutdown-grace", "2")
    ch = grpc.insecure_channel(srv.addr)
    s = make_stubs(ch)
    pb = s.pb
    results: dict[str, list] = {}

    def consume(rid, params):
        msgs = []
        try:
            for m in s.native.Generate(pb.GenerateRequest(request_id=rid, prompt="drain", sampling_params=params), timeout=60):
                msgs.append(m)
        except grpc.RpcError as exc:  # recorded: every stream must end with a message, not an error
            msgs.append(exc)
        results[rid] = msgs

    threads = [threading.Thread(target=consume, args=("short", _long(pb, 100)))]
    threads += [threading.Thread(target=consume, args=(f"long{i}", _long(pb, 1000))) for i in range(6)]
    for t in threads:
        t.start()
        if t is threads[0]:
            wait_until(lambda: s.native.ServerInfo(pb.ServerInfoRequest()).active_requests == 1, 10,
                       "the short request to be active")
    assert wait_until(lambda: s.native.ServerInfo(pb.ServerInfoRequest()).active_requests == 7, 10,
                      "7 requests active")
    t_term = time.monotonic()
    srv.signal()
    ready = {svc: wait_until(lambda svc=svc: s.health.Check(s.hpb.HealthCheckRequest(service=svc), timeout=5).status
                             == s.hpb.HealthCheckResponse.NOT_SERVING, 2, f"{svc} NOT_SERVING")
             for svc in ("moelink.v1.Generation", "vllm.grpc.engine.VllmEngine")}
    assert all(ready.values()), ready
    assert s.native.ServerInfo(pb.ServerInfoRequest(), timeout=5).draining
    assert not s.vllm.HealthCheck(s.vpb.HealthCheckRequest(), timeout=5).healthy
    with pytest.raises(grpc.RpcError) as err:
        list(s.native.Generate(pb.GenerateRequest(prompt="late"), timeout=5))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.value.details()
    for t in threads:
        t.join(30)
    assert srv.wait(30) == 0
    elapsed = time.monotonic() - t_term
    ch.close()
    assert elapsed < 2 + 10, f"drain took {elapsed:.1f} s for a 2 s grace"
    for rid, msgs in results.items():
        assert msgs and not isinstance(msgs[-1], Exception), f"{rid} ended with {msgs[-1]!r}"
        assert msgs[-1].finish_reason in ("length", "abort"), (rid, msgs[-1].finish_reason)
    assert results["short"][-1].finish_reason == "length" and results["short"][-1].usage.completion_tokens == 100
    aborted = [rid for rid, m in results.items() if m[-1].finish_reason == "abort"]
    assert aborted, "with 6 long requests and 2 slots, some must still run when the grace ends"
    assert all(results[r][-1].usage.completion_tokens < 1000 for r in aborted)


def _self_signed_cert(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_tls_and_api_key(thread_server, tmp_path, offline):
    try:
        cert, key = _self_signed_cert(tmp_path)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"openssl could not make a certificate: {exc}")
    srv = thread_server(tls_cert=str(cert), tls_key=str(key), api_key="s3cret-key")
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(srv.addr, creds) as ch:
        s = make_stubs(ch)
        pb, vpb = s.pb, s.vpb
        req = pb.GenerateRequest(prompt="Hello TLS", sampling_params=pb.SamplingParams(max_tokens=8, temperature=0))
        for metadata in (None, (("authorization", "Bearer wrong"),), (("authorization", "s3cret-key"),)):
            with pytest.raises(grpc.RpcError) as err:
                list(s.native.Generate(req, timeout=10, metadata=metadata))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
            with pytest.raises(grpc.RpcError) as err:
                s.vllm.GetModelInfo(vpb.GetModelInfoRequest(), timeout=10, metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Probes need no key.
        assert s.health.Check(s.hpb.HealthCheckRequest(service=""), timeout=5).status == s.hpb.HealthCheckResponse.SERVING
        # The round trip over TLS with the right key (either header).
        ref = offline.generate("Hello TLS", SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)[0].outputs[0]
        for metadata in ((("authorization", "Bearer s3cret-key"),), (("x-api-key", "s3cret-key"),)):
            msgs = list(s.native.Generate(req, timeout=30, metadata=metadata))
            assert [t for m in msgs for t in m.token_ids] == ref.token_ids
            assert "".join(m.text for m in msgs) == ref.text
        assert s.vllm.GetModelInfo(vpb.GetModelInfoRequest(), timeout=10,
                                   metadata=(("authorization", "Bearer s3cret-key"),)).max_context_length == 512
    # A plaintext client cannot talk to the TLS port.
    with grpc.insecure_channel(srv.addr) as ch:
        with pytest.raises(grpc.RpcError) as err:
            make_stubs(ch).health.Check(make_stubs(ch).hpb.HealthCheckRequest(service=""), timeout=3)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_dead_engine_turns_health_not_serving(thread_server):
    srv = thread_server()

    def broken_step():
        raise RuntimeError("simulated worker death")

    srv.engine.engine.step = broken_step  # the next step kills the engine loop, as a dead worker would
    with grpc.insecure_channel(srv.addr) as ch:
        s = make_stubs(ch)
        pb, hpb = s.pb, s.hpb
        with pytest.raises(grpc.RpcError) as err:
            list(s.native.Generate(pb.GenerateRequest(prompt="x", sampling_params=pb.SamplingParams(max_tokens=4)), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "simulated worker death" in err.value.details()
        for service in ("", "moelink.v1.Generation", "vllm.grpc.engine.VllmEngine"):
            wait_health(s.health, hpb, service, hpb.HealthCheckResponse.NOT_SERVING, 5)
            assert s.health.Check(hpb.HealthCheckRequest(service=service),
                                  timeout=5).status == hpb.HealthCheckResponse.NOT_SERVING, service
        hc = s.vllm.HealthCheck(s.vpb.HealthCheckRequest(), timeout=5)
        assert not hc.healthy and "simulated worker death" in hc.message
        assert not s.native.ServerInfo(pb.ServerInfoRequest(), timeout=5).healthy
        with pytest.raises(grpc.RpcError) as err:
            list(s.native.Generate(pb.GenerateRequest(prompt="y"), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_an_engine_loop_failure_with_no_message_still_names_its_reason(thread_server):
    """A MemoryError() (a tier sized past the machine, before the offload flags were bounded) has an empty message:
    the first request's status, every later refusal and the health message name its type, never an empty reason
    ("engine loop failed: ;")."""
    srv = thread_server()

    def broken_step():
        raise MemoryError()

    srv.engine.engine.step = broken_step
    with grpc.insecure_channel(srv.addr) as ch:
        s = make_stubs(ch)
        pb, hpb = s.pb, s.hpb
        with pytest.raises(grpc.RpcError) as err:
            list(s.native.Generate(pb.GenerateRequest(prompt="x", sampling_params=pb.SamplingParams(max_tokens=4)),
                                   timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "engine loop failed: MemoryError" in err.value.details(), err.value.details()
        wait_health(s.health, hpb, "", hpb.HealthCheckResponse.NOT_SERVING, 5)
        assert "MemoryError" in s.vllm.HealthCheck(s.vpb.HealthCheckRequest(), timeout=5).message
        with pytest.raises(grpc.RpcError) as err:
            list(s.native.Generate(pb.GenerateRequest(prompt="y"), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "MemoryError" in err.value.details()
