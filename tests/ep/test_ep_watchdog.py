"""A frozen EP rank (a real Ray actor process, SIGSTOP by PID) is seen: health, streams, KV blocks, drain.

Each test runs a gRPC server in this process in front of an EP-2 AsyncEngine on the module's
local Ray, streams a few long requests, freezes rank 1 and checks what clients and probes see.
The frozen process is resumed and killed (by PID) at the end whatever happened.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import grpc
import pytest

from tests.helpers.engine_steps import EngineSteps
from tests.helpers.grpc_server import ThreadServer, wait_health
from tests.helpers.waits import join_threads

pytestmark = pytest.mark.slow

HEARTBEAT_TIMEOUT_S = 3.0


def _server(model: str, grace: float = 30.0, **engine_kw) -> ThreadServer:
    """MoelinkServer + AsyncEngine (EP 2) on an event loop in a background thread (as tests/server's)."""
    return ThreadServer(model, dict(dtype="float32", expert_parallel_size=2, num_kv_blocks=256, max_num_seqs=8,
                                    **engine_kw), engine_shutdown_timeout=3, shutdown_grace=grace)


@contextlib.contextmanager
def _frozen(pid: int):
    """SIGSTOP `pid` (a rank's actor process); resume and kill it on the way out, whatever happened."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


class _Streams:
    """Long requests on both services, each consumed by a thread: messages, then the error if any.

    1000 tokens each: as many as the tiny model's 1024-token context leaves beside a 12-token prompt (more is
    refused, INVALID_ARGUMENT)."""

    def __init__(self, channel, n_native: int = 2, n_vllm: int = 1):
        from smg_grpc_proto.generated import vllm_engine_pb2, vllm_engine_pb2_grpc

        from moelink.engine.server.gen import moelink_v1_pb2, moelink_v1_pb2_grpc

        pb, vpb = moelink_v1_pb2, vllm_engine_pb2
        native, vllm = moelink_v1_pb2_grpc.GenerationStub(channel), vllm_engine_pb2_grpc.VllmEngineStub(channel)
        self.results: dict[str, list] = {}
        self._changed = threading.Condition()  # notified for every message (and error) a stream gets
        calls = {}
        for i in range(n_native):
            calls[f"n{i}"] = lambda i=i: native.Generate(pb.GenerateRequest(
                request_id=f"n{i}", prompt_token_ids=pb.TokenIds(ids=[i + 3] * 12),
                sampling_params=pb.SamplingParams(max_tokens=1000, ignore_eos=True, temperature=0)), timeout=60)
        for i in range(n_vllm):
            calls[f"v{i}"] = lambda i=i: vllm.Generate(vpb.GenerateRequest(
                request_id=f"v{i}", tokenized=vpb.TokenizedInput(input_ids=[i + 7] * 12), stream=True,
                sampling_params=vpb.SamplingParams(max_tokens=1000, ignore_eos=True, temperature=0)), timeout=60)
        self.threads = [threading.Thread(target=self._consume, args=(rid, call), daemon=True)
                        for rid, call in calls.items()]
        for t in self.threads:
            t.start()

    def _consume(self, rid, call):
        msgs = self.results.setdefault(rid, [])
        try:
            for m in call():
                with self._changed:
                    msgs.append(m)
                    self._changed.notify_all()
        except grpc.RpcError as exc:
            with self._changed:
                msgs.append(exc)
                self._changed.notify_all()

    def wait_flowing(self, n_messages: int = 3, timeout: float = 30.0) -> None:
        with self._changed:
            flowing = self._changed.wait_for(
                lambda: all(len(self.results.get(rid, [])) >= n_messages for rid in ("n0", "n1", "v0")), timeout)
        assert flowing, f"streams did not start: { {k: len(v) for k, v in self.results.items()} }"

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), "a stream did not end"


def _health(stub, hpb, service: str) -> int:
    return stub.Check(hpb.HealthCheckRequest(service=service), timeout=5).status


def _pool_free(engine) -> bool:
    return all(s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == s.num_total_blocks
               for s in engine.engine.rank_stats())


def test_frozen_rank_turns_health_not_serving_and_ends_requests(local_ray, tiny_model):
    from grpc_health.v1 import health_pb2 as hpb, health_pb2_grpc
    from smg_grpc_proto.generated import vllm_engine_pb2 as vpb, vllm_engine_pb2_grpc

    srv = _server(tiny_model("qwen3_e6k3"), heartbeat_timeout=HEARTBEAT_TIMEOUT_S)
    channel = grpc.insecure_channel(srv.addr)
    try:
        health = health_pb2_grpc.HealthStub(channel)
        vllm = vllm_engine_pb2_grpc.VllmEngineStub(channel)
        assert _health(health, hpb, "") == hpb.HealthCheckResponse.SERVING
        streams = _Streams(channel)
        streams.wait_flowing()
        pid = srv.engine.engine.executor.rank_pids[1]
        with _frozen(pid):
            # Health.Watch: the server pushes the change (WaitTimeout if still SERVING 15 s after the freeze).
            seen_after = wait_health(health, hpb, "", hpb.HealthCheckResponse.NOT_SERVING, 15)
            # The bound: one heartbeat round (timeout + interval), the server's 0.2 s poll, scheduling slack.
            assert seen_after < HEARTBEAT_TIMEOUT_S + 2.5, f"NOT_SERVING only after {seen_after:.1f} s"
            print(f"liveness NOT_SERVING {seen_after:.2f} s after rank 1 froze (heartbeat timeout "
                  f"{HEARTBEAT_TIMEOUT_S:g} s)")
            for service in ("moelink.v1.Generation", "vllm.grpc.engine.VllmEngine"):
                assert _health(health, hpb, service) == hpb.HealthCheckResponse.NOT_SERVING, service
            hc = vllm.HealthCheck(vpb.HealthCheckRequest(), timeout=5)
            assert not hc.healthy and "rank 1" in hc.message and "heartbeat" in hc.message, hc.message
            # Every in-flight request ends with a clear status naming the rank and the reason.
            streams.join(10)
            for rid, msgs in streams.results.items():
                err = msgs[-1]
                assert isinstance(err, grpc.RpcError), (rid, err)
                assert err.code() == grpc.StatusCode.UNAVAILABLE, (rid, err.code())
                assert "rank 1" in err.details() and "heartbeat" in err.details(), (rid, err.details())
            # Nothing leaked: every request ended, every KV block of every rank is free (the engine thread
            # frees them as it fails, then ends).
            join_threads([srv.engine._thread], 5, "the failed engine's thread to free every block and end")
            assert _pool_free(srv.engine), srv.engine.engine.rank_stats()
            assert not srv.engine.engine.output_processor.states
            assert not srv.server.serving.registry.active
    finally:
        channel.close()
        srv.close()


def test_drain_keeps_its_grace_with_a_frozen_rank(local_ray, tiny_model):
    """The rank froze and no watchdog has fired yet: drain still ends every stream in time, cut short for all to
    see (native: 'abort'; VllmEngine: UNAVAILABLE, issue 27 item 4)."""
    srv = _server(tiny_model("qwen3_e6k3"), grace=1.0, heartbeat_timeout=60.0)
    channel = grpc.insecure_channel(srv.addr)
    pid = srv.engine.engine.executor.rank_pids[1]
    try:
        steps = EngineSteps(srv.engine.engine)  # before the streams: it sees every step from the first
        streams = _Streams(channel)
        streams.wait_flowing()
        with _frozen(pid):
            # The streams keep the engine stepping, and no step can end without rank 1 once it is frozen:
            # a step in progress now is one the drain must cut short.
            steps.wait_for(lambda: steps.started > steps.finished, 30, "the engine inside a step")
            t0 = time.monotonic()
            srv.call(srv.server.drain(), timeout=20)
            drained = time.monotonic() - t0
            streams.join(5)
            assert drained < 1.0 + 3.0, f"drain took {drained:.1f} s for a 1 s grace"
            print(f"drain with a frozen rank took {drained:.2f} s for a 1 s grace")
            for rid, msgs in streams.results.items():
                last = msgs[-1]
                if rid.startswith("n"):  # native: a final message with finish_reason "abort"
                    assert not isinstance(last, grpc.RpcError), (rid, last.code(), last.details())
                    assert last.finish_reason == "abort", (rid, last)
                else:  # VllmEngine: UNAVAILABLE naming the cut (smg would show a final "abort" as "stop")
                    assert isinstance(last, grpc.RpcError), (rid, last)
                    assert last.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in last.details(), \
                        (rid, last.code(), last.details())
            # Shutdown is bounded too: it stops the ranks, which ends the step that waits for rank 1.
            t1 = time.monotonic()
            srv.engine.shutdown(timeout=3)
            assert time.monotonic() - t1 < 10
            assert not srv.engine._thread.is_alive()
            assert _pool_free(srv.engine) and not srv.engine.engine.output_processor.states
    finally:
        channel.close()
        srv.close()
