"""vllm.grpc.engine.VllmEngine (smg-grpc-proto stubs) against a real `moelink serve`."""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import grpc
import pytest
from smg_grpc_proto.generated import common_pb2

from moelink.engine import SamplingParams

from tests.helpers.grpc_server import pool_is_free
from tests.helpers.waits import wait_until


def _generate(stubs, ids, stream: bool, rid: str, **sp):
    vpb = stubs.vpb
    return list(stubs.vllm.Generate(vpb.GenerateRequest(
        request_id=rid, tokenized=vpb.TokenizedInput(original_text="", input_ids=ids), stream=stream,
        sampling_params=vpb.SamplingParams(**sp)), timeout=60))


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_generate_matches_offline(stubs, offline, stream, sampling):
    ids = [3, 141, 59, 265, 35, 89, 79]
    sp = dict(max_tokens=20, ignore_eos=True, logprobs=2)
    sp.update(dict(temperature=0.0) if sampling == "greedy" else dict(temperature=0.8, top_p=0.9, top_k=30, seed=99))
    ref = offline.generate([ids], SamplingParams(**sp), use_tqdm=False)[0].outputs[0]
    msgs = _generate(stubs, ids, stream, f"v-{sampling}-{stream}", **sp)
    chunks = [m.chunk for m in msgs if m.HasField("chunk")]
    completes = [m.complete for m in msgs if m.HasField("complete")]
    assert len(completes) == 1 and msgs[-1].HasField("complete"), "each index ends with exactly one GenerateComplete"
    done = completes[0]
    assert done.finish_reason == "length" and done.prompt_tokens == len(ids) and done.completion_tokens == 20
    if stream:
        assert [t for c in chunks for t in c.token_ids] == ref.token_ids  # chunk ids are deltas
        assert all(len(c.token_ids) >= 1 for c in chunks)
        assert all(c.completion_tokens == len(c.token_ids) for c in chunks)  # per-chunk counts, as vLLM sends
        assert all(c.prompt_tokens == len(ids) for c in chunks)
        lps = [v for c in chunks for v in c.output_logprobs.token_logprobs]
    else:
        assert not chunks and list(done.output_ids) == ref.token_ids
        lps = list(done.output_logprobs.token_logprobs)
        assert len(done.output_logprobs.top_logprobs) == 20
        assert all(len(t.token_ids) == 2 for t in done.output_logprobs.top_logprobs)
    assert lps == pytest.approx([ref.logprobs[i][t].logprob for i, t in enumerate(ref.token_ids)], abs=1e-5)


@pytest.mark.parametrize("stream", [True, False])
def test_prompt_logprobs_ride_the_first_message(stubs, offline, stream):
    """sampling_params.prompt_logprobs: InputLogProbs (a value per prompt token but the first, its id, the top-n),
    in the first chunk of a stream or in the GenerateComplete; equal to the Python API's."""
    ids = [3, 141, 59, 265, 35, 89, 79, 12, 400]
    sp = dict(max_tokens=3, ignore_eos=True, temperature=0.0, prompt_logprobs=2)
    ref = offline.generate([ids], SamplingParams(**sp), use_tqdm=False)[0].prompt_logprobs
    msgs = _generate(stubs, ids, stream, f"v-plp-{stream}", **sp)
    carrying = [m.chunk if m.HasField("chunk") else m.complete for m in msgs
                if (m.chunk if m.HasField("chunk") else m.complete).HasField("input_logprobs")]
    assert len(carrying) == 1 and (carrying[0] is msgs[0].chunk if stream else msgs[-1].HasField("complete"))
    got = carrying[0].input_logprobs
    assert list(got.token_ids) == ids and not got.token_logprobs[0].HasField("value")
    # Equal to float32's rounding: the two engines may take a row through different CPU kernels (a few tokens' experts
    # run natively, more through the references' GEMMs: kernels/cpu_native.py), a few ulps apart at |logprob| ~ 16.
    assert [v.value for v in got.token_logprobs[1:]] == pytest.approx(
        [ref[i][t].logprob for i, t in enumerate(ids) if i], rel=1e-6, abs=1e-6)
    assert [list(t.token_ids) for t in got.top_logprobs[1:]] == [
        [t for t, lp in sorted(ref[i].items(), key=lambda kv: kv[1].rank)][:2] for i in range(1, len(ids))]


def test_n2_each_index_completes_and_stop_token_is_reported(stubs, offline):
    ids = [10, 20, 30]
    msgs = _generate(stubs, ids, True, "v-n2", n=2, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True)
    for i in range(2):
        got = [t for m in msgs if m.HasField("chunk") and m.chunk.index == i for t in m.chunk.token_ids]
        ref = offline.generate([ids], SamplingParams(temperature=1.0, seed=5 + i, max_tokens=8, ignore_eos=True),
                               use_tqdm=False)[0].outputs[0]
        assert got == ref.token_ids
        assert [m.complete.index for m in msgs if m.HasField("complete")].count(i) == 1
    base = offline.generate([ids], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)[0]
    stop = base.outputs[0].token_ids[6]
    msgs = _generate(stubs, ids, False, "v-stop", temperature=0.0, max_tokens=30, ignore_eos=True,
                     stop_token_ids=[stop])
    done = msgs[-1].complete
    first = base.outputs[0].token_ids.index(stop)
    assert done.finish_reason == "stop" and done.matched_token_id == stop
    assert list(done.output_ids) == base.outputs[0].token_ids[: first + 1]


def test_model_info_is_enough_for_a_gateway(stubs, offline, model_path):
    info = stubs.vllm.GetModelInfo(stubs.vpb.GetModelInfoRequest(), timeout=10)
    assert info.served_model_name == "tiny-moe" and info.is_generation
    assert info.max_context_length == 512 and info.max_req_input_len == 511
    assert list(info.eos_token_ids) == sorted(offline.engine.eos_token_ids)
    assert info.architectures == ["Qwen3MoeForCausalLM"] and info.model_type == "qwen3_moe"
    tok_dir = Path(info.tokenizer_path)
    assert tok_dir.is_absolute() and tok_dir == Path(info.model_path) == Path(model_path).resolve()
    assert (tok_dir / "tokenizer.json").is_file()
    assert json.loads((tok_dir / "tokenizer_config.json").read_text()).get("chat_template")


def test_get_tokenizer_zip(stubs, model_path):
    chunks = list(stubs.vllm.GetTokenizer(common_pb2.GetTokenizerRequest(), timeout=10))
    data = b"".join(c.data for c in chunks)
    assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest() and all(not c.sha256 for c in chunks[:-1])
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = set(zf.namelist())
        assert {"tokenizer.json", "tokenizer_config.json"} <= names
        assert zf.read("tokenizer.json") == (Path(model_path) / "tokenizer.json").read_bytes()


def test_server_info_loads_health_abort(stubs):
    vpb = stubs.vpb
    call = stubs.vllm.Generate(vpb.GenerateRequest(
        request_id="v-long", tokenized=vpb.TokenizedInput(input_ids=[1, 2, 3, 4]), stream=True,
        sampling_params=vpb.SamplingParams(max_tokens=480, ignore_eos=True)), timeout=60)
    next(call)
    loads = stubs.vllm.GetLoads(vpb.GetLoadsRequest(), timeout=10)
    assert loads.dp_rank_count == 1 and loads.version.startswith("moelink")
    load = loads.loads[0]
    assert load.num_running_reqs == 1 and load.num_used_tokens > 0 and load.max_total_num_tokens == 4096 * 16
    assert 0 < load.token_usage < 1 and load.max_running_requests == 256
    si = stubs.vllm.GetServerInfo(vpb.GetServerInfoRequest(), timeout=10)
    assert si.active_requests == 1 and si.uptime_seconds > 0 and si.block_size == 16 and si.max_num_seqs == 256
    assert si.last_receive_timestamp > 0 and si.server_type == "moelink-grpc"
    hc = stubs.vllm.HealthCheck(vpb.HealthCheckRequest(), timeout=5)
    assert hc.healthy
    stubs.vllm.Abort(vpb.AbortRequest(request_ids=["v-long"]), timeout=5)
    rest = list(call)
    assert rest[-1].HasField("complete") and rest[-1].complete.finish_reason == "abort"
    assert wait_until(lambda: pool_is_free(stubs.native, stubs.pb), 5, "the pool to be free after Abort")
    with pytest.raises(grpc.RpcError) as err:
        list(stubs.vllm.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest(), timeout=5))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def _bad_vllm(vpb):
    sp, tok = vpb.SamplingParams, vpb.TokenizedInput
    ok = tok(input_ids=[1, 2, 3])
    return [
        (dict(), "input"),
        (dict(tokenized=tok(input_ids=[])), "tokenized.input_ids"),
        (dict(tokenized=tok(input_ids=[1, 70000])), "tokenized.input_ids[1]"),
        (dict(tokenized=tok(input_ids=[1] * 520)), "max_model_len"),
        (dict(text=""), "text"),
        (dict(tokenized=ok, sampling_params=sp(temperature=-0.5)), "sampling_params.temperature"),
        (dict(tokenized=ok, sampling_params=sp(top_p=2.0)), "sampling_params.top_p"),
        (dict(tokenized=ok, sampling_params=sp(min_p=-1.0)), "sampling_params.min_p"),
        (dict(tokenized=ok, sampling_params=sp(max_tokens=0)), "sampling_params.max_tokens"),
        (dict(tokenized=ok, sampling_params=sp(logprobs=-1)), "sampling_params.logprobs"),
        (dict(tokenized=ok, sampling_params=sp(prompt_logprobs=-1)), "sampling_params.prompt_logprobs"),
        (dict(tokenized=ok, sampling_params=sp(prompt_logprobs=21)), "sampling_params.prompt_logprobs"),
        (dict(tokenized=ok, sampling_params=sp(json_schema="{not json")), "sampling_params.json_schema"),
        (dict(tokenized=ok, sampling_params=sp(json_schema='{"type": "nope"}')), "sampling_params.json_schema"),
        (dict(tokenized=ok, sampling_params=sp(regex="(a+")), "sampling_params.regex"),
        (dict(tokenized=ok, sampling_params=sp(structural_tag="{}")), "sampling_params.structural_tag"),
        (dict(tokenized=ok, sampling_params=sp(logit_bias={100000: 1.0})), "sampling_params.logit_bias"),
        (dict(tokenized=ok, sampling_params=sp(n=16385)), "sampling_params.n"),  # --max-n: vLLM's 16384
        (dict(tokenized=ok, sampling_params=sp(truncate_prompt_tokens=0)), "sampling_params.truncate_prompt_tokens"),
        (dict(tokenized=ok, mm_inputs=vpb.MultimodalInputs(mm_hashes=["x"])), "mm_inputs"),
        (dict(tokenized=ok, sampling_params=sp(stop_token_ids=[100000])), "sampling_params.stop_token_ids"),
    ]


def test_bad_inputs_are_invalid_argument_naming_the_field(stubs):
    cases = _bad_vllm(stubs.vpb)
    assert len(cases) >= 10
    for i, (req, field) in enumerate(cases):
        with pytest.raises(grpc.RpcError) as err:
            list(stubs.vllm.Generate(stubs.vpb.GenerateRequest(request_id=f"bad-{i}", stream=True, **req), timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (req, err.value.details())
        assert field in err.value.details(), (field, err.value.details())
    assert pool_is_free(stubs.native, stubs.pb)


def test_truncate_prompt_tokens_keeps_the_tail(stubs, offline):
    ids = list(range(5, 45))
    msgs = _generate(stubs, ids, False, "v-trunc", temperature=0.0, max_tokens=6, ignore_eos=True,
                     truncate_prompt_tokens=10)
    ref = offline.generate([ids[-10:]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
    assert list(msgs[-1].complete.output_ids) == ref.outputs[0].token_ids and msgs[-1].complete.prompt_tokens == 10


def test_proto_requests_detokenize_only_for_stop_strings():
    """The VllmEngine protocol returns token ids (the gateway detokenizes): the engine decodes text only
    when a stop string has to be matched on it."""
    from smg_grpc_proto.generated import vllm_engine_pb2 as vpb

    from moelink.engine.server.vllm_engine import sampling_params_from_proto

    plain, _ = sampling_params_from_proto(vpb.SamplingParams(max_tokens=4))
    stops, _ = sampling_params_from_proto(vpb.SamplingParams(max_tokens=4, stop=["\n\n"]))
    assert plain.detokenize is False and stops.detokenize is True
