"""The moelink.v1 Control service (engine/server/control.py; docs/rl.md) on an in-process server: refused with
FAILED_PRECONDITION naming --enable-weight-updates unless the engine takes control calls, and UNAUTHENTICATED without
the API key where one is set; with both, an update from disk asked while a stream runs under pause("wait") waits for
it and loses nothing: the stream finishes on the old weights, the update lands, GetWeightVersion and later responses' outputs follow it; and
a trainer's broadcast through InitWeightsUpdateGroup / UpdateWeightsFromDistributed gives the tokens of an offline
engine given the same tensors."""
from __future__ import annotations

import re

import grpc
import pytest

from moelink.engine.server.gen import moelink_v1_pb2 as pb
from moelink.engine.server.gen import moelink_v1_pb2_grpc as pb_grpc

from tests.helpers.grpc_server import ENGINE_KW, make_stubs

KEY = "control-test-key"


def _stub(srv):
    ch = grpc.insecure_channel(srv.addr)
    return ch, pb_grpc.ControlStub(ch)


def test_control_calls_need_the_flag(thread_server):
    srv = thread_server()
    ch, control = _stub(srv)
    try:
        for call, req in [("UpdateWeightsFromDisk", pb.UpdateWeightsFromDiskRequest(model_path="/nowhere")),
                          ("PauseGeneration", pb.PauseGenerationRequest(mode="wait")),
                          ("ContinueGeneration", pb.ContinueGenerationRequest())]:
            with pytest.raises(grpc.RpcError) as err:
                getattr(control, call)(req, timeout=30)
            assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert "--enable-weight-updates" in err.value.details()
        assert not control.GetWeightVersion(pb.GetWeightVersionRequest(), timeout=30).HasField("weight_version")
    finally:
        ch.close()


@pytest.mark.slow  # a server and a weight update: about 3 s
def test_update_under_pause_with_the_key(thread_server, model_path):
    srv = thread_server(engine_kw={"enable_weight_updates": True}, api_key=KEY)
    ch, control = _stub(srv)
    native = pb_grpc.GenerationStub(ch)
    auth = (("authorization", f"Bearer {KEY}"),)
    try:
        with pytest.raises(grpc.RpcError) as err:
            control.FlushCache(pb.FlushCacheRequest(), timeout=30)
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        stream = native.Generate(pb.GenerateRequest(
            request_id="r", prompt_token_ids=pb.TokenIds(ids=[1, 2, 3, 4]),
            sampling_params=pb.SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)), metadata=auth,
            timeout=60)
        first = next(stream)  # running
        assert first.token_ids
        vllm_stubs = make_stubs(ch)
        server_info = lambda: vllm_stubs.vllm.GetServerInfo(vllm_stubs.vpb.GetServerInfoRequest(), metadata=auth,  # noqa: E731
                                                            timeout=30)
        assert not server_info().is_paused
        assert control.PauseGeneration(pb.PauseGenerationRequest(mode="wait"), metadata=auth, timeout=30).started == 1
        assert server_info().is_paused  # what smg reads from the VllmEngine service (it said false whatever the pause)
        # Asked at once: the update waits for the started request instead of being refused.
        update = control.UpdateWeightsFromDisk.future(pb.UpdateWeightsFromDiskRequest(
            model_path=model_path, weight_version="v2"), metadata=auth, timeout=60)
        rest = list(stream)  # the started request runs to its end while paused
        assert rest[-1].finish_reason == "length"
        assert len(first.token_ids) + sum(len(m.token_ids) for m in rest) == 24
        info = update.result()
        assert info.bytes_read > 0 and info.weight_version == "v2"
        assert not any(m.HasField("weight_version") for m in [first, *rest])  # before any labelled update
        control.ContinueGeneration(pb.ContinueGenerationRequest(), metadata=auth, timeout=30)
        assert not server_info().is_paused
        assert control.GetWeightVersion(pb.GetWeightVersionRequest(), metadata=auth, timeout=30).weight_version == "v2"
        after = list(native.Generate(pb.GenerateRequest(
            prompt_token_ids=pb.TokenIds(ids=[1, 2, 3, 4]), sampling_params=pb.SamplingParams(max_tokens=3)),
            metadata=auth, timeout=60))
        assert {m.weight_version for m in after} == {"v2"} and not any(m.weight_versions for m in after)
        with pytest.raises(grpc.RpcError) as err:
            control.UpdateWeightsFromDisk(pb.UpdateWeightsFromDiskRequest(model_path="/nowhere"), metadata=auth,
                                          timeout=30)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "model_path='/nowhere'" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # the limit, checked before anything is read
            control.UpdateWeightsFromDisk(pb.UpdateWeightsFromDiskRequest(model_path=model_path, rollback_bytes=1000),
                                          metadata=auth, timeout=30)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "rollback_bytes=1000 is too small" in err.value.details()
        assert control.FlushCache(pb.FlushCacheRequest(), metadata=auth, timeout=30).num_blocks_freed >= 0
        aborted = native.Generate(pb.GenerateRequest(
            prompt_token_ids=pb.TokenIds(ids=[3, 4]), sampling_params=pb.SamplingParams(max_tokens=200,
                                                                                       ignore_eos=True)),
            metadata=auth, timeout=60)
        next(aborted)
        assert control.PauseGeneration(pb.PauseGenerationRequest(mode="abort"), metadata=auth, timeout=30).aborted == 1
        assert list(aborted)[-1].finish_reason == "abort"  # its stream gets a final message
        control.ContinueGeneration(pb.ContinueGenerationRequest(), metadata=auth, timeout=30)
        assert control.Sleep(pb.SleepRequest(level=1), metadata=auth, timeout=30).bytes_freed > 0
        with pytest.raises(grpc.RpcError) as err:  # asleep: refused, naming why
            list(native.Generate(pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[1, 2])), metadata=auth,
                                 timeout=30))
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE and "asleep" in err.value.details()
        assert control.WakeUp(pb.WakeUpRequest(), metadata=auth, timeout=30).bytes > 0
        assert len(list(native.Generate(pb.GenerateRequest(
            prompt_token_ids=pb.TokenIds(ids=[1, 2]), sampling_params=pb.SamplingParams(max_tokens=2)),
            metadata=auth, timeout=60))) >= 1
    finally:
        ch.close()


@pytest.mark.slow  # a server, a trainer thread and an offline engine: about 4 s
def test_a_trainers_broadcast_over_grpc(thread_server, model_path):
    from moelink.engine import LLM, SamplingParams
    from moelink.engine.rl.trainer import TrainerGroup
    from tests.engine.test_weight_updates_distributed import _perturbed, _tensors, _Trainer
    from tests.helpers.net import free_port

    new = list(_perturbed(_tensors(model_path)).items())[:6]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    one = LLM(model_path, **ENGINE_KW, enable_weight_updates=True)
    one.update_weights_from_tensor(new)
    want = one.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids
    srv = thread_server(engine_kw={"enable_weight_updates": True})
    ch, control = _stub(srv)
    trainer = _Trainer(free_port(), new)
    try:
        trainer.start()
        msg = control.InitWeightsUpdateGroup(pb.InitWeightsUpdateGroupRequest(
            master_address="127.0.0.1", master_port=trainer.port, rank_offset=1, world_size=2, group_name="g"),
            timeout=60)
        assert "joined group 'g'" in msg.message
        specs = TrainerGroup.specs(new)
        request = pb.UpdateWeightsFromDistributedRequest(
            names=specs["names"], dtypes=specs["dtypes"], shapes=[pb.TensorShape(dims=s) for s in specs["shapes"]],
            group_name="g", rollback_bytes=1000)
        with pytest.raises(grpc.RpcError) as err:  # refused before the trainer sends anything
            control.UpdateWeightsFromDistributed(request, timeout=60)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert re.search(r"rollback_bytes=1000 is too small: .* would hold \d+ bytes", err.value.details())
        trainer.go.set()
        info = control.UpdateWeightsFromDistributed(pb.UpdateWeightsFromDistributedRequest(
            names=specs["names"], dtypes=specs["dtypes"], shapes=[pb.TensorShape(dims=s) for s in specs["shapes"]],
            group_name="g", weight_version="t1"), timeout=60)
        assert info.weight_version == "t1" and info.bytes_read == sum(t.numel() * t.element_size() for _, t in new)
        control.DestroyWeightsUpdateGroup(pb.DestroyWeightsUpdateGroupRequest(group_name="g"), timeout=30)
        got = [m for m in pb_grpc.GenerationStub(ch).Generate(pb.GenerateRequest(
            prompt_token_ids=pb.TokenIds(ids=[5, 6, 7]),
            sampling_params=pb.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)), timeout=60)]
        assert [t for m in got for t in m.token_ids] == want and got[-1].weight_version == "t1"
    finally:
        trainer.done.set()
        trainer.join(30)
        ch.close()
