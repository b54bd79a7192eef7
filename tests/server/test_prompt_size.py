"""Prompts too long to fit (issue 11, item 1): refused by their size before tokenizing or copying, long text
tokenized off the event loop, and a 16 MB prompt leaves no memory behind."""
from __future__ import annotations

import threading

import grpc
import pytest

from moelink.engine.contract.sampling_params import SamplingParams

from tests.helpers.grpc_calls import native, refused, vllm
from tests.helpers.grpc_server import make_stubs

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


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_text_that_cannot_fit_is_refused_before_tokenizing_and_long_text_is_tokenized_off_the_loop(thread_server):
    srv = thread_server()
    serving = srv.server.serving
    # The tiny tokenizer's longest token is "<|endoftext|>": 13 bytes, no normalizer.
    assert serving.bytes_per_token == 13 and serving.max_prompt_bytes == 511 * 13
    spy = _SpyBackend(serving.tokenizer._tok)
    serving.tokenizer._tok = spy
    with grpc.insecure_channel(srv.addr, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        s = make_stubs(ch)
        just_over = "ab" * (serving.max_prompt_bytes // 2) + "abc"
        for text in ("x" * (1 << 20), just_over, "é" * (serving.max_prompt_bytes // 2 + 1)):
            for call in (native(s, prompt=text), vllm(s, text=text)):
                err = refused(call)
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
                assert "too long" in err.details() and "max_model_len=512" in err.details(), err.details()
        assert spy.calls == [], "text that cannot fit was tokenized"
    # (Those were refused from their size on the wire; Serving.prepare, behind it, refuses the same way.)
    with pytest.raises(ValueError, match="prompt is too long"):
        srv.call(serving.prepare("t", just_over, SamplingParams(), "prompt"))
    assert spy.calls == []
    with grpc.insecure_channel(srv.addr) as ch:
        s = make_stubs(ch)
        # Text that may fit, but is long: tokenized on a worker thread (here it then turns out too long).
        text = "the quick brown fox " * 200
        assert 2048 < len(text) < serving.max_prompt_bytes
        err = refused(native(s, prompt=text))
        assert "prompt has" in err.details() and "tokens, too long" in err.details(), err.details()
        assert len(spy.calls) == 1 and spy.calls[0][0] != srv.thread.name, spy.calls
        # With truncate_prompt_tokens only the last tokens stay: a text far over the bound is tokenized as its
        # tail alone, which gives the same last tokens as the whole text.
        spy.calls.clear()
        text = "Words, words, words: 1234 ünïcödé. " * 30_000
        msgs = list(s.vllm.Generate(s.vpb.GenerateRequest(text=text, stream=False, sampling_params=s.vpb.SamplingParams(
            truncate_prompt_tokens=-1, max_tokens=2)), timeout=30))
        assert msgs[-1].complete.prompt_tokens == 510  # what fits beside max_tokens
        assert spy.calls and max(n for _, n in spy.calls) <= 2 * serving.max_prompt_bytes
    whole = spy._real.encode(text).ids
    processed = srv.call(serving.prepare("t", text, SamplingParams(max_tokens=1), "text", keep=511))
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


def test_token_ids_that_cannot_fit_even_truncated_are_refused_on_their_length(thread_server):
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
        s = make_stubs(ch)
        err = refused(vllm(s, tokenized=s.vpb.TokenizedInput(input_ids=[1] * 600),
                             sampling_params=s.vpb.SamplingParams(truncate_prompt_tokens=10 ** 6)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "has 600 tokens, too long" in err.details()
        msgs = list(s.vllm.Generate(s.vpb.GenerateRequest(tokenized=s.vpb.TokenizedInput(input_ids=[1] * 600),
                    stream=False, sampling_params=s.vpb.SamplingParams(truncate_prompt_tokens=100, max_tokens=1)),
                    timeout=30))
        assert msgs[-1].complete.prompt_tokens == 100


def test_16_mb_prompt_is_refused_fast_and_memory_does_not_stay(spawn_server):
    """A 16 MB text prompt used to freeze the server for ~18 s and leave RSS 2 GB higher."""
    srv = spawn_server()

    def rss_mb():
        with open(f"/proc/{srv.pid}/status") as f:
            return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) / 1024

    text = "The quick brown fox jumps over the lazy dog. " * (16 * 2 ** 20 // 45)
    with grpc.insecure_channel(srv.addr, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        s = make_stubs(ch)
        list(s.native.Generate(s.pb.GenerateRequest(prompt="warm up", sampling_params=s.pb.SamplingParams(max_tokens=2)),
                               timeout=30))
        before = rss_mb()
        for i in range(3):
            for call in (native(s, prompt=text), vllm(s, text=text)):
                err = refused(call)
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "too long" in err.details(), err.details()
            assert s.health.Check(s.hpb.HealthCheckRequest(service=""), timeout=2).status == \
                s.hpb.HealthCheckResponse.SERVING
        after = rss_mb()
    # Tokenizing one of them took RSS from 0.4 to 2.5 GB. What is left is gRPC's own: a bare grpc.aio server
    # that receives 16 MB messages and does nothing with them also ends a few hundred MB higher.
    assert after - before < 500, f"RSS {before:.0f} MB -> {after:.0f} MB after six 16 MB prompts"
