"""Hostile input on both services (issue 11, items 1, 2, 4, 7, 8): refused early, named, bounded, off the loop.

Every request here is refused with INVALID_ARGUMENT naming its field and the
limit, and none of them costs the server more than its length to find out.
"""
from __future__ import annotations

import json
import logging
import sys
import threading
from pathlib import Path

import grpc
import pytest

from moelink.engine.safe_text import MAX_SHOWN_CHARS, shown
from moelink.engine.sampling_params import SamplingParams
from moelink.engine.server.limits import RequestLimits, bad_input_table

LIMITS = RequestLimits()
INF = float("inf")


def _refused(call):
    """The RpcError `call()` ends with (a stream is read to its end)."""
    with pytest.raises(grpc.RpcError) as err:
        out = call()
        if hasattr(out, "__next__"):
            list(out)
    return err.value


def _native(stubs, rid="bad", **req):
    return lambda: stubs.native.Generate(stubs.pb.GenerateRequest(request_id=rid, **req), timeout=10)


def _vllm(stubs, rid="bad", **req):
    if "text" not in req:
        req.setdefault("tokenized", stubs.vpb.TokenizedInput(input_ids=[1, 2, 3]))
    return lambda: stubs.vllm.Generate(stubs.vpb.GenerateRequest(request_id=rid, stream=True, **req), timeout=10)


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
def test_non_finite_and_degenerate_floats_are_refused_naming_field_and_range(stubs, util, service):
    for sp, field, allowed in FLOAT_CASES:
        if service == "native":
            call = _native(stubs, prompt="x", sampling_params=stubs.pb.SamplingParams(**sp))
        else:
            call = _vllm(stubs, sampling_params=stubs.vpb.SamplingParams(**sp))
        err = _refused(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (sp, err.details())
        assert f"sampling_params.{field}=" in err.details() and allowed in err.details(), err.details()
    assert util.pool_is_free(stubs.native, stubs.pb)


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
        err = _refused(lambda: method(data, timeout=10))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (data, err.details())
        assert "could not be decoded" in err.details(), err.details()
    # The services still answer.
    assert stubs.vllm.HealthCheck(vpb.HealthCheckRequest(), timeout=5).healthy


def test_the_gateway_listener_decodes_and_prechecks_like_the_main_port(thread_server, util):
    """Behind smg (--api-key with --gateway-port) all traffic comes through the gateway listener: corrupt bytes
    get INVALID_ARGUMENT there too, and sampling_params too large for the limits are refused before parsing."""
    srv = thread_server(api_key="k", gateway_port=0)
    with grpc.insecure_channel(f"127.0.0.1:{srv.server.gateway_port}") as ch:
        s = util.make_stubs(ch)
        err = _refused(lambda: ch.unary_stream("/vllm.grpc.engine.VllmEngine/Generate")(b"\x0a\x03\xff\xfe\xfd",
                                                                                          timeout=10))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "could not be decoded" in err.details(), err.details()
        err = _refused(_vllm(s, sampling_params=s.vpb.SamplingParams(stop_token_ids=[1] * 150_000)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "sampling_params is" in err.details(), err.details()
        assert s.vllm.HealthCheck(s.vpb.HealthCheckRequest(), timeout=5).healthy


# -- item 2: capped lists, validated once -----------------------------------------------------
CAP_CASES = [  # (sampling params, what the message must say)
    (dict(stop_token_ids=[1] * (LIMITS.max_stop_token_ids + 1)), "sampling_params.stop_token_ids has"),
    (dict(stop=["x"] * (LIMITS.max_stop_strings + 1)), "sampling_params.stop has"),
    (dict(stop=["ok", "y" * (LIMITS.max_stop_string_chars + 1)]), "sampling_params.stop[1] has"),
]


@pytest.mark.parametrize("service", ["native", "vllm"])
def test_list_fields_are_capped(stubs, util, service):
    sp_cls = stubs.pb.SamplingParams if service == "native" else stubs.vpb.SamplingParams
    for sp, text in CAP_CASES:
        sp = sp_cls(max_tokens=4, **sp)
        call = _native(stubs, prompt="x", sampling_params=sp) if service == "native" else _vllm(stubs, sampling_params=sp)
        err = _refused(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (text, err.details())
        assert text in err.details() and "at most" in err.details() and "--max-" in err.details(), err.details()
        assert len(err.details()) < 300
    ids = [f"r{i}" for i in range(LIMITS.max_abort_ids + 1)]
    abort = stubs.native.Abort if service == "native" else stubs.vllm.Abort
    req = (stubs.pb if service == "native" else stubs.vpb).AbortRequest(request_ids=ids)
    err = _refused(lambda: abort(req, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_ids has" in err.details(), err.details()
    assert util.pool_is_free(stubs.native, stubs.pb)


def test_drain_aborts_more_requests_than_one_abort_rpc_may_name(thread_server, util):
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
        s = util.make_stubs(ch)
        threads = [threading.Thread(target=consume, args=(i, s)) for i in range(3)]
        for t in threads:
            t.start()
        assert util.wait_until(lambda: s.native.ServerInfo(s.pb.ServerInfoRequest()).active_requests == 3, 10)
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
        call = _native(stubs, prompt="x", sampling_params=stubs.pb.SamplingParams(stop_token_ids=many))
    else:
        call = _vllm(stubs, sampling_params=stubs.vpb.SamplingParams(stop_token_ids=many))
    err = _refused(call)
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
    from types import SimpleNamespace

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

        details = SimpleNamespace(method=method, invocation_metadata=())
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


def test_a_request_is_validated_once_whatever_its_n(thread_server, util, monkeypatch):
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
        s = util.make_stubs(ch)
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


# -- item 1: long text prompts -----------------------------------------------------------------
class _SpyBackend:
    """Stands in for the `tokenizers` object: records (thread name, text length) of every encode."""

    def __init__(self, real):
        self._real, self.calls = real, []

    def encode(self, text, *a, **k):
        self.calls.append((threading.current_thread().name, len(text)))
        return self._real.encode(text, *a, **k)

    def encode_batch(self, texts, *a, **k):
        self.calls.extend((threading.current_thread().name, len(t)) for t in texts)
        return self._real.encode_batch(texts, *a, **k)

    def __getattr__(self, name):
        return getattr(self._real, name)


def test_text_that_cannot_fit_is_refused_before_tokenizing_and_long_text_is_tokenized_off_the_loop(thread_server,
                                                                                                    util):
    srv = thread_server()
    serving = srv.server.serving
    # The tiny tokenizer's longest token is "<|endoftext|>": 13 bytes, no normalizer.
    assert serving.bytes_per_token == 13 and serving.max_prompt_bytes == 511 * 13
    spy = _SpyBackend(serving.tokenizer._tok)
    serving.tokenizer._tok = spy
    with grpc.insecure_channel(srv.addr, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        s = util.make_stubs(ch)
        just_over = "ab" * (serving.max_prompt_bytes // 2) + "abc"
        for text in ("x" * (1 << 20), just_over, "é" * (serving.max_prompt_bytes // 2 + 1)):
            for call in (_native(s, prompt=text), _vllm(s, text=text)):
                err = _refused(call)
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
                assert "too long" in err.details() and "max_model_len=512" in err.details(), err.details()
        assert spy.calls == [], "text that cannot fit was tokenized"
    # (Those were refused from their size on the wire; Serving.prepare, behind it, refuses the same way.)
    with pytest.raises(ValueError, match="prompt is too long"):
        srv.call(serving.prepare("t", just_over, SamplingParams(), "prompt"))
    assert spy.calls == []
    with grpc.insecure_channel(srv.addr) as ch:
        s = util.make_stubs(ch)
        # Text that may fit, but is long: tokenized on a worker thread (here it then turns out too long).
        text = "the quick brown fox " * 200
        assert 2048 < len(text) < serving.max_prompt_bytes
        err = _refused(_native(s, prompt=text))
        assert "prompt has" in err.details() and "tokens, too long" in err.details(), err.details()
        assert len(spy.calls) == 1 and spy.calls[0][0] != srv.thread.name, spy.calls
        # With truncate_prompt_tokens only the last tokens stay: a text far over the bound is tokenized as its
        # tail alone, which gives the same last tokens as the whole text.
        spy.calls.clear()
        text = "Words, words, words: 1234 ünïcödé. " * 30_000
        msgs = list(s.vllm.Generate(s.vpb.GenerateRequest(text=text, stream=False, sampling_params=s.vpb.SamplingParams(
            truncate_prompt_tokens=-1, max_tokens=2)), timeout=30))
        assert msgs[-1].complete.prompt_tokens == 511
        assert spy.calls and max(n for _, n in spy.calls) <= 2 * serving.max_prompt_bytes
    whole = spy._real.encode(text).ids
    processed = srv.call(serving.prepare("t", text, SamplingParams(), "text", keep=511))
    assert processed.prompt_token_ids == whole[-511:]


class _LenOnly:
    """A token-id list of which only the length may be read: touching an entry (or slicing) is recorded."""

    def __init__(self, n):
        self.n, self.touched = n, []

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        self.touched.append(index)
        raise AssertionError("an entry was looked at")

    def __iter__(self):
        self.touched.append("iter")
        raise AssertionError("the list was iterated")


def test_token_ids_that_cannot_fit_even_truncated_are_refused_on_their_length(thread_server, util):
    """truncate_prompt_tokens >= max_model_len keeps more than can fit: 30 M ids were copied on the event loop
    (1.5 s without health checks) before the refusal."""
    srv = thread_server()
    serving = srv.server.serving
    for keep in (None, 512, 10 ** 6):
        ids = _LenOnly(30_000_000)
        with pytest.raises(ValueError, match="has .* tokens, too long"):
            srv.call(serving.prepare("t", ids, SamplingParams(), "tokenized.input_ids", keep=keep))
        assert ids.touched == [], keep
    with grpc.insecure_channel(srv.addr) as ch:
        s = util.make_stubs(ch)
        err = _refused(_vllm(s, tokenized=s.vpb.TokenizedInput(input_ids=[1] * 600),
                             sampling_params=s.vpb.SamplingParams(truncate_prompt_tokens=10 ** 6)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "has 600 tokens, too long" in err.details()
        msgs = list(s.vllm.Generate(s.vpb.GenerateRequest(tokenized=s.vpb.TokenizedInput(input_ids=[1] * 600),
                    stream=False, sampling_params=s.vpb.SamplingParams(truncate_prompt_tokens=100, max_tokens=1)),
                    timeout=30))
        assert msgs[-1].complete.prompt_tokens == 100


def test_16_mb_prompt_is_refused_fast_and_memory_does_not_stay(spawn_server, util):
    """A 16 MB text prompt used to freeze the server for ~18 s and leave RSS 2 GB higher."""
    srv = spawn_server()

    def rss_mb():
        with open(f"/proc/{srv.pid}/status") as f:
            return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) / 1024

    text = "The quick brown fox jumps over the lazy dog. " * (16 * 2 ** 20 // 45)
    with grpc.insecure_channel(srv.addr, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        s = util.make_stubs(ch)
        list(s.native.Generate(s.pb.GenerateRequest(prompt="warm up", sampling_params=s.pb.SamplingParams(max_tokens=2)),
                               timeout=30))
        before = rss_mb()
        for i in range(3):
            for call in (_native(s, prompt=text), _vllm(s, text=text)):
                err = _refused(call)
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "too long" in err.details(), err.details()
            assert s.health.Check(s.hpb.HealthCheckRequest(service=""), timeout=2).status == \
                s.hpb.HealthCheckResponse.SERVING
        after = rss_mb()
    # Tokenizing one of them took RSS from 0.4 to 2.5 GB. What is left is gRPC's own: a bare grpc.aio server
    # that receives 16 MB messages and does nothing with them also ends a few hundred MB higher.
    assert after - before < 500, f"RSS {before:.0f} MB -> {after:.0f} MB after six 16 MB prompts"


# -- item 4: logs and error messages -----------------------------------------------------------
def test_shown_escapes_and_bounds_client_values():
    assert shown("a\nb") == "'a\\nb'" and shown("a\nb\x1b[2J\u2028", quote=False) == "a\\nb\\x1b[2J\\u2028"
    long = shown("x" * 1_000_000)
    assert len(long) < MAX_SHOWN_CHARS + 40 and long.endswith("(1000000 characters in all)")
    huge_list = shown(list(range(5_000_000)))
    assert len(huge_list) < MAX_SHOWN_CHARS + 40 and "5000000 items" in huge_list
    with pytest.raises(ValueError) as err:
        SamplingParams(stop=["s" * 10_000] * 10_000 + [""])
    assert len(str(err.value)) < 400


def test_client_values_cannot_forge_or_flood_log_lines(server, stubs):
    pb = stubs.pb
    forged = "innocent\n2099-01-01 00:00:00,000 INFO moelink.engine.server.serving: FORGED by a client"
    # Admitted: its id goes into the "request admitted" and "request finished" lines.
    list(stubs.native.Generate(pb.GenerateRequest(request_id=forged, prompt="hi", sampling_params=pb.SamplingParams(
        max_tokens=2)), timeout=30))
    # Refused: the id and the offending value go into the "refused" line and the status.
    huge_id = "i" * 500_000
    err = _refused(_native(stubs, rid=huge_id, prompt="hi"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and len(err.details()) < 300, len(err.details())
    err = _refused(_native(stubs, rid=forged, prompt="x", sampling_params=pb.SamplingParams(stop=["s" * 200] * 30 + [""])))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and len(err.details()) < 1000, len(err.details())
    logs = server.logs()
    assert "FORGED" in logs
    assert not any(line.startswith("2099-01-01") for line in logs.splitlines()), "a client wrote its own log line"
    assert max(len(line) for line in logs.splitlines()) < 2000


def test_text_log_fields_and_tracebacks_cannot_plant_fields_or_lines():
    """A request_id with spaces and '=' used to plant fields (finish_reason=length) in the text log; an exception
    message with a newline, lines of its own."""
    import re

    from moelink.engine.server.server import _TextWithExtras

    fmt = _TextWithExtras("%(asctime)s %(levelname)s %(name)s: %(message)s")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "request finished", (), None)
    record.request_id = 'x finish_reason=length latency_s=0 q="\\'
    record.finish_reason = "stop"
    line = fmt.format(record)
    fields = dict(re.findall(r' (\w+)=("(?:[^"\\]|\\.)*"|[^ "]*)', line.split(": request finished", 1)[1]))
    assert fields == {"request_id": '"x finish_reason=length latency_s=0 q=\\"\\\\"', "finish_reason": "stop"}, line
    try:
        raise ValueError("boom\n2099-01-01 00:00:00,000 INFO FORGED" + "\n" * 50_000)
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = fmt.format(record)
    assert text.count("\n") < 1000 and len(text) < 30_000
    assert all(i == 0 or line.startswith("  ") for i, line in enumerate(text.split("\n"))), text[:500]


def test_json_log_fields_are_bounded():
    from moelink.engine.server.server import JsonFormatter

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "request admitted", (), None)
    record.request_id = "a\n" * 100_000
    doc = json.loads(JsonFormatter().format(record))
    assert len(doc["request_id"]) < MAX_SHOWN_CHARS + 40


# -- README -----------------------------------------------------------------------------------
def test_readme_bad_input_table_is_rendered_from_the_enforced_limits():
    from moelink.engine.server.limits import readme_table

    table = readme_table((Path(__file__).resolve().parents[2] / "README.md").read_text())
    assert table is not None, "README has no bad-input table between its markers"
    assert table == bad_input_table(), "README's table is stale: python -m moelink.engine.server.limits --readme README.md"
