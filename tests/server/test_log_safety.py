"""Client values in logs and error messages (issue 11, item 4): escaped, quoted and bounded, so they can
neither forge log lines nor flood them."""
from __future__ import annotations

import json
import logging
import sys

import grpc
import pytest

from moelink.engine.contract.safe_text import MAX_SHOWN_CHARS, shown
from moelink.engine.contract.sampling_params import SamplingParams

from tests.helpers.grpc_calls import native, refused

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
    err = refused(native(stubs, rid=huge_id, prompt="hi"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and len(err.details()) < 300, len(err.details())
    err = refused(native(stubs, rid=forged, prompt="x", sampling_params=pb.SamplingParams(stop=["s" * 200] * 30 + [""])))
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


def test_a_logged_output_is_escaped_and_bounded():
    """--enable-log-outputs: the "request finished" line's `output` (one sample's text, n samples' as a JSON list,
    each cut at --max-log-len), escaped like every client value and bounded as a whole log message, not at one
    value's 200 characters."""
    from moelink.engine.contract.safe_text import MAX_LOG_LINE_CHARS
    from moelink.engine.server.server import JsonFormatter
    from moelink.engine.server.serving import logged_output

    assert logged_output([["ab", "c"]], None) == "abc" and logged_output([["abc"]], 2) == "ab"
    assert json.loads(logged_output([["a"], ["b\n"]], None)) == ["a", "b\n"]
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "request finished", (), None)
    record.output = "word\n2099-01-01 FORGED " * 1000
    doc = json.loads(JsonFormatter().format(record))
    assert MAX_LOG_LINE_CHARS <= len(doc["output"]) < MAX_LOG_LINE_CHARS + 40 and "\n" not in doc["output"]
