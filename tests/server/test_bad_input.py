"""Hostile input on both services (issue 11, items 1, 2, 4, 7, 8): refused early, named, bounded, off the loop.

Every request here is refused with INVALID_ARGUMENT naming its field and the
limit, and none of them costs the server more than its length to find out.
"""
from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from moelink.engine.contract.sampling_params import SamplingParams
from moelink.engine.server.limits import RequestLimits, bad_input_table

from tests.helpers.grpc_server import CallDetails
from tests.helpers.grpc_calls import native, refused, vllm
from tests.helpers.grpc_server import make_stubs, pool_is_free
from tests.helpers.waits import wait_until

LIMITS = RequestLimits()
INF = float("inf")


# -- item 7: non-finite and degenerate floats ------------------------------------------------
FLOAT_CASES = [  # (sampling params, field, allowed range as the message writes it)
    (dict(temperature=INF), "temperature", "[0, 100]"),
    (dict(temperature=1e30), "temperature", "[0, 100]"),
    (dict(repetition_penalty=1e-45), "repetition_penalty", "[0.01, 100]"),
    (dict(repetition_penalty=INF), "repetition_penalty", "[0.01, 100]"),
    (dict(top_p=float("nan")), "top_p", "(0, 1]"),
    (dict(min_p=-INF), "min_p", "[0, 1]"),
    (dict(presence_penalty=INF), "presence_penalty", "[-2, 2]"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty", "[-2, 2]"),
]


@pytest.mark.parametrize("service", ["native", "vllm"])
def test_non_finite_and_degenerate_floats_are_refused_naming_field_and_range(stubs, service):
    for sp, field, allowed in FLOAT_CASES:
        if service == "native":
            call = native(stubs, prompt="x", sampling_params=stubs.pb.SamplingParams(**sp))
        else:
            call = vllm(stubs, sampling_params=stubs.vpb.SamplingParams(**sp))
        err = refused(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (sp, err.details())
        assert f"sampling_params.{field}=" in err.details() and allowed in err.details(), err.details()
    assert pool_is_free(stubs.native, stubs.pb)


# -- item 8: undecodable requests -------------------------------------------------------------
def test_undecodable_requests_are_invalid_argument_on_both_services(stubs):
    pb, vpb, ch = stubs.pb, stubs.vpb, stubs.channel
    native = pb.GenerateRequest(request_id="utf8-abc", prompt="hi").SerializeToString()
    vllm = vpb.GenerateRequest(request_id="utf8-abc", tokenized=vpb.TokenizedInput(input_ids=[1])).SerializeToString()
    abort = pb.AbortRequest(request_ids=["utf8-abc"]).SerializeToString()
    corrupt = b"\x0a\xff\xff\xff\xff\x0f"  # a length that runs past the end
    cases = [
        (ch.unary_stream("/moelink.v1.Generation/Generate"), native.replace(b"abc", b"a\xffc")),
        (ch.unary_stream("/moelink.v1.Generation/Generate"), corrupt),
        (ch.unary_unary("/moelink.v1.Generation/Abort"), abort.replace(b"abc", b"a\xc3(")),
        (ch.unary_stream("/vllm.grpc.engine.VllmEngine/Generate"), vllm.replace(b"abc", b"a\xffc")),
        (ch.unary_stream("/vllm.grpc.engine.VllmEngine/Generate"), corrupt),
        (ch.unary_unary("/vllm.grpc.engine.VllmEngine/Abort"), corrupt),
    ]
    for method, data in cases:
        err = refused(lambda: method(data, timeout=10))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (data, err.details())
        assert "could not be decoded" in err.details(), err.details()
    # The services still answer.
    assert stubs.vllm.HealthCheck(vpb.HealthCheckRequest(), timeout=5).healthy


def test_the_gateway_listener_decodes_and_prechecks_like_the_main_port(thread_server, monkeypatch):
    """Behind smg (--api-key with --gateway-port) all traffic comes through the gateway listener: corrupt bytes
    get INVALID_ARGUMENT there too, and sampling_params too large for the limits are refused before parsing. An
    image model's mm_inputs get the same budget on both ports (issue 76 item 11: the gateway's was an ordinary
    field's 64 KiB, so behind --api-key every image over ~52x52 was refused): with a budget of 1 MiB (the tiny text
    model has none, so it is set here), 100 KB of mm_inputs pass the wire checks of both and are refused by the
    same later check, naming what the model takes."""
    from moelink.engine.server.serving import Serving

    monkeypatch.setattr(Serving, "mm_bytes", property(lambda self: 1 << 20))
    srv = thread_server(api_key="k", gateway_port=0)
    with grpc.insecure_channel(f"127.0.0.1:{srv.server.gateway_port}") as ch:
        s = make_stubs(ch)
        err = refused(lambda: ch.unary_stream("/vllm.grpc.engine.VllmEngine/Generate")(b"\x0a\x03\xff\xfe\xfd",
                                                                                          timeout=10))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "could not be decoded" in err.details(), err.details()
        err = refused(vllm(s, sampling_params=s.vpb.SamplingParams(stop_token_ids=[1] * 150_000)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "sampling_params is" in err.details(), err.details()
        assert s.vllm.HealthCheck(s.vpb.HealthCheckRequest(), timeout=5).healthy
        image = s.vpb.MultimodalInputs(mm_hashes=["x" * 100_000])
        gateway = refused(vllm(s, mm_inputs=image)).details()
    with grpc.insecure_channel(srv.addr) as ch:
        s = make_stubs(ch)
        main = refused(lambda: s.vllm.Generate(s.vpb.GenerateRequest(
            request_id="bad", stream=True, tokenized=s.vpb.TokenizedInput(input_ids=[1, 2, 3]), mm_inputs=image),
            timeout=10, metadata=[("authorization", "Bearer k")])).details()
    assert "bytes: at most" not in gateway and gateway == main, (gateway, main)


# -- item 2: capped lists, validated once -----------------------------------------------------
CAP_CASES = [  # (sampling params, what the message must say)
    (dict(stop_token_ids=[1] * (LIMITS.max_stop_token_ids + 1)), "sampling_params.stop_token_ids has"),
    (dict(stop=["x"] * (LIMITS.max_stop_strings + 1)), "sampling_params.stop has"),
    (dict(stop=["ok", "y" * (LIMITS.max_stop_string_chars + 1)]), "sampling_params.stop[1] has"),
]


@pytest.mark.parametrize("service", ["native", "vllm"])
def test_list_fields_are_capped(stubs, service):
    sp_cls = stubs.pb.SamplingParams if service == "native" else stubs.vpb.SamplingParams
    for sp, text in CAP_CASES:
        sp = sp_cls(max_tokens=4, **sp)
        call = native(stubs, prompt="x", sampling_params=sp) if service == "native" else vllm(stubs, sampling_params=sp)
        err = refused(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (text, err.details())
        assert text in err.details() and "at most" in err.details() and "--max-" in err.details(), err.details()
        assert len(err.details()) < 300
    ids = [f"r{i}" for i in range(LIMITS.max_abort_ids + 1)]
    abort = stubs.native.Abort if service == "native" else stubs.vllm.Abort
    req = (stubs.pb if service == "native" else stubs.vpb).AbortRequest(request_ids=ids)
    err = refused(lambda: abort(req, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_ids has" in err.details(), err.details()
    assert pool_is_free(stubs.native, stubs.pb)


def test_drain_aborts_more_requests_than_one_abort_rpc_may_name(thread_server):
    """--max-abort-ids caps an Abort RPC, not the server's own drain: with more requests running than the cap,
    drain used to raise and leave every stream running to its length."""
    srv = thread_server(limits=RequestLimits(max_abort_ids=1))
    results: dict[int, list] = {}

    def consume(i, s):
        try:
            results[i] = list(s.native.Generate(s.pb.GenerateRequest(
                request_id=f"d{i}", prompt_token_ids=s.pb.TokenIds(ids=[5, 6, 7]), sampling_params=s.pb.SamplingParams(
                    max_tokens=500, ignore_eos=True)), timeout=30))
        except grpc.RpcError as exc:
            results[i] = [exc]

    with grpc.insecure_channel(srv.addr) as ch:
        s = make_stubs(ch)
        threads = [threading.Thread(target=consume, args=(i, s)) for i in range(3)]
        for t in threads:
            t.start()
        assert wait_until(lambda: s.native.ServerInfo(s.pb.ServerInfoRequest()).active_requests == 3, 10,
                          "3 requests active")
        srv.call(srv.server.drain(grace=0), timeout=15)
        for t in threads:
            t.join(15)
    assert sorted(results) == [0, 1, 2]
    for i, msgs in results.items():
        assert not isinstance(msgs[-1], Exception), (i, msgs[-1])
        assert msgs[-1].finish_reason == "abort", (i, msgs[-1].finish_reason)


@pytest.mark.parametrize("service", ["native", "vllm"])
def test_sampling_params_larger_than_the_limits_allow_are_refused_before_parsing(stubs, service):
    many = [1] * 150_000  # ~150 KB packed: more than any SamplingParams within the limits
    if service == "native":
        call = native(stubs, prompt="x", sampling_params=stubs.pb.SamplingParams(stop_token_ids=many))
    else:
        call = vllm(stubs, sampling_params=stubs.vpb.SamplingParams(stop_token_ids=many))
    err = refused(call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "sampling_params is" in err.details(), err.details()
    assert f"more than {LIMITS.max_sampling_params_bytes()}" in err.details()


def _varint(n: int) -> bytes:
    out = b""
    while n >= 0x80:
        out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
    return out + bytes([n])


def test_requests_too_large_on_the_wire_are_not_parsed():
    """The 5 M stop ids and the 16 MB prompt of issue 11 cost the event loop 40 ms and 6-35 ms of parsing;
    their wire form says enough without it. What could still fit is parsed as usual."""
    import asyncio

    from smg_grpc_proto.generated import vllm_engine_pb2 as vpb

    from moelink.engine.server.decoding import DecodingInterceptor, field_bytes
    from moelink.engine.server.gen import moelink_v1_pb2 as pb

    def text_refusal(field, num_bytes):
        return f"{field} is too long" if num_bytes > 10_000 else None

    def ids_refusal(field, num_ids):
        return f"{field} has at least {num_ids} tokens" if num_ids >= 512 else None

    parsed = []

    def deserializer(message_type):
        def deserialize(raw):
            parsed.append(len(raw))
            return message_type.FromString(raw)
        return deserialize

    async def behaviour(request, context):
        return None

    async def wrap(method, message_type):
        handler = grpc.unary_stream_rpc_method_handler(behaviour, request_deserializer=deserializer(message_type))

        async def continuation(details):
            return handler

        details = CallDetails(method=method)
        wrapped = await DecodingInterceptor(LIMITS, text_refusal, ids_refusal).intercept_service(continuation, details)
        return wrapped.request_deserializer

    native = asyncio.run(wrap("/moelink.v1.Generation/Generate", pb.GenerateRequest))
    vllm = asyncio.run(wrap("/vllm.grpc.engine.VllmEngine/Generate", vpb.GenerateRequest))
    five_m = pb.GenerateRequest(request_id="r", prompt="hi", sampling_params=pb.SamplingParams(
        n=64, stop_token_ids=[1] * 5_000_000)).SerializeToString()
    assert field_bytes(five_m, 4) > 5_000_000 and field_bytes(five_m, 2) == 2 and field_bytes(b"\x0a\xff", 1) == 0
    long_text = "x" * 20_000
    refused = [
        (native, five_m, "sampling_params is"),
        (native, pb.GenerateRequest(prompt=long_text).SerializeToString(), "prompt is too long"),
        (vllm, vpb.GenerateRequest(text=long_text, sampling_params=vpb.SamplingParams(max_tokens=3)).SerializeToString(),
         "text is too long"),
    ]
    big_sp = pb.SamplingParams(stop_token_ids=[1] * 150_000).SerializeToString()
    # Padding: 64 tiny request_id fields used to push sampling_params past the scan, which then parsed it.
    padding = pb.GenerateRequest(request_id="p").SerializeToString() * 70
    refused += [
        (native, padding + pb.GenerateRequest(prompt="hi").SerializeToString() + b"\x22" + _varint(len(big_sp)) + big_sp,
         "top-level field occurrences"),
        (vllm, padding + vpb.GenerateRequest(text="x" * 5000).SerializeToString(), "top-level field occurrences"),
        # Token ids: 5000 bytes of packed ids are at least 1000 ids (5 bytes each at most), more than can fit.
        (native, pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[2 ** 31] * 1000)).SerializeToString(),
         "prompt_token_ids.ids has at least 1000 tokens"),
        (vllm, vpb.GenerateRequest(tokenized=vpb.TokenizedInput(input_ids=[1] * 5000)).SerializeToString(),
         "tokenized.input_ids has at least 1000 tokens"),
    ]
    for deserialize, data, message in refused:
        out = deserialize(data)
        assert message in out.message and parsed == [], (message, parsed)
    parsed_as_usual = [
        (native, pb.GenerateRequest(prompt="hi", sampling_params=pb.SamplingParams(stop_token_ids=[1] * 1000))),
        (native, pb.GenerateRequest(prompt="x" * 9_000)),
        # 2500 bytes of packed ids may be only 500 ids: parsed (the engine counts them).
        (native, pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[1] * 2500),
                                    sampling_params=pb.SamplingParams(stop=["y" * 256] * 8))),
        (vllm, vpb.GenerateRequest(tokenized=vpb.TokenizedInput(input_ids=[1] * 5000),
                                   sampling_params=vpb.SamplingParams(truncate_prompt_tokens=10))),
        # Truncation asked: the tail of a long text may fit.
        (vllm, vpb.GenerateRequest(text=long_text, sampling_params=vpb.SamplingParams(truncate_prompt_tokens=-1))),
    ]
    for deserialize, request in parsed_as_usual:
        assert deserialize(request.SerializeToString()) == request
    # The last member of a oneof wins: token ids after the text make the text irrelevant.
    later_ids = pb.GenerateRequest(prompt=long_text).SerializeToString() + \
        pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[1, 2])).SerializeToString()
    assert list(native(later_ids).prompt_token_ids.ids) == [1, 2]
    assert len(parsed) == 6


def test_a_request_is_validated_once_whatever_its_n(thread_server, monkeypatch):
    """The prompt and the sampling parameters are checked once per request, not once per sample (and not
    again by the engine): n=8 with 1024 stop ids costs one pass over each list."""
    srv = thread_server()
    calls = {"process_inputs": 0, "SamplingParams": 0}
    real_process = srv.engine.engine.process_inputs
    real_post_init = SamplingParams.__post_init__

    def process_inputs(*args, **kwargs):
        calls["process_inputs"] += 1
        return real_process(*args, **kwargs)

    def post_init(self):
        calls["SamplingParams"] += 1
        real_post_init(self)

    srv.engine.engine.process_inputs = process_inputs
    monkeypatch.setattr(SamplingParams, "__post_init__", post_init)
    stop_ids = [100 + i % 300 for i in range(LIMITS.max_stop_token_ids)]
    with grpc.insecure_channel(srv.addr) as ch:
        s = make_stubs(ch)
        msgs = list(s.native.Generate(s.pb.GenerateRequest(
            prompt_token_ids=s.pb.TokenIds(ids=[5, 6, 7]), sampling_params=s.pb.SamplingParams(
                n=8, seed=3, max_tokens=2, ignore_eos=True, stop_token_ids=stop_ids)), timeout=30))
        assert sorted(m.index for m in msgs if m.finish_reason) == list(range(8))
        assert calls == {"process_inputs": 1, "SamplingParams": 1}, calls
        calls.update(process_inputs=0, SamplingParams=0)
        msgs = list(s.vllm.Generate(s.vpb.GenerateRequest(
            tokenized=s.vpb.TokenizedInput(input_ids=[5, 6, 7]), stream=False, sampling_params=s.vpb.SamplingParams(
                n=8, seed=3, max_tokens=2, ignore_eos=True, stop_token_ids=stop_ids)), timeout=30))
        assert sorted(m.complete.index for m in msgs) == list(range(8))
        assert calls == {"process_inputs": 1, "SamplingParams": 1}, calls


# -- issue 14: max_tokens beyond the context ----------------------------------------------------
def test_max_tokens_beyond_the_context_is_invalid_argument_on_both_services(thread_server):
    """prompt + max_tokens > max_model_len is refused as vLLM refuses it (HTTP 400 through a gateway), with the
    numbers; it was silently clamped. Unset max_tokens on VllmEngine (smg's "no max_tokens") still means "up to
    the context", and truncate_prompt_tokens=-1 keeps what fits beside max_tokens."""
    srv = thread_server()
    with grpc.insecure_channel(srv.addr) as ch:
        s = make_stubs(ch)
        pb, vpb = s.pb, s.vpb
        cases = [
            (native(s, prompt_token_ids=pb.TokenIds(ids=[5] * 500), sampling_params=pb.SamplingParams(max_tokens=13)),
             "prompt_token_ids has 500 tokens (13 > 512 - 500)"),
            (native(s, prompt="hi", sampling_params=pb.SamplingParams(max_tokens=600)), "(600 > 512 - "),
            (vllm(s, tokenized=vpb.TokenizedInput(input_ids=[5] * 500), sampling_params=vpb.SamplingParams(
                max_tokens=13)), "tokenized.input_ids has 500 tokens (13 > 512 - 500)"),
            (vllm(s, text="hi", sampling_params=vpb.SamplingParams(max_tokens=600)), "(600 > 512 - "),
        ]
        for call, numbers in cases:
            err = refused(call)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
            assert err.details().startswith("sampling_params.max_tokens=") and \
                "maximum context length is 512 tokens" in err.details() and numbers in err.details(), err.details()
        # At the limit, and unset: the request runs to the end of the context.
        msgs = list(s.vllm.Generate(vpb.GenerateRequest(tokenized=vpb.TokenizedInput(input_ids=[5] * 500),
                    stream=False, sampling_params=vpb.SamplingParams(max_tokens=12, ignore_eos=True)), timeout=30))
        assert msgs[-1].complete.completion_tokens == 12 and msgs[-1].complete.finish_reason == "length"
        msgs = list(s.vllm.Generate(vpb.GenerateRequest(tokenized=vpb.TokenizedInput(input_ids=[5] * 505),
                    stream=False, sampling_params=vpb.SamplingParams(ignore_eos=True)), timeout=30))
        assert msgs[-1].complete.completion_tokens == 7 and msgs[-1].complete.finish_reason == "length"
        msgs = list(s.vllm.Generate(vpb.GenerateRequest(tokenized=vpb.TokenizedInput(input_ids=[5] * 600),
                    stream=False, sampling_params=vpb.SamplingParams(truncate_prompt_tokens=-1, max_tokens=20,
                                                                     ignore_eos=True)), timeout=30))
        assert (msgs[-1].complete.prompt_tokens, msgs[-1].complete.completion_tokens) == (492, 20)
        msgs = list(s.native.Generate(pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[5] * 505),
                    sampling_params=pb.SamplingParams(unlimited_tokens=True, ignore_eos=True)), timeout=30))
        assert msgs[-1].usage.completion_tokens == 7 and msgs[-1].finish_reason == "length"
        assert wait_until(lambda: pool_is_free(s.native, pb), 10, "the KV pool to be free")


# -- docs/serving.md ---------------------------------------------------------------------------
def test_docs_bad_input_table_is_rendered_from_the_enforced_limits():
    from moelink.engine.server.limits import DOC_PAGE, doc_table

    table = doc_table((Path(__file__).resolve().parents[2] / DOC_PAGE).read_text())
    assert table is not None, f"{DOC_PAGE} has no bad-input table between its markers"
    assert table == bad_input_table(), f"{DOC_PAGE}'s table is stale: python -m moelink.engine.server.limits --doc"
