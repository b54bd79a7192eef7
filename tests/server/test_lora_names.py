"""The adapters `moelink serve` serves by name (engine/server/lora_names.py) and the OpenAI front's side of them
(gateway/lora_routes.py, model_name.py), without an engine: a checker that refuses one path stands in for the
engine's AdapterChecker. The whole path through a server is tests/server/test_lora_serve.py."""
from __future__ import annotations

import asyncio
import json

import pytest

from moelink.engine.server.gateway.lora_routes import LOAD_PATH, UNLOAD_PATH, LoraRoutes, adapter_of, \
    forget_adapter, note_adapter
from moelink.engine.server.gateway.model_name import copy_renamed, renamer
from moelink.engine.server.lora_names import LoRAModule, ServedAdapters, parse_lora_module


class _Checker:
    def check(self, req):
        if req.lora_path.endswith("bad"):
            raise ValueError(f"LoRARequest.lora_path={req.lora_path!r} is invalid: no adapter_config.json there.")
        return req


class _Serving:
    served_model_names, model_aliases, served_model_name = ("base",), ("base-alias",), "base"

    def __init__(self, checker=_Checker()):
        self.adapters = ServedAdapters(checker, self.served_model_names + self.model_aliases)


def test_lora_modules_in_both_of_vllms_forms_and_their_refusals():
    assert parse_lora_module("sql=/a/sql") == LoRAModule("sql", "/a/sql")
    assert parse_lora_module('{"name": "x", "path": "/p", "base_model_name": "m"}') == LoRAModule("x", "/p", "m")
    for text, says in [("sql", "give name=path"), ('{"name": "x"}', 'needs "name" and "path"'),
                       ('{"name": "x", "path": "/p", "rank": 4}', "'rank' is not a field"),
                       ("{oops", "not valid JSON"), ("=/p", "name=''"), ("x=", "path=''")]:
        with pytest.raises(ValueError, match="lora_modules") as exc:
            parse_lora_module(text)
        assert says in str(exc.value), str(exc.value)


def test_server_config_refuses_an_adapter_named_twice():
    from moelink.engine.server.config import ServerConfig

    with pytest.raises(ValueError, match="lora_modules.*twice.*'a'"):
        ServerConfig(lora_modules=(LoRAModule("a", "/x"), LoRAModule("a", "/y")))


def test_served_adapters_fresh_ids_and_one_error_naming_the_field():
    adapters = _Serving().adapters
    a = adapters.add("a", "/x")
    assert a.lora_int_id == 1 and adapters.get("a") is a
    with pytest.raises(ValueError, match="already been loaded"):
        adapters.add("a", "/y")
    with pytest.raises(ValueError, match="name of the base model"):
        adapters.add("base-alias", "/y")
    with pytest.raises(ValueError, match=r"adapter 'c' \(lora_path='/c/bad'\) is refused: .*lora_path"):
        adapters.add("c", "/c/bad")
    assert adapters.get("c") is None  # nothing refused is kept
    adapters.remove("a")
    with pytest.raises(KeyError):
        adapters.remove("a")
    assert adapters.add("a", "/z").lora_int_id == 3  # loaded again: another adapter (ids never reused)
    with pytest.raises(ValueError, match="--enable-lora"):
        ServedAdapters(None, ("base",)).add("a", "/x")


def _answer(routes, path, body):
    status, out = asyncio.run(routes.answer(b"POST", path, json.dumps(body).encode()))
    return status, out


def test_load_and_unload_routes_as_vllm_answers_them():
    routes = LoraRoutes(_Serving(), environ={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
    assert _answer(routes, LOAD_PATH, {"lora_name": "a", "lora_path": "/x"})[0] == 200
    status, out = _answer(routes, LOAD_PATH, {"lora_name": "b", "lora_path": "/b/bad"})
    assert status == 400 and out["error"]["param"] == "lora_path"
    status, out = _answer(routes, LOAD_PATH, {"lora_name": "b"})
    assert status == 400 and out["error"]["param"] == "lora_path"
    status, out = _answer(routes, LOAD_PATH, {"lora_name": "b", "lora_path": "/x", "rank": 2})
    assert status == 400 and out["error"]["param"] == "rank"
    assert routes.route("a") == "a" and routes.route("base") is None and routes.route("base-alias") is None
    with pytest.raises(LookupError, match="`nope` does not exist: this server serves 'base', 'a'"):
        routes.route("nope")
    assert _answer(routes, UNLOAD_PATH, {"lora_name": "a"})[0] == 200
    status, out = _answer(routes, UNLOAD_PATH, {"lora_name": "a"})
    assert status == 404 and "cannot be found" in out["error"]["message"]
    # Off unless the server runs with --enable-lora and vLLM's switch, each refusal saying what to set.
    status, out = _answer(LoraRoutes(_Serving(), environ={}), LOAD_PATH, {"lora_name": "a", "lora_path": "/x"})
    assert status == 404 and "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1" in out["error"]["message"]
    status, out = _answer(LoraRoutes(_Serving(None), environ={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}),
                          LOAD_PATH, {"lora_name": "a", "lora_path": "/x"})
    assert status == 404 and "--enable-lora" in out["error"]["message"]


def test_load_inplace_replaces_a_served_adapters_files_only_when_they_pass():
    """vLLM's load_inplace (and prime-rl's /load_lora_adapter, which always loads in place): the name takes the new
    files under a new adapter id, so requests running under the old id keep their weights; files that fail the check
    leave the old adapter served; without it a served name is refused, as vLLM refuses it."""
    serving = _Serving()
    routes = LoraRoutes(serving, environ={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"})
    assert _answer(routes, LOAD_PATH, {"lora_name": "a", "lora_path": "/x"})[0] == 200
    first = serving.adapters.get("a")
    status, out = _answer(routes, LOAD_PATH, {"lora_name": "a", "lora_path": "/y"})
    assert status == 400 and "already been loaded" in out["error"]["message"]
    assert _answer(routes, LOAD_PATH, {"lora_name": "a", "lora_path": "/y", "load_inplace": True})[0] == 200
    second = serving.adapters.get("a")
    assert second.lora_path == "/y" and second.lora_int_id != first.lora_int_id
    status, out = _answer(routes, LOAD_PATH, {"lora_name": "a", "lora_path": "/y/bad", "load_inplace": True})
    assert status == 400 and out["error"]["param"] == "lora_path" and serving.adapters.get("a") is second
    status, out = _answer(routes, LOAD_PATH, {"lora_name": "a", "lora_path": "/y", "load_inplace": "yes"})
    assert status == 400 and out["error"]["param"] == "load_inplace"
    reloading = LoraRoutes(serving, environ={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}, reload=True)
    assert _answer(reloading, LOAD_PATH, {"lora_name": "a", "lora_path": "/z"})[0] == 200
    assert serving.adapters.get("a").lora_path == "/z"


def test_the_relay_note_reaches_the_grpc_request_id():
    note_adapter("cmpl-abc", "a")
    try:
        assert adapter_of("cmpl-abc-123e4567-e89b-12d3-a456-426614174000") == "a"
        assert adapter_of("cmpl-xyz-123e4567-e89b-12d3-a456-426614174000") is None
        assert adapter_of("cmpl-abc") is None  # not an id smg made from the relay id
    finally:
        forget_adapter("cmpl-abc")


class _Sink:
    def __init__(self):
        self.data = b""

    def write(self, data):
        self.data += data

    async def drain(self):
        pass


def _renamed(head: bytes, body: bytes) -> bytes:
    async def run():
        reader = asyncio.StreamReader()
        reader.feed_data(body)
        reader.feed_eof()
        sink = _Sink()
        await copy_renamed(head, reader, sink, renamer("base/m", "sql"))
        return sink.data
    return asyncio.run(run())


def test_an_adapters_answer_names_it_streamed_or_not():
    body = b'{"id":"x","model":"base/m","text":"say \\"model\\":\\"base/m\\""}'
    out = _renamed(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body), body)
    head, _, new = out.partition(b"\r\n\r\n")
    assert new == body.replace(b'"model":"base/m"', b'"model":"sql"', 1) and b"content-length: %d" % len(new) in head
    # Chunked SSE, an event cut across two chunks.
    events = b'data: {"model":"base/m","t":1}\n\ndata: {"model":"base/m","t":2}\n\ndata: [DONE]\n\n'
    cut = 20
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (events[:cut], events[cut:])) + b"0\r\n\r\n"
    out = _renamed(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", chunked)
    head, _, rest = out.partition(b"\r\n\r\n")
    data = b""
    while True:
        size, _, rest = rest.partition(b"\r\n")
        if int(size, 16) == 0:
            break
        data, rest = data + rest[:int(size, 16)], rest[int(size, 16) + 2:]
    assert data == events.replace(b'"model":"base/m"', b'"model":"sql"')


def test_serve_refuses_lora_modules_without_enable_lora_before_anything_loads(capsys):
    from moelink.engine.api.cli import main

    rc = None
    try:
        rc = main(["serve", "MODEL", "--lora-modules", "a=/x", "--no-http"])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc not in (0, None) and "lora_modules=['a'] needs --enable-lora" in err, err
    with pytest.raises(SystemExit):
        main(["serve", "MODEL", "--enable-lora", "--lora-modules", "no-equals-sign"])
    err = capsys.readouterr().err
    assert "argument --lora-modules: lora_modules 'no-equals-sign' is invalid" in err, err


def test_adapter_names_are_bounded_printable_and_never_the_base_models():
    """Issue 76 item 12: `Base`, `base\\u200b` and a 100,000-character name were accepted and listed to every client
    beside the base model "base". A name is now at most MAX_NAME_CHARS printable characters, and no name collides,
    ignoring case and Unicode form, with the base model's names or another adapter's."""
    from moelink.engine.server.lora_names import MAX_NAME_CHARS

    adapters = _Serving().adapters
    for name, says in [("Base", "name of the base model"), ("BASE-ALIAS", "name of the base model"),
                       ("\uff42\uff41\uff53\uff45", "name of the base model"),  # fullwidth "base"
                       ("base\u200b", "format \\(zero-width\\)"), ("a\u2028b", "format"), ("a\nb", "format"),
                       ("\u202eesab", "format"), ("x" * 100_000, f"at most {MAX_NAME_CHARS} characters")]:
        with pytest.raises(ValueError, match=says) as e:
            adapters.add(name, "/x")
        assert len(str(e.value)) < 600
    assert adapters.served() == []
    adapters.add("sql", "/x")
    with pytest.raises(ValueError, match="'sql' has already been loaded"):
        adapters.add("SQL", "/y")
    assert adapters.add("x" * MAX_NAME_CHARS, "/x") and adapters.add("sql-v2 beta", "/x")
    with pytest.raises(ValueError, match="lora_path=.* is invalid"):
        adapters.add("p", "/" + "x" * 10_000_000)
    with pytest.raises(ValueError, match="lora_modules name='Base\\\\u200b' is invalid"):
        LoRAModule("Base\u200b", "/x")
