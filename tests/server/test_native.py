"""moelink.v1.Generation over a real `moelink serve`: same tokens as the offline API, info RPCs, aborts,
cancellation, deadlines, bad input, and 200 concurrent streams with random cancellations."""
from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest

from moelink.engine import SamplingParams

from tests.helpers.grpc_server import ENGINE_KW, make_stubs, pool_is_free
from tests.helpers.waits import wait_until

SEEDED = dict(temperature=0.9, top_p=0.95, top_k=40, seed=1234)


def _collect(stubs, **req):
    """Stream one request; returns (token ids, text, last message, number of messages)."""
    pb = stubs.pb
    msgs = list(stubs.native.Generate(pb.GenerateRequest(**req), timeout=60))
    ids = [t for m in msgs for t in m.token_ids]
    return ids, "".join(m.text for m in msgs), msgs[-1], msgs


@pytest.mark.parametrize("case", ["greedy_text", "greedy_ids", "seeded", "logprobs", "stop"])
def test_stream_matches_offline(stubs, offline, case):
    pb = stubs.pb
    prompt_ids = [5, 17, 99, 23, 42, 7, 300]
    kw = dict(max_tokens=24, ignore_eos=True)
    if case == "greedy_text":
        req = dict(prompt="The quick brown fox", sampling_params=pb.SamplingParams(temperature=0, **kw))
        ref = offline.generate("The quick brown fox", SamplingParams(temperature=0, **kw), use_tqdm=False)[0]
    else:
        sp = dict(temperature=0, **kw) if case != "seeded" else dict(SEEDED, **kw)
        if case == "logprobs":
            sp["logprobs"] = 3
        ref = offline.generate([prompt_ids], SamplingParams(**sp), use_tqdm=False)[0]
        if case == "stop":  # stop on a string from the middle of the reference text
            text = ref.outputs[0].text
            stop = text[len(text) // 2: len(text) // 2 + 3]
            if not stop.strip():
                pytest.skip("reference text has no usable stop string")
            sp["stop"] = [stop]
            ref = offline.generate([prompt_ids], SamplingParams(**sp), use_tqdm=False)[0]
        req = dict(prompt_token_ids=pb.TokenIds(ids=prompt_ids), sampling_params=pb.SamplingParams(**sp))
    ids, text, last, msgs = _collect(stubs, request_id=f"match-{case}", **req)
    comp = ref.outputs[0]
    assert ids == comp.token_ids
    assert text == comp.text
    assert last.finish_reason == comp.finish_reason
    assert all(not m.finish_reason for m in msgs[:-1]) and all(not m.HasField("usage") for m in msgs[:-1])
    assert last.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert last.usage.completion_tokens == len(comp.token_ids)
    assert last.usage.total_tokens == len(ref.prompt_token_ids) + len(comp.token_ids)
    assert all(m.request_id == f"match-{case}" for m in msgs)
    if case == "stop":
        assert last.stop_str == comp.stop_reason
    if case == "logprobs":
        lps = [lp for m in msgs for lp in m.logprobs]
        assert [lp.token_id for lp in lps] == comp.token_ids
        for lp, ref_lp, tid in zip(lps, comp.logprobs, comp.token_ids):
            assert lp.logprob == pytest.approx(ref_lp[tid].logprob, abs=1e-5)
            assert [t.rank for t in lp.top] == [1, 2, 3]
            assert lp.top[0].logprob >= lp.top[1].logprob >= lp.top[2].logprob


def test_routed_experts_on_the_wire_equal_the_python_apis(stubs, model_path):
    """Rollout routing replay's record over gRPC (the shared server runs --enable-return-routed-experts): the last
    message of a sample that asked carries GenerateResponse.routed_experts, [prompt + generated - 1, MoE layers,
    top_k] little-endian, equal to the Python API's CompletionOutput.routed_experts; a sample that did not ask, none."""
    import numpy as np

    from moelink.engine import LLM

    pb = stubs.pb
    prompt_ids = [5, 17, 99, 23, 42, 7, 300]
    sp = dict(temperature=0, max_tokens=6, ignore_eos=True)
    _, _, last, msgs = _collect(stubs, request_id="routed", prompt_token_ids=pb.TokenIds(ids=prompt_ids),
                                sampling_params=pb.SamplingParams(return_routed_experts=True, **sp))
    assert all(not m.HasField("routed_experts") for m in msgs[:-1])
    rx = last.routed_experts
    got = np.frombuffer(rx.data, dtype=np.dtype(rx.dtype).newbyteorder("<")).reshape(tuple(rx.shape))
    with LLM(model_path, **ENGINE_KW, enable_return_routed_experts=True) as llm:
        want = llm.generate([prompt_ids], SamplingParams(return_routed_experts=True, **sp),
                            use_tqdm=False)[0].outputs[0].routed_experts
    assert got.shape == (len(prompt_ids) + 6 - 1,) + want.shape[1:] and np.array_equal(got, want)
    _, _, plain, _ = _collect(stubs, request_id="not-routed", prompt_token_ids=pb.TokenIds(ids=prompt_ids),
                              sampling_params=pb.SamplingParams(**sp))
    assert not plain.HasField("routed_experts")


def test_n_samples_are_seeded_per_index(stubs, offline):
    pb = stubs.pb
    prompt = [11, 12, 13, 14]
    msgs = list(stubs.native.Generate(pb.GenerateRequest(
        prompt_token_ids=pb.TokenIds(ids=prompt), sampling_params=pb.SamplingParams(
            n=3, temperature=1.0, seed=77, max_tokens=12, ignore_eos=True)), timeout=60))
    for i in range(3):
        ids = [t for m in msgs if m.index == i for t in m.token_ids]
        ref = offline.generate([prompt], SamplingParams(temperature=1.0, seed=77 + i, max_tokens=12, ignore_eos=True),
                               use_tqdm=False)[0].outputs[0]
        assert ids == ref.token_ids
        finals = [m for m in msgs if m.index == i and m.finish_reason]
        assert len(finals) == 1 and finals[0].usage.completion_tokens == 12


def test_model_info_server_info_reflection_health(stubs, model_path, offline):
    pb = stubs.pb
    info = stubs.native.ModelInfo(pb.ModelInfoRequest(), timeout=10)
    assert info.served_model_name == "tiny-moe"
    assert info.max_model_len == 512 and info.vocab_size == offline.engine.config.model.vocab_size
    assert list(info.eos_token_ids) == sorted(offline.engine.eos_token_ids)
    assert info.architecture == "Qwen3MoeForCausalLM" and info.num_experts == 6 and info.num_experts_per_tok == 3
    assert info.num_kv_blocks == 4096 and info.block_size == 16 and info.has_chat_template
    assert info.dtype == "float32" and info.device == "cpu"
    assert info.model_path.endswith(model_path.rstrip("/").split("/")[-1])
    si = stubs.native.ServerInfo(pb.ServerInfoRequest(), timeout=10)
    assert si.healthy and not si.draining and si.num_total_blocks == 4096 and si.uptime_s > 0
    # Health: liveness and each service's readiness.
    for service in ("", "moelink.v1.Generation", "vllm.grpc.engine.VllmEngine"):
        assert stubs.health.Check(stubs.hpb.HealthCheckRequest(service=service), timeout=5).status == \
            stubs.hpb.HealthCheckResponse.SERVING
    # Reflection lists every service.
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    refl = reflection_pb2_grpc.ServerReflectionStub(stubs.channel)
    resp = next(iter(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                               timeout=10)))
    names = {s.name for s in resp.list_services_response.service}
    assert {"moelink.v1.Generation", "vllm.grpc.engine.VllmEngine", "grpc.health.v1.Health"} <= names
    # ... and can describe the native service's file.
    resp = next(iter(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="moelink.v1.Generation")]), timeout=10)))
    assert resp.file_descriptor_response.file_descriptor_proto


def test_abort_rpc_ends_stream_with_abort(stubs):
    pb = stubs.pb
    call = stubs.native.Generate(pb.GenerateRequest(request_id="to-abort", prompt="abort me", sampling_params=pb.SamplingParams(
        max_tokens=480, ignore_eos=True, temperature=0)), timeout=60)
    first = next(call)
    assert first.request_id == "to-abort"
    assert stubs.native.Abort(pb.AbortRequest(request_ids=["to-abort", "no-such-request"]), timeout=5).num_aborted == 1
    rest = list(call)
    assert rest and rest[-1].finish_reason == "abort"
    assert rest[-1].usage.completion_tokens < 480
    assert wait_until(lambda: pool_is_free(stubs.native, pb), 5, "blocks freed after Abort")


def test_client_cancel_and_deadline_free_blocks(stubs):
    pb = stubs.pb
    long = pb.SamplingParams(max_tokens=480, ignore_eos=True, temperature=0)
    call = stubs.native.Generate(pb.GenerateRequest(prompt="cancel me", sampling_params=long), timeout=60)
    next(call)
    call.cancel()
    assert wait_until(lambda: pool_is_free(stubs.native, pb), 5, "blocks freed after cancel")
    # A deadline that expires mid-stream: DEADLINE_EXCEEDED for the client, abort in the engine.
    with pytest.raises(grpc.RpcError) as err:
        for msg in stubs.native.Generate(pb.GenerateRequest(prompt="too slow", sampling_params=long), timeout=0.15):
            time.sleep(0.02)  # a slow reader
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: pool_is_free(stubs.native, pb), 5, "blocks freed after deadline")


def _bad_native(pb):
    sp = pb.SamplingParams
    return [  # (request kwargs, field the message must name)
        (dict(prompt=""), "prompt"),
        (dict(), "prompt"),
        (dict(prompt_token_ids=pb.TokenIds(ids=[])), "prompt_token_ids"),
        (dict(prompt_token_ids=pb.TokenIds(ids=[1, 100000])), "prompt_token_ids[1]"),
        (dict(prompt_token_ids=pb.TokenIds(ids=[1] * 600)), "max_model_len"),
        (dict(prompt="x", sampling_params=sp(temperature=-1)), "sampling_params.temperature"),
        (dict(prompt="x", sampling_params=sp(temperature=float("nan"))), "sampling_params.temperature"),
        (dict(prompt="x", sampling_params=sp(top_p=0.0)), "sampling_params.top_p"),
        (dict(prompt="x", sampling_params=sp(top_p=1.5)), "sampling_params.top_p"),
        (dict(prompt="x", sampling_params=sp(top_k=-5)), "sampling_params.top_k"),
        (dict(prompt="x", sampling_params=sp(min_p=2.0)), "sampling_params.min_p"),
        (dict(prompt="x", sampling_params=sp(max_tokens=0)), "sampling_params.max_tokens"),
        (dict(prompt="x", sampling_params=sp(max_tokens=4, min_tokens=9)), "sampling_params.min_tokens"),
        (dict(prompt="x", sampling_params=sp(repetition_penalty=0.0)), "sampling_params.repetition_penalty"),
        (dict(prompt="x", sampling_params=sp(presence_penalty=3.0)), "sampling_params.presence_penalty"),
        (dict(prompt="x", sampling_params=sp(frequency_penalty=-3.0)), "sampling_params.frequency_penalty"),
        (dict(prompt="x", sampling_params=sp(logprobs=21)), "sampling_params.logprobs"),
        (dict(prompt="x", sampling_params=sp(stop=[""])), "sampling_params.stop"),
        (dict(prompt="x", sampling_params=sp(stop_token_ids=[99999])), "sampling_params.stop_token_ids"),
        (dict(prompt="x", sampling_params=sp(n=0)), "sampling_params.n"),
        (dict(prompt="x", sampling_params=sp(n=16385)), "sampling_params.n"),  # past --max-n (vLLM's 16384)
        (dict(prompt="x", request_id="r" * 300), "request_id"),
    ]


def test_bad_inputs_are_invalid_argument_naming_the_field(stubs):
    cases = _bad_native(stubs.pb)
    assert len(cases) >= 10
    for req, field in cases:
        with pytest.raises(grpc.RpcError) as err:
            list(stubs.native.Generate(stubs.pb.GenerateRequest(**req), timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (req, err.value.details())
        assert field in err.value.details(), (field, err.value.details())
    assert pool_is_free(stubs.native, stubs.pb)


def test_duplicate_request_id_and_message_size(stubs):
    pb = stubs.pb
    call = stubs.native.Generate(pb.GenerateRequest(request_id="dup", prompt="one", sampling_params=pb.SamplingParams(
        max_tokens=480, ignore_eos=True)), timeout=60)
    next(call)
    with pytest.raises(grpc.RpcError) as err:
        list(stubs.native.Generate(pb.GenerateRequest(request_id="dup", prompt="two"), timeout=10))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS and "request_id" in err.value.details()
    call.cancel()
    # The shared server takes at most 1 MiB per message; 600k two-byte ids are more.
    with pytest.raises(grpc.RpcError) as err:
        list(stubs.native.Generate(pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[300] * 600_000)), timeout=10))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_200_concurrent_streams_30_percent_cancelled(server, stubs, offline):
    """The rest complete exactly like the offline API; afterwards the pool is free and the server healthy."""
    pb = stubs.pb
    rng = random.Random(2024)
    n = 200
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(4, 40))] for _ in range(n)]
    params = [dict(max_tokens=rng.randint(8, 64), ignore_eos=True,
                   **(dict(temperature=0) if i % 2 else dict(temperature=0.8, seed=i))) for i in range(n)]
    cancel_after = {i: rng.randint(0, 6) for i in rng.sample(range(n), int(0.3 * n))}

    async def one(stub, i):
        call = stub.Generate(pb.GenerateRequest(request_id=f"c200-{i}", prompt_token_ids=pb.TokenIds(ids=prompts[i]),
                                                sampling_params=pb.SamplingParams(**params[i])), timeout=120)
        ids, last = [], None
        k = cancel_after.get(i)
        if k == 0:
            call.cancel()
            return i, None, None
        try:
            async for msg in call:
                ids.extend(msg.token_ids)
                last = msg
                if k is not None and len(ids) >= k:
                    call.cancel()
                    return i, None, None
        except asyncio.CancelledError:
            return i, None, None
        return i, ids, last

    async def main():
        async with grpc.aio.insecure_channel(server.addr) as ch:
            stub = make_stubs(ch).native
            return await asyncio.gather(*(one(stub, i) for i in range(n)))

    t0 = time.perf_counter()
    results = asyncio.run(main())
    elapsed = time.perf_counter() - t0
    completed = {i: (ids, last) for i, ids, last in results if ids is not None}
    assert len(completed) == n - len(cancel_after)
    refs = offline.generate([prompts[i] for i in completed], [SamplingParams(**params[i]) for i in completed],
                            use_tqdm=False)
    for (i, (ids, last)), ref in zip(completed.items(), refs):
        assert ids == ref.outputs[0].token_ids, f"request {i} differs from the offline API"
        assert last.finish_reason == "length" and last.usage.completion_tokens == params[i]["max_tokens"]
    info = wait_until(lambda: pool_is_free(stubs.native, pb), 10, "the pool to be free after cancellations",
                      detail=lambda: str(stubs.native.ServerInfo(pb.ServerInfoRequest())))
    assert info, f"pool not free after cancellations: {stubs.native.ServerInfo(pb.ServerInfoRequest())}"
    assert info.healthy
    assert stubs.health.Check(stubs.hpb.HealthCheckRequest(service="moelink.v1.Generation"), timeout=5).status == \
        stubs.hpb.HealthCheckResponse.SERVING
    print(f"200 streams in {elapsed:.1f} s")
