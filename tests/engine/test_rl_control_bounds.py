"""What an RL control call carries never runs unbounded on the engine thread (issue 76: engine/api/rl_calls.py,
engine/rl/control.py, engine/rl/rank/weight_sync.py, engine/config/checkpoint_headers.py; docs/security.md, round 6).

A join of a trainer's group at an address that accepts and never answers (torch's store client ignores its timeout
there) runs on the ranks' own threads: steps go on meanwhile, and the caller is answered at join_timeout_s naming
what the address did; a name that does not resolve, a closed port and a garbage answer fail as clearly, within the
bound, and a real trainer still joins after them. The reads (is_paused, is_sleeping, get_weight_version) answer at
once while an update waits for started requests. An update from disk reads the new checkpoint's headers on the
control check thread, never the engine's, within bounds the served checkpoint sets, and only files inside its
directory (no '..', no absolute path, no link out), with errors that quote nothing of another file. A weight_version
is at most 256 printable ASCII characters. One engine for the module."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import struct
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from moelink.engine import AsyncEngine, EngineArgs, SamplingParams
from moelink.engine.contract.weight_sync import MAX_WEIGHT_VERSION_CHARS, UpdateGroupSpec, check_weight_version
from moelink.engine.core.outputs import OutputKind
from moelink.engine.rl.errors import GroupJoinFailed

pytestmark = pytest.mark.usefixtures("heap_held_frozen")


@pytest.fixture(scope="module")
def served(tiny_model):
    path = tiny_model("qwen3_e6k3")
    engine = AsyncEngine.from_engine_args(EngineArgs(model=path, dtype="float32", max_num_seqs=4, num_kv_blocks=256,
                                                     block_size=8, max_model_len=1024, enable_weight_updates=True))
    try:
        yield engine, path
    finally:
        engine.shutdown()


@contextmanager
def _listener(mode: str):
    """A TCP listener on loopback that accepts and then stays silent, or answers garbage; closed at the end (which
    is what ends a torch store client still waiting on it)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    conns: list[socket.socket] = []

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conns.append(conn)
            if mode == "garbage":
                try:
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello" * 8)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield srv.getsockname()[1]
    finally:
        try:
            srv.shutdown(socket.SHUT_RDWR)  # wakes the accept (a close alone leaves it listening)
        except OSError:
            pass
        srv.close()
        for conn in conns:
            conn.close()
        thread.join(5)


def _join_args(port: int, name: str, join_timeout_s: float, host: str = "127.0.0.1") -> tuple:
    return (host, port, 1, 2, name, "gloo", 60.0, join_timeout_s)


@pytest.mark.slow  # a join left to its 2 s timeout beside a stream
def test_a_join_to_a_silent_listener_keeps_steps_running_and_fails_at_its_timeout(served):
    engine, _ = served

    async def main():
        tokens: list[int] = []
        first = asyncio.Event()

        async def stream():
            async for out in engine.generate("beside-join", [5, 17, 3],
                                             SamplingParams(max_tokens=1000, ignore_eos=True),
                                             output_kind=OutputKind.DELTA):
                tokens.extend(out.outputs[0].token_ids)
                first.set()

        task = asyncio.create_task(stream())
        await asyncio.wait_for(first.wait(), 30)
        with _listener("silent") as port:
            before, t0 = len(tokens), time.monotonic()
            with pytest.raises(GroupJoinFailed) as err:
                await asyncio.wait_for(engine.control("init_weights_update_group",
                                                      *_join_args(port, "silent", 2.0)), 30)
            elapsed, during = time.monotonic() - t0, len(tokens) - before
        task.cancel()
        return err.value, elapsed, during

    exc, elapsed, during = asyncio.run(main())
    # Steps ran while the join was pending (today's main ran the join on the engine thread: no token until the
    # listener closed), and the caller was answered by join_timeout_s (generous bound: 2 s asked).
    assert during >= 5, during
    assert elapsed < 10, elapsed
    assert "timed out after 2 s" in str(exc) and "never answered" in str(exc), exc
    assert engine.is_healthy


@pytest.mark.slow  # four joins, a closed port left to its 1.5 s timeout
def test_bad_trainer_addresses_fail_clearly_and_a_real_trainer_joins_after(served):
    from moelink.engine.rl.trainer import TrainerGroup
    from tests.helpers.net import free_port

    engine, _ = served

    async def join(*args):
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(engine.control("init_weights_update_group", *args), 30)
        except GroupJoinFailed as exc:
            return str(exc), time.monotonic() - t0
        raise AssertionError("the join succeeded")

    # A name that does not resolve fails at once, long before its 20 s join timeout.
    msg, elapsed = asyncio.run(join(*_join_args(1234, "g", 20.0, host="no-such-host.invalid")))
    assert "does not resolve" in msg and elapsed < 10, (msg, elapsed)
    # A closed port: retried (a trainer may be about to listen), then refused naming it, at join_timeout_s or
    # REFUSED_GRACE_S (10 s), whichever comes first.
    closed = free_port()
    msg, elapsed = asyncio.run(join(*_join_args(closed, "g", 1.5)))
    assert "nothing listens" in msg and "connection refused" in msg and elapsed < 10, (msg, elapsed)
    # A listener that speaks first (a torch store waits for its client): not a trainer's store, said at once, long
    # before its 20 s join timeout (or, were the banner late, torch's client refuses it or the join times out).
    with _listener("garbage") as port:
        msg, elapsed = asyncio.run(join(*_join_args(port, "g", 20.0)))
    assert "group 'g'" in msg and elapsed < 25, (msg, elapsed)
    # Bad fields are refused before any rank begins: the join timeout is bounded and finite.
    for bad in (0.0, float("inf"), 1e9):
        with pytest.raises(ValueError, match="join_timeout_s"):
            asyncio.run(engine.control("init_weights_update_group", *_join_args(closed, "g", bad)))
    # After all of that a real trainer's group is joined (nothing was left half joined under the name).
    port = free_port()
    made: dict = {}
    trainer = threading.Thread(target=lambda: made.setdefault("g", TrainerGroup("127.0.0.1", port, 2, "g")),
                               daemon=True)
    trainer.start()
    info = asyncio.run(engine.control("init_weights_update_group", *_join_args(port, "g", 20.0)))
    trainer.join(30)
    assert info["success"] and "g" in made
    assert asyncio.run(engine.control("destroy_weights_update_group", "g"))["success"]
    made["g"].close()


@pytest.mark.slow  # four joins held by a silent listener, then their ends (about 4 s)
def test_a_rank_holds_a_few_join_threads_at_most_and_drops_a_join_nobody_waits_for():
    import torch

    from moelink.engine.rl.rank.weight_sync import MAX_JOIN_THREADS, UpdateGroups

    groups = UpdateGroups(torch.device("cpu"))
    with _listener("silent") as port:
        for i in range(MAX_JOIN_THREADS):
            spec = UpdateGroupSpec("127.0.0.1", port, 1, 2, f"g{i}", join_timeout_s=2.0)
            assert groups.join(spec, 0) is None  # answered at once: the join runs on its own thread
            deadline = time.monotonic() + 10
            while groups.join_status(f"g{i}").phase != "rendezvous" and time.monotonic() < deadline:
                time.sleep(0.01)
            assert groups.join_status(f"g{i}").state == "joining"
            assert groups.destroy(f"g{i}")  # the driver gave up: dropped, its thread left inside torch's client
        refused = groups.join(UpdateGroupSpec("127.0.0.1", port, 1, 2, "more"), 0)
        assert refused is not None and "still waiting" in refused
    # The listener closed: the stuck clients fail (torch retries the now refused port a few times its 2 s timeout),
    # and their threads end.
    deadline = time.monotonic() + 30
    while any(t.is_alive() for t in groups._threads) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.is_alive() for t in groups._threads)
    assert groups.join_status("g0").state == "failed"  # dropped: nothing joined under its name


@pytest.mark.slow  # a stream held through a deferred update
def test_reads_answer_at_once_while_an_update_waits_for_started_requests(served):
    engine, path = served

    async def main():
        first = asyncio.Event()

        async def stream():
            async for _ in engine.generate("held", [7, 8, 9], SamplingParams(max_tokens=1000, ignore_eos=True),
                                           output_kind=OutputKind.DELTA):
                first.set()

        task = asyncio.create_task(stream())
        await asyncio.wait_for(first.wait(), 30)
        await engine.control("pause_generation", "wait")
        update = asyncio.create_task(engine.control("update_weights_from_disk", path, None, "v-held"))
        await asyncio.sleep(0.2)  # the update is queued, and waits for the started request
        reads = await asyncio.wait_for(asyncio.gather(engine.control("is_paused"), engine.control("is_sleeping"),
                                                      engine.control("get_weight_version")), 10)
        pending = not update.done() and not task.done()
        task.cancel()  # the started request ends (aborted): the update lands
        info = await asyncio.wait_for(update, 30)
        await engine.control("continue_generation")
        return reads, pending, info

    reads, pending, info = asyncio.run(main())
    assert reads[0] is True and reads[1] is False and reads[2] != "v-held"
    assert pending, "the reads waited for the deferred update"
    assert info["weight_version"] == "v-held"


def test_an_update_reads_its_headers_off_the_engine_thread(served, monkeypatch):
    import moelink.engine.rl.weights as weights

    engine, path = served
    seen: list[str] = []
    real = weights.check_same_tensors

    def spy(*args, **kwargs):
        seen.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(weights, "check_same_tensors", spy)
    info = asyncio.run(engine.control("update_weights_from_disk", path, None, "v-off-thread"))
    assert info["weight_version"] == "v-off-thread"
    assert seen and seen[0] != "moelink-engine" and seen[0].startswith("moelink-control-check"), seen


def test_weight_version_is_a_bounded_printable_label(served):
    engine, path = served
    check_weight_version(None)
    check_weight_version("v" * MAX_WEIGHT_VERSION_CHARS)
    for bad in ("v" * (MAX_WEIGHT_VERSION_CHARS + 1), "v1\r\nX-Injected: 1", "v\x00", "vé", 7):
        with pytest.raises(ValueError, match="weight_version"):
            check_weight_version(bad)
    for bad in ("x" * 100_000, "line\nbreak"):  # refused before anything is read or written; the version stays
        with pytest.raises(ValueError, match="weight_version"):
            asyncio.run(engine.control("update_weights_from_disk", path, None, bad))
        with pytest.raises(ValueError, match="weight_version"):
            engine.engine.rl.update_weights_from_tensor([], None, bad)
        with pytest.raises(ValueError, match="weight_version"):
            engine.engine.rl.update_weights_from_distributed(["x"], ["float32"], [[1]], "none", True, bad)
    assert asyncio.run(engine.control("get_weight_version")) != "x" * 100_000


# -- the new checkpoint's files and headers -------------------------------------------------------------------------
def _copy(path: str, out: Path, weights: bool = True) -> Path:
    out.mkdir(parents=True)
    for f in Path(path).iterdir():
        if f.is_file() and (weights or f.suffix != ".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    return out


def _index(out: Path, path: str, fname: str) -> None:
    """An index mapping every tensor of the served checkpoint to `fname`."""
    from moelink.engine.config.checkpoint_headers import checkpoint_tensors

    names = sorted(checkpoint_tensors(path))
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: fname for n in names}}))


def test_an_updates_files_stay_inside_its_directory_and_errors_quote_no_other_file(served, tmp_path):
    engine, path = served
    check = engine.engine.rl.check_disk_update
    secret = tmp_path / "secret"
    secret.write_bytes(b"SECRETXY" + b"s" * 12337)  # 12,345 bytes
    leaked = (str(struct.unpack("<Q", b"SECRETXY")[0]), "SECRETXY", "12345", "12337")
    # An index naming a file by absolute path, or above the directory: refused by the name alone.
    for name, fname in (("absolute", str(secret)), ("dotdot", "../secret"), ("inner-dotdot", "a/../../secret")):
        out = _copy(path, tmp_path / name, weights=False)
        _index(out, path, fname)
        with pytest.raises(ValueError, match="relative to its directory") as err:
            check(str(out))
        assert not any(s in str(err.value) for s in leaked), err.value
    # A valid copy of the weights outside, reached by '..' (today's main read it and took the update) or a link.
    outside = _copy(path, tmp_path / "outside")
    weights_file = next(outside.glob("*.safetensors")).name
    out = _copy(path, tmp_path / "via-dotdot", weights=False)
    _index(out, path, f"../outside/{weights_file}")
    with pytest.raises(ValueError, match="relative to its directory"):
        check(str(out))
    out = _copy(path, tmp_path / "via-link", weights=False)
    os.symlink(outside / weights_file, out / weights_file)
    with pytest.raises(ValueError, match="link out of the checkpoint's directory"):
        check(str(out))
    out = _copy(path, tmp_path / "to-secret", weights=False)
    os.symlink(secret, out / "model.safetensors")
    with pytest.raises(ValueError, match="link out of") as err:
        check(str(out))
    assert not any(s in str(err.value) for s in leaked), err.value
    # The rank's own read checks again (the files may change after the driver's check).
    from moelink.engine.rank.loader import checkpoint_index

    with pytest.raises(ValueError, match="link out of"):
        checkpoint_index(out, check(str(outside)).bounds)
    # A Hugging Face cache snapshot links its files into the repository's blobs: taken.
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = _copy(path, repo / "snapshots" / "rev1", weights=False)
    (repo / "blobs").mkdir()
    shutil.copy(outside / weights_file, repo / "blobs" / "abc123")
    os.symlink("../../blobs/abc123", snap / weights_file)
    assert check(str(snap)).model_path == str(snap)
    # A file that is not safetensors inside the directory: refused without quoting its first bytes or its size.
    out = _copy(path, tmp_path / "not-safetensors", weights=False)
    shutil.copy(secret, out / "model.safetensors")
    with pytest.raises(ValueError) as err:
        check(str(out))
    assert not any(s in str(err.value) for s in leaked), err.value


def test_an_updates_headers_and_index_are_bounded_by_the_served_checkpoint(served, tmp_path, monkeypatch):
    import moelink.engine.config.checkpoint_headers as headers

    engine, path = served
    check = engine.engine.rl.check_disk_update
    bounds = check(path).bounds
    # A header of 8 MiB (the served one's are a few KiB): refused from its 8-byte length, never parsed.
    out = _copy(path, tmp_path / "big-header", weights=False)
    n = 8 << 20
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", n) + b"{" + b" " * (n - 2) + b"}")
    parsed: list[int] = []
    real_loads = headers.json.loads
    monkeypatch.setattr(headers.json, "loads", lambda raw, *a, **k: parsed.append(len(raw)) or real_loads(raw, *a, **k))
    with pytest.raises(ValueError, match="header is larger than"):
        check(str(out))
    assert not parsed or max(parsed) < n, parsed
    monkeypatch.undo()
    # More tensors than twice the served checkpoint's, in a header within the byte bound: refused naming the bound.
    out = _copy(path, tmp_path / "many-tensors", weights=False)
    many = {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
            for i in range(bounds.max_tensors + 1)}
    raw = json.dumps(many).encode()
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"\0" * 4 * len(many))
    with pytest.raises(ValueError, match="more tensors than this update may"):
        check(str(out))
    # An index larger than the bound: refused from its size, never read.
    out = _copy(path, tmp_path / "big-index")
    _index(out, path, next(Path(path).glob("*.safetensors")).name)
    index = out / "model.safetensors.index.json"
    index.write_text(index.read_text()[:-1] + " " * (bounds.max_index_bytes + 1) + "}")
    with pytest.raises(ValueError, match="index.json is larger than"):
        check(str(out))
