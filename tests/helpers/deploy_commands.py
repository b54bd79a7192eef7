"""Finding `moelink serve` commands in deploy/ files and turning them into argv the real parser can check.

Helpers of tests/deploy/test_manifests.py (see its docstring for the rules).
"""
from __future__ import annotations
import argparse
import contextlib
import io
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s" / "raycluster.yaml"
CLUSTER_YAML = DEPLOY / "ray" / "cluster.yaml"
SBATCH = DEPLOY / "slurm" / "moelink.sbatch"
SERVE_SH = DEPLOY / "ray" / "serve.sh"
README = DEPLOY / "README.md"
YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))
SCRIPTS = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".sh", ".sbatch"))


def parse_serve(parser: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace:
    """parse_args or an AssertionError carrying argparse's message (never SystemExit)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"`moelink serve` rejects {shlex.join(args)}:\n{err.getvalue().strip()}") from exc


# --------------------------------------------------------------------------- finding commands
@dataclass
class Placeholder:
    """A value known only when the script runs ($VAR, MODEL, HEAD_IP:PORT ...)."""
    text: str


@dataclass
class ServeCommand:
    source: str  # file and a short excerpt, for messages
    launcher: str  # "moelink" (a real `moelink serve`), "serve.sh" or "moelink.sbatch"
    tokens: list = field(default_factory=list)  # str | Placeholder, the arguments after `moelink serve`


# moelink (any path) / "$MOELINK" / ${MOELINK} / serve.sh / moelink.sbatch, as a whole word.
_LAUNCHER = re.compile(
    r"""(?<![\w./$-])(?P<prog>"?\$\{?MOELINK\}?"?|(?:[\w./~-]*/)?(?:moelink\.sbatch|serve\.sh|moelink))(?=[\s'"]|$)""")
_VAR = re.compile(r"^\$\{?(?P<name>\w+|@|\*)(?::?-(?P<default>[^}]*))?\}?$")
_USAGE_PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*(:[A-Z][A-Z0-9_]*)?$")
_SHELL_OPERATORS = set(";&|<>()")


def logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined, also inside comments ('#  ... \\' + '#  ...')."""
    out, cur = [], None
    for line in text.splitlines():
        if cur is not None:
            line = re.sub(r"^\s*#", "", line) if cur.lstrip().startswith("#") else line
            cur = cur + " " + line
        else:
            cur = line
        if cur.rstrip().endswith("\\"):
            cur = cur.rstrip()[:-1]
            continue
        out.append(cur)
        cur = None
    if cur is not None:
        out.append(cur)
    return out


def _quote_at(line: str, pos: int) -> str | None:
    """The quote character open at `pos` in a shell line, or None."""
    quote, i = None, 0
    while i < pos:
        c = line[i]
        if quote is None:
            if c == "\\":
                i += 1
            elif c in "'\"":
                quote = c
        elif quote == '"' and c == "\\":
            i += 1
        elif c == quote:
            quote = None
        i += 1
    return quote


def _close_of(line: str, start: int, quote: str) -> int:
    i = start
    while i < len(line):
        if quote == '"' and line[i] == "\\":
            i += 2
            continue
        if line[i] == quote:
            return i
        i += 1
    return len(line)


def _shell_words(text: str) -> list[str]:
    lex = shlex.shlex(text, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    words = []
    for word in lex:
        if set(word) <= _SHELL_OPERATORS:  # ; & && | > 2>&1 ... ends the command
            if word[0] in "<>" and words and words[-1].isdigit():
                words.pop()  # the fd of a redirection (2>...)
            break
        words.append(word)
    return words


def _resolve(word: str, env: dict[str, str]):
    """A shell word (quotes already removed) → str, Placeholder, or None (dropped)."""
    if word in ("$@", "$*", "${@}", "..."):
        return None
    m = _VAR.match(word)
    if m:
        if m.group("default") is not None:
            return m.group("default")
        if m.group("name") in env:
            return env[m.group("name")]
        return Placeholder(word)
    if "$" in word or _USAGE_PLACEHOLDER.match(word):
        return Placeholder(word)
    return word


def _strip_optional_groups(words: list[str]) -> list[str]:
    """Usage syntax: keep `[--flag value]` groups (brackets removed), drop prose groups like `[serve flags]`."""
    out, group = [], None
    for w in words:
        if group is None and w.startswith("[") and not w.startswith("[["):
            group, w = [], w[1:]
        if group is not None:
            closing = w.endswith("]")
            group.append(w.rstrip("]"))
            if closing:
                if group and group[0].startswith("-"):
                    out.extend(g for g in group if g)
                group = None
            continue
        out.append(w)
    return out


def _at_command_position(before: str, quote: str | None) -> bool:
    """Is a bare `moelink` here a command (not a word in prose or a message)?"""
    if quote:
        return before.endswith(quote)  # 'moelink serve ...' as the whole quoted string (ray exec)
    before = before.rstrip()
    if not before or before[-1] in ";&|(":
        return True
    last = before.split()[-1]
    return last in ("exec", "nohup", "time", "env", "then", "do") or re.match(r"^\w+=\S*$", last) is not None


def commands_in_line(line: str, source: str, env: dict[str, str]) -> list[ServeCommand]:
    found, pos = [], 0
    stripped = line.lstrip()
    if stripped.startswith("#"):  # a commented example: check it like code
        line = stripped[1:]
    while True:
        m = _LAUNCHER.search(line, pos)
        if not m:
            return found
        prog = m.group("prog").strip('"')
        start = m.end()
        quote = _quote_at(line, m.start()) if not m.group("prog").startswith('"') else None
        end = _close_of(line, start, quote) if quote else len(line)
        rest = line[start:end]
        pos = end if quote else start  # where the next search starts
        name = "moelink" if "MOELINK" in prog else os.path.basename(prog)
        if name == "moelink" and not _at_command_position(line[:m.start()], quote):
            continue
        if name == "moelink":
            words = rest.split(None, 1)
            if not words or words[0] != "serve":
                continue
            rest = words[1] if len(words) > 1 else ""
        try:
            words = _shell_words(rest)
        except ValueError as exc:
            raise AssertionError(f"{source}: cannot split {rest!r}: {exc}") from exc
        tokens = [t for t in (_resolve(w, env) for w in _strip_optional_groups(words)) if t is not None]
        if name == "moelink.sbatch":  # its arguments are extra `moelink serve` flags
            tokens = [Placeholder("$MODEL")] + tokens
        if not tokens:  # `exec "$MOELINK" serve "$@"`: a pass-through, nothing to check
            continue
        found.append(ServeCommand(f"{source}: {line.strip()[:100]}", name, tokens))
        # Scanning goes on inside `rest`: a second command there must follow a shell operator.


def commands_in_text(text: str, source: str, env: dict[str, str] | None = None) -> list[ServeCommand]:
    out = []
    for line in logical_lines(text):
        out.extend(commands_in_line(line, source, env or {}))
    return out


def _container_env(node: dict) -> dict[str, str]:
    env = {}
    for item in node.get("env") or []:
        if isinstance(item, dict) and "value" in item:
            env[item["name"]] = str(item["value"])
    return env


def _yaml_strings(node, env: dict[str, str]):
    """Every string value in a YAML document, with the env of the container it sits in."""
    if isinstance(node, dict):
        if "env" in node:
            env = {**env, **_container_env(node)}
        for v in node.values():
            yield from _yaml_strings(v, env)
    elif isinstance(node, list):
        for v in node:
            yield from _yaml_strings(v, env)
    elif isinstance(node, str):
        yield node, env


def commands_in_yaml(path: Path) -> list[ServeCommand]:
    text = path.read_text()
    rel = path.relative_to(ROOT)
    out = []
    for doc in yaml.safe_load_all(text):
        for s, env in _yaml_strings(doc, {}):
            out.extend(commands_in_text(s, str(rel), env))
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    out.extend(commands_in_text(comments, f"{rel} (comment)"))
    return out


def commands_in_markdown(path: Path) -> list[ServeCommand]:
    blocks = re.findall(r"^```(?:bash|sh|shell|console)?\n(.*?)^```", path.read_text(), flags=re.M | re.S)
    rel = str(path.relative_to(ROOT))
    return [c for block in blocks for c in commands_in_text(block, rel)]


def script_defaults(text: str) -> dict[str, str]:
    """Top-level `NAME=${NAME:-literal}` / `NAME=literal` assignments of a script: its documented defaults."""
    env = {}
    for m in re.finditer(r"^(?:export\s+)?(\w+)=(?:\$\{\1:-([^}$\s]*)\}|([\w./:-]+))\s*(?:#.*)?$", text, flags=re.M):
        env[m.group(1)] = m.group(2) if m.group(2) is not None else m.group(3)
    return env


def commands_in(path: Path) -> list[ServeCommand]:
    if path.suffix in (".yaml", ".yml"):
        return commands_in_yaml(path)
    if path.suffix == ".md":
        return commands_in_markdown(path)
    text = path.read_text()
    return commands_in_text(text, str(path.relative_to(ROOT)), script_defaults(text))


def concrete_args(parser: argparse.ArgumentParser, tokens: list) -> list[str]:
    """Placeholders → a value of the type their flag wants; literal words stay as written."""
    def dummy(action) -> str:
        if action is not None and action.choices:
            return str(list(action.choices)[0])
        if action is not None and action.type is int:
            return "1"
        if action is not None and action.type is float:
            return "1.0"
        return "placeholder"

    args, expect_value_for = [], None
    for t in tokens:
        if expect_value_for is not None:
            args.append(dummy(expect_value_for) if isinstance(t, Placeholder) else t)
            expect_value_for = None
            continue
        if isinstance(t, Placeholder):
            args.append("/placeholder/model")  # a positional: the model directory
            continue
        args.append(t)
        if t.startswith("-") and "=" not in t:
            action = parser._option_string_actions.get(t)
            if action is not None and action.nargs != 0:
                expect_value_for = action
    return args
