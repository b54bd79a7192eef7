"""The documented minimum is accepted, and the queue limit counts what it says (issue 32, item 11).

Before: `repetition_penalty=0.01`, the documented minimum, arrived as the float32 0.009999999776 and was
refused; and `--max-queued-requests 4` counted a request with n=64 as one, so 240 sequences could wait.
Now proto floats are read as the decimal the client sent, and the limit counts sequences (requests x n).
"""
from __future__ import annotations

import struct

import grpc
import pytest

from tests.helpers.grpc_server import make_stubs, pool_is_free
from tests.helpers.waits import wait_until


def test_proto_floats_are_read_as_sent():
    from moelink.engine.server.proto_params import as_sent

    f32 = lambda x: struct.unpack("<f", struct.pack("<f", x))[0]  # noqa: E731
    assert f32(0.01) != 0.01 and as_sent(f32(0.01)) == 0.01
    assert as_sent(f32(0.7)) == 0.7 and as_sent(f32(100.0)) == 100.0 and as_sent(f32(1e-45)) == 1e-45
    assert as_sent(None) is None and as_sent(3) == 3


def test_the_documented_minimum_repetition_penalty_is_accepted_on_both_services(thread_server):
    srv = thread_server()
    with grpc.insecure_channel(srv.addr) as ch:
        s = make_stubs(ch)
        out = list(s.native.Generate(s.pb.GenerateRequest(prompt_token_ids=s.pb.TokenIds(ids=[5, 6, 7]),
                                     sampling_params=s.pb.SamplingParams(max_tokens=3, repetition_penalty=0.01)),
                                     timeout=60))
        assert out[-1].finish_reason == "length"
        msgs = list(s.vllm.Generate(s.vpb.GenerateRequest(tokenized=s.vpb.TokenizedInput(input_ids=[5, 6, 7]),
                                    sampling_params=s.vpb.SamplingParams(max_tokens=3, repetition_penalty=0.01)),
                                    timeout=60))
        assert msgs[-1].complete.finish_reason == "length"
        # Below the minimum is still refused, naming the field.
        with pytest.raises(grpc.RpcError) as err:
            list(s.native.Generate(s.pb.GenerateRequest(prompt_token_ids=s.pb.TokenIds(ids=[5]),
                                   sampling_params=s.pb.SamplingParams(repetition_penalty=0.0099)), timeout=60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "repetition_penalty" in err.value.details()


def test_max_queued_requests_counts_sequences(thread_server):
    srv = thread_server(engine_kw=dict(max_num_seqs=1, max_model_len=1024), max_queued_requests=4)
    long = dict(max_tokens=900, ignore_eos=True, temperature=0)
    with grpc.insecure_channel(srv.addr) as ch:
        s = make_stubs(ch)
        pb = s.pb
        running = s.native.Generate(pb.GenerateRequest(request_id="A", prompt="a", sampling_params=pb.SamplingParams(
            **long)), timeout=60)
        next(running)  # A holds the only sequence slot
        three = s.native.Generate(pb.GenerateRequest(request_id="B", prompt="b", sampling_params=pb.SamplingParams(
            n=3, **long)), timeout=60)
        wait_until(lambda: s.native.ServerInfo(pb.ServerInfoRequest()).queued_requests == 1, 10, "B to be queued")
        # 3 sequences wait; 2 more would be 5 > 4.
        with pytest.raises(grpc.RpcError) as err:
            list(s.native.Generate(pb.GenerateRequest(request_id="C", prompt="c", sampling_params=pb.SamplingParams(
                n=2, max_tokens=2)), timeout=10))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
        assert "3 sequences" in err.value.details() and "--max-queued-requests" in err.value.details()
        # One more fits exactly.
        one = s.native.Generate(pb.GenerateRequest(request_id="D", prompt="d", sampling_params=pb.SamplingParams(
            max_tokens=2)), timeout=60)
        wait_until(lambda: s.native.ServerInfo(pb.ServerInfoRequest()).queued_requests == 2, 10, "D to be queued")
        for call in (running, three, one):
            call.cancel()
        assert wait_until(lambda: pool_is_free(s.native, pb), 20, "the pool to be free")
