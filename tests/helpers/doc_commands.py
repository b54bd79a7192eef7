"""The shell blocks of the docs (```sh, ```bash, ```console) and the commands in them, checked without running
them (tests/test_docs.py, issue 54 item 7): `moelink SUB ...` parsed by the real `moelink` parser (built as its
main builds it), `python -m moelink.X --flag ...` against module X's argparse source, `make TARGET VAR=...`
against the Makefile. A placeholder (`MODEL`, `PORT`, `$VAR`, `[--optional flags]`) stands for a value of the
argument it is given to."""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHELL_LANGS = ("sh", "bash", "console")
RUNNABLE_MARKER = "<!-- runnable -->"
NOT_RUN = re.compile(r"^<!-- not-run: (.*?) -->$")
FENCE = re.compile(r"^([ \t]*)```([\w-]*)[ \t]*\n(.*?)\n\1```[ \t]*$", re.M | re.S)
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*(?:[-:./][A-Z0-9_]+)*")  # MODEL, HEAD:PORT, KIMI_K2_THINKING_DIR
ASSIGNMENT = re.compile(r"[A-Za-z_]\w*=")
SEPARATORS = {"&", "&&", "|", "||", ";"}
# Commands a block may hold beside the checked ones without a not-run marker (they change nothing but the shell).
HARMLESS = {("source", ".venv/bin/activate")}


@dataclass
class Block:
    doc: str
    index: int  # 1-based among the page's shell blocks
    line: int  # 1-based line of the block's first code line
    lang: str
    code: str
    marker: str | None  # "runnable", "not-run", or None
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{self.doc} shell block {self.index} (line {self.line})"


@dataclass
class Command:
    line: int  # 1-based line in the page
    text: str  # as the page writes it (continuations joined)
    argv: list[str] = field(default_factory=list)  # after leading VAR=value assignments
    position: int = 0  # which command of the line's chain (a & b, a | b, ...)

    @property
    def kind(self) -> str:
        """moelink | python-moelink | make | pytest | serve-wrapper | other."""
        if not self.argv:
            return "other"
        head = self.argv[0]
        if tuple(self.argv[:2]) in SERVE_WRAPPERS:
            return "serve-wrapper"
        if head in ("moelink", ".venv/bin/moelink"):
            return "moelink"
        if head == "make":
            return "make"
        if head in ("python", "python3", ".venv/bin/python") and len(self.argv) > 2 and self.argv[1] == "-m":
            if self.argv[2].startswith("moelink."):
                return "python-moelink"
            if self.argv[2] == "pytest":
                return "pytest"
        return "other"


def shell_blocks(doc: str) -> list[Block]:
    text = (ROOT / doc).read_text()
    blocks = []
    for m in FENCE.finditer(text):
        indent, lang, code = m.group(1), m.group(2), m.group(3)
        if lang not in SHELL_LANGS:
            continue
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        marker, reason = None, ""
        if before == RUNNABLE_MARKER:
            marker = "runnable"
        elif NOT_RUN.match(before):
            marker, reason = "not-run", NOT_RUN.match(before).group(1).strip()
        code = "\n".join(ln[len(indent):] if ln.startswith(indent) else ln for ln in code.split("\n"))
        blocks.append(Block(doc, len(blocks) + 1, text.count("\n", 0, m.start()) + 2, lang, code, marker, reason))
    return blocks


def _strip_comment(line: str) -> str:
    """`line` without its shell comment (an unquoted # at the start of a word)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line


def commands(block: Block) -> list[Command]:
    """The block's command lines (continuations joined, comments dropped, `$ ` prompts of a console block: its other
    lines are output), each split at & && | || ; into commands."""
    out: list[Command] = []
    lines = block.code.split("\n")
    i = 0
    while i < len(lines):
        start = i
        line = lines[i]
        if block.lang == "console":
            if not line.startswith("$ "):
                i += 1
                continue
            line = line[2:]
        parts = [_strip_comment(line)]
        while parts[-1].endswith("\\") and i + 1 < len(lines):
            i += 1
            parts[-1] = parts[-1][:-1]
            parts.append(_strip_comment(lines[i]))
        i += 1
        text = " ".join(p.strip() for p in parts).strip()
        if not text:
            continue
        for position, piece in enumerate(_split_chain(text)):
            out.append(Command(block.line + start, text, _command_argv(piece), position))
    return out


def _command_argv(piece: list[str]) -> list[str]:
    argv = list(piece)
    while len(argv) > 1 and ASSIGNMENT.match(argv[0]):
        argv.pop(0)  # OUT=$OUT bash ...: the command after its environment
    return argv


def _split_chain(text: str) -> list[list[str]]:
    try:
        tokens = shlex.split(_expand_optional(text)[0])
    except ValueError:
        return [[text]]  # unbalanced quotes: an "other" command the marker must account for
    chain, cur = [], []
    for tok in tokens:
        if tok in SEPARATORS:
            chain.append(cur)
            cur = []
        else:
            cur.append(tok)
    chain.append(cur)
    return [c for c in chain if c]


OPTIONAL = re.compile(r"(?<!\S)\[(-[^\[\]]*)\]")  # [--flag VALUE], [--a | --b]: a synopsis's optional part


def _expand_optional(text: str) -> list[str]:
    """Each way to read `text`'s optional parts: all of them, with each group's first alternative; then each other
    alternative of a group in turn (`[--http-port 8000 | --no-http]` is read both ways)."""
    groups = [[alt.strip() for alt in m.group(1).split(" | ")] for m in OPTIONAL.finditer(text)]

    def fill(choice: dict[int, int]) -> str:  # group index -> the alternative taken (default the first)
        counter = iter(range(len(groups)))

        def pick(_match: re.Match) -> str:
            g = next(counter)
            return groups[g][choice.get(g, 0)]

        return OPTIONAL.sub(pick, text)

    variants = [fill({})]
    for g, alts in enumerate(groups):
        variants += [fill({g: a}) for a in range(1, len(alts))]
    return variants


def variants(command: Command) -> list[list[str]]:
    """The argv of each reading of `command`'s optional parts, its leading assignments dropped."""
    out = []
    for text in _expand_optional(command.text):
        chain = _split_chain(text)
        if command.position < len(chain):
            argv = _command_argv(chain[command.position])
            if argv not in out:
                out.append(argv)
    return out or [command.argv]


# -- moelink SUB ...: the real parser -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def moelink_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser `moelink COMMAND ...` gets, built as engine/api/cli.main builds it (one subcommand's module where
    it can: serve and generate import no torch)."""
    from moelink.engine.api.cli import REGISTRARS, build_parser

    return build_parser(command if command in (*REGISTRARS, "generate") else None)


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name)
    return None


def _is_placeholder(token: str) -> bool:
    return "$" in token or PLACEHOLDER.fullmatch(token) is not None or token.startswith("<")


def _sample(action: argparse.Action | None, token: str) -> str:
    """A value of `action`'s type for the placeholder `token` (the token itself where any string will do)."""
    if action is None:
        return token
    if action.choices:
        return str(next(iter(action.choices)))
    kind = action.type
    if kind is None or kind is str:
        return token
    for value in ("1", "0.5", "x", "[]", "{}"):
        try:
            kind(value)
            return value
        except Exception:  # noqa: BLE001 (a custom type's own error)
            continue
    return token


def substitute(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """argv with each placeholder replaced by a value of the type of the option it is given to."""
    options = parser._option_string_actions
    out, owner, left = [], None, 0
    for tok in argv:
        if tok.startswith("-") and not _is_number(tok):
            name, eq, value = tok.partition("=")
            action = options.get(name)
            if eq:
                out.append(f"{name}={_sample(action, value)}" if _is_placeholder(value) else tok)
                owner, left = None, 0
            else:
                out.append(tok)
                owner = action
                left = 0 if action is None else _arity(action)
            continue
        if left and owner is not None:
            out.append(_sample(owner, tok) if _is_placeholder(tok) else tok)
            left -= 1
        else:
            out.append(tok)
    return out


def _is_number(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False


def _arity(action: argparse.Action) -> int:
    if action.nargs is None:
        return 1
    if isinstance(action.nargs, int):
        return action.nargs
    return {"?": 1, "*": 1 << 30, "+": 1 << 30}.get(action.nargs, 0)


def check_moelink(argv: list[str]) -> str | None:
    """None if `moelink ARGS` parses, else argparse's error."""
    args = argv[1:]
    command = args[0] if args and not args[0].startswith("-") else None
    parser = moelink_parser(command)
    sub = _subparser(parser, command) if command else None
    if command and sub is None:
        return f"no subcommand {command!r}"
    if sub is not None:
        args = [command, *substitute(sub, args[1:])]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit as exc:
        if exc.code not in (0, None):
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {exc.code}"
        return None
    nested = NESTED_SERVE_ARGS.get(command)  # flags a command hands on to the `moelink serve` it starts
    if nested in args[1:]:
        value = args[args.index(nested) + 1]
        inner = check_moelink(["moelink", "serve", "MODEL", *shlex.split(value)])
        if inner:
            return f"{nested}: {inner}"
    return None


NESTED_SERVE_ARGS = {"bench-serve": "--serve-args"}


# -- python -m moelink.X --flag ...: the module's argparse source ---------------------------------------------------

def module_source(module: str) -> Path | None:
    """The file `python -m moelink.X` runs (the packages' directories: pyproject.toml's package-dir)."""
    rel = Path(*module.split(".")[1:])
    for path in (ROOT / rel.with_suffix(".py"), ROOT / rel / "__main__.py"):
        if path.is_file():
            return path
    return None


def check_python_module(argv: list[str]) -> str | None:
    module = argv[2]
    path = module_source(module)
    if path is None:
        return f"no module {module} in the repository"
    source = path.read_text()
    missing = []
    for tok in argv[3:]:
        if not re.match(r"--?[A-Za-z]", tok):
            continue
        flag = tok.split("=", 1)[0]
        if re.search(rf"""add_argument\((?:[^)]*?,\s*)?["']{re.escape(flag)}["']""", source, re.S):
            continue
        if flag.startswith("--no-") and "BooleanOptionalAction" in source and \
                re.search(rf"""add_argument\(\s*["']--{re.escape(flag[5:])}["']""", source):
            continue
        missing.append(flag)
    if missing:
        return f"{path.relative_to(ROOT)} defines no {', '.join(missing)} (add_argument)"
    return None


# -- make TARGET VAR=value ------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def makefile() -> tuple[frozenset[str], frozenset[str]]:
    """(targets, variables) of the Makefile."""
    text = (ROOT / "Makefile").read_text()
    variables = set(re.findall(r"^([A-Za-z_]\w*)\s*(?:\?=|:=|\+=|=)", text, flags=re.M))
    targets = set()
    for line in re.findall(r"^([^\s#=:][^=:]*?)\s*:(?!=)", text, flags=re.M):
        targets.update(line.split())
    return frozenset(targets - {".PHONY"}), frozenset(variables)


def check_make(argv: list[str]) -> str | None:
    targets, variables = makefile()
    problems = []
    for tok in argv[1:]:
        if ASSIGNMENT.match(tok):
            name, value = tok.split("=", 1)
            if name not in variables:
                problems.append(f"the Makefile has no variable {name}")
            elif name == "SERVE_ARGS" and value:  # what `make serve` passes on to moelink serve
                err = check_moelink(["moelink", "serve", "MODEL", *shlex.split(value)])
                if err:
                    problems.append(f"SERVE_ARGS: moelink serve: {err}")
        elif tok.startswith("-"):
            continue  # make's own options
        elif tok not in targets:
            problems.append(f"the Makefile has no target {tok}")
    return "; ".join(problems) or None


# -- python -m pytest PATHS ------------------------------------------------------------------------------------------

def check_pytest(argv: list[str]) -> str | None:
    missing = [tok for tok in argv[3:] if tok.startswith("tests/") and not (ROOT / tok.split("::")[0]).exists()]
    return f"no such test path: {', '.join(missing)}" if missing else None


# Scripts that hand their extra arguments to `moelink serve` (deploy/slurm/moelink.sbatch: "extra arguments go to
# `moelink serve`"): those are checked as serve flags, though the script itself needs its cluster.
SERVE_WRAPPERS = {("sbatch", "deploy/slurm/moelink.sbatch")}


def check_serve_wrapper(argv: list[str]) -> str | None:
    err = check_moelink(["moelink", "serve", "MODEL", *argv[2:]])
    return None if err is None else f"{argv[1]} hands these to moelink serve: {err}"


CHECKS = {"moelink": check_moelink, "python-moelink": check_python_module, "make": check_make,
          "pytest": check_pytest, "serve-wrapper": check_serve_wrapper}


def check_command(command: Command) -> str | None:
    """None if every reading of `command` checks out, else the first error."""
    check = CHECKS.get(command.kind)
    if check is None:
        return None
    for argv in variants(command):
        err = check(argv)
        if err:
            return err
    return None


def unchecked(command: Command) -> bool:
    """A command this module cannot check (nor is it a harmless shell step): its block must say why it is not
    run (<!-- not-run: REASON -->). pytest runs and serve wrappers are checked (paths, serve flags) but not run, so
    they count here."""
    return command.kind in ("other", "pytest", "serve-wrapper") and tuple(command.argv) not in HARMLESS
