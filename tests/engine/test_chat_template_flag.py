"""`--chat-template` checked at start (issue 53 low 3): `/dev/zero` grew smg to 14.8 GB and it never became ready,
and a template with broken Jinja started and then answered every chat with HTTP 500. The check runs before any
weight loads (engine/api/chat_template_flag.py); each refusal is one sentence naming the flag."""
from __future__ import annotations

import json
import os
import threading

import pytest

from moelink.engine.server.gateway.chat_template import MAX_CHAT_TEMPLATE_BYTES, check_chat_template
from moelink.engine.tools.tiny_corpus import CHAT_TEMPLATE


def _refused(path) -> str:
    with pytest.raises(ValueError) as exc:
        check_chat_template(str(path))
    message = str(exc.value)
    assert message.startswith("--chat-template=") and "\n" not in message, message
    return message


def test_a_device_a_directory_or_a_fifo_is_refused_unread(tmp_path):
    assert "is not a regular file (a character device)" in _refused("/dev/zero")
    assert "is not a regular file (a directory)" in _refused(tmp_path)
    fifo = tmp_path / "t.jinja"
    os.mkfifo(fifo)
    done = threading.Event()
    result: list = []

    def check():  # a FIFO with no writer must not hang the start
        try:
            check_chat_template(str(fifo))
        except ValueError as exc:
            result.append(str(exc))
        done.set()

    threading.Thread(target=check, daemon=True).start()
    assert done.wait(10), "checking a FIFO hung"
    assert "is not a regular file (a FIFO)" in result[0]


def test_size_encoding_and_existence(tmp_path):
    big = tmp_path / "big.jinja"
    big.write_text("{{ x }}" + " " * MAX_CHAT_TEMPLATE_BYTES)
    assert f"has {MAX_CHAT_TEMPLATE_BYTES + 7} bytes; at most {MAX_CHAT_TEMPLATE_BYTES} (1 MiB)" in _refused(big)
    latin = tmp_path / "latin.jinja"
    latin.write_bytes(b"{{ '\xe9' }}")
    assert "is not UTF-8 text (byte 4)" in _refused(latin)
    assert "cannot be read (No such file or directory)" in _refused(tmp_path / "missing.jinja")
    empty = tmp_path / "empty.jinja"
    empty.write_text("  \n")
    assert "the template is empty" in _refused(empty)


def test_an_inline_template_is_refused_saying_the_flag_takes_a_file():
    assert "an inline template is not accepted" in _refused("{% for m in messages %}{{ m.content }}{% endfor %}")


@pytest.mark.parametrize("source, what", [
    ("{% for m in messages %}{{ m['content'] }}", "line 1: Unexpected end of template"),
    ("{{ messages | no_such_filter }}", "No filter named 'no_such_filter'"),
    ("{% if %}", "line 1:"),
])
def test_broken_jinja_is_refused_naming_the_line(tmp_path, source, what):
    f = tmp_path / "t.jinja"
    f.write_text(source)
    message = _refused(f)
    assert "is not valid Jinja" in message and what in message, message


def test_json_templates_are_read_as_smg_reads_them(tmp_path):
    good = tmp_path / "chat_template.json"
    good.write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    check_chat_template(str(good))
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(CHAT_TEMPLATE))
    check_chat_template(str(bare))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"template": CHAT_TEMPLATE}))
    assert "it holds no template" in _refused(other)
    broken = tmp_path / "broken.json"
    broken.write_text('{"chat_template": ')
    assert "is not valid JSON" in _refused(broken)
    bad_jinja = tmp_path / "bad.json"
    bad_jinja.write_text(json.dumps({"chat_template": "{% if x %}"}))
    assert "is not valid Jinja" in _refused(bad_jinja)


def test_a_checkpoints_template_passes(tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text(CHAT_TEMPLATE)
    check_chat_template(str(f))
    check_chat_template(None)
    # smg reads a literal backslash-n in a .jinja file as a newline: a template written on one line passes.
    one_line = tmp_path / "one_line.jinja"
    one_line.write_text("{% for m in messages %}{{ m['content'] }}\\n{% endfor %}")
    check_chat_template(str(one_line))


def test_serve_stops_with_one_line_before_the_weights_load(capsys, tmp_path):
    from moelink.engine.api.cli import main

    # An empty model directory: the chat template check comes first, before anything loads.
    assert main(["serve", str(tmp_path), "--port", "0", "--no-http", "--chat-template", "/dev/zero"]) == 2
    err = capsys.readouterr().err
    assert "--chat-template='/dev/zero' is invalid: it is not a regular file" in err and err.count("\n") == 1, err
