"""benchmarks/host_overhead.py --cpu-smoke (in process, a few seconds): every comparison it reports, the JSON's
fields, and the relations between them; no timed assertion."""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest

from moelink.benchmarks import e2e_setup, host_overhead

ASYNC = "async_scheduling" in e2e_setup.engine_fields()


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("host") / "h.json"
    before = set(Path(tempfile.gettempdir()).glob("moelink-host-*"))
    res = host_overhead.main(["--cpu-smoke", "--out", str(out)])
    assert set(Path(tempfile.gettempdir()).glob("moelink-host-*")) == before  # its tiny checkpoints are not left
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    return res


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_text_against_token_ids(smoke):
    ms = smoke["ms_per_decode_step"]
    assert positive(ms["detokenize"]) and positive(ms["token_ids_only"])
    assert smoke["ratio"] == pytest.approx(ms["detokenize"] / ms["token_ids_only"])
    assert smoke["seqs"] == host_overhead.SMOKE["seqs"] and smoke["repeats"] == 1


def test_host_us_per_sequence_per_step_for_each_loop(smoke):
    loop = smoke["step_loop"]
    assert loop["layers"] == 1 and loop["detokenize"] is False and loop["has_async_scheduling"] == ASYNC
    assert loop["stream"].startswith("SimulatedStream(0)" if host_overhead.simulated_stream() else "the engine's own")
    want = {"async_on", "async_off"} if ASYNC else {"engine_default"}
    assert set(loop["ms_per_decode_step"]) == set(loop["us_per_seq_per_step"]) == set(loop["runs"]) == want
    for k, ms in loop["ms_per_decode_step"].items():
        assert positive(ms) and loop["us_per_seq_per_step"][k] == pytest.approx(ms * 1e3 / smoke["seqs"])
    assert set(loop["cpu_us_per_seq_per_step"]) == set(loop["cpu_host_only_us_per_seq"]) == set(loop["cpu_runs"]) == want
    for k, us in loop["cpu_us_per_seq_per_step"].items():
        # The thread's CPU time: a share of the step's wall time (the clocks' granularity allowed for), and of it
        # the device work run inline is a part.
        assert positive(us) and us <= loop["us_per_seq_per_step"][k] * 1.05 + 50.0
        assert loop["cpu_host_only_us_per_seq"][k] == pytest.approx(us - loop["device_work_us_per_seq"][k])


def test_device_time_mode_against_max_and_sum(smoke):
    dt = smoke["device_time"]
    T = host_overhead.SMOKE["device_time_ms"]
    assert dt["ms"] == T and len(dt["rows"]) == (2 if ASYNC else 1)
    for r in dt["rows"]:
        host = smoke["step_loop"]["ms_per_decode_step"][r["loop"]]
        assert r["host_ms"] == host and r["max_device_host_ms"] == max(T, host)
        assert r["device_plus_host_ms"] == pytest.approx(T + host)
        assert r["step_ms"] >= T * 0.9  # the stub really slept T ms per step (timer slack)
        assert set(r["forward_thread"]) <= {"host", "another thread"} and r["forward_thread"]
    if host_overhead.simulated_stream() is not None:
        assert dt["stand_in"].startswith("SimulatedStream")
    else:
        assert (dt["stand_in"] is not None) == any("another thread" in r["forward_thread"] for r in dt["rows"])
    assert dt["note"].startswith("missing") == (dt["stand_in"] is None)


def test_both_loops_run_on_the_simulated_device(smoke):
    """With the engine's SimulatedStream, the serial loop pays T + host per step by construction (its step waits
    for the simulated device every time): checked loosely, no timing of the overlapped loop is asserted."""
    assert ASYNC and host_overhead.simulated_stream() is not None
    rows = {r["loop"]: r for r in smoke["device_time"]["rows"]}
    assert set(rows) == {"async_on", "async_off"}
    assert rows["async_off"]["step_ms"] >= smoke["device_time"]["ms"]
    assert all(r["forward_thread"] == ["host"] for r in rows.values())  # launched from the host, as on CUDA
