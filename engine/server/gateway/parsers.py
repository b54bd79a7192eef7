"""`--tool-call-parser` / `--reasoning-parser` checked at start, before any weight loads, against smg's own names.

The managed gateway (smg) is started after the model has loaded, and it refuses a parser name it does not know:
a mistyped `--tool-call-parser qwne` stopped `moelink serve` only after the weights had loaded and warmed (20.8 s
on the built-in model, minutes on a large one), with smg's argparse line. So the server asks smg's registry first
(`smg.smg_rs.get_available_tool_call_parsers` / `get_available_reasoning_parsers`, what smg's own `--help` lists)
and refuses an unknown name with one line listing the names smg takes (vLLM's spellings that moelink translates
too, quirks.smg_parser_name), and the nearest one.

The registry is read in a short-lived subprocess (about 0.1 s, once per process), with the Python of the smg that
will run (its script's interpreter): smg's 100 MB native module is not loaded into the server. Without smg (not
installed, or not importable there) nothing is checked here; the gateway's start says what is wrong, as before.
The registry holds every name smg's `--parser` modes know: a Symphony table's name (e.g. reasoning `minimax_m2`)
passes here and is still refused by smg's default legacy parsers at its start, with smg's own line.
"""
from __future__ import annotations

import difflib
import functools
import json
import os
import shutil
import subprocess
import sys
from typing import Iterable, Optional

_QUERY = ("import json; from smg.smg_rs import get_available_reasoning_parsers as r, "
          "get_available_tool_call_parsers as t; from importlib.metadata import version; v = version('smg'); "
          "print(json.dumps({'tool_call': list(t()), 'reasoning': list(r()), 'version': v}))")
QUERY_TIMEOUT_S = 30.0


def _smg_python() -> Optional[str]:
    """The interpreter the smg that `moelink serve` runs will import smg with: the one its script names (smg
    beside this Python, or on PATH), else this one."""
    beside = os.path.join(os.path.dirname(sys.executable), "smg")
    exe = beside if os.path.isfile(beside) and os.access(beside, os.X_OK) else shutil.which("smg")
    if exe is None:
        return None
    try:
        with open(exe, "rb") as f:
            first = f.readline(512)
    except OSError:
        return sys.executable
    words = first[2:].decode("utf-8", "replace").split() if first.startswith(b"#!") else []
    if words and os.path.basename(words[0]) == "env" and len(words) > 1:
        words = [shutil.which(words[-1]) or ""]
    if words and "python" in os.path.basename(words[0]) and os.access(words[0], os.X_OK):
        return words[0]
    return sys.executable


@functools.lru_cache(maxsize=1)
def smg_parser_names() -> Optional[dict]:
    """{"tool_call": [...], "reasoning": [...], "version": "..."} from smg's registry, or None without smg."""
    python = _smg_python()
    if python is None:
        return None
    try:
        out = subprocess.run([python, "-c", _QUERY], capture_output=True, text=True, timeout=QUERY_TIMEOUT_S,
                             stdin=subprocess.DEVNULL)
        if out.returncode != 0:
            return None
        names = json.loads(out.stdout.strip().splitlines()[-1])
        return names if isinstance(names.get("tool_call"), list) and isinstance(names.get("reasoning"), list) \
            else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError, AttributeError):
        return None


def check_parser_name(flag: str, given: str, smg_name: Optional[str], kind: str,
                      vllm_names: Iterable[str] = ()) -> None:
    """Raise ValueError (one line: the flag, the value, the names smg takes) unless `smg_name` (what `given`
    becomes on smg's command line: None hands smg nothing) is one of smg's `kind` ("tool_call" / "reasoning")
    parsers, or smg's registry cannot be read."""
    if smg_name is None:
        return
    names = smg_parser_names()
    if names is None or smg_name in names[kind]:
        return
    known = sorted(names[kind])
    vllm = sorted(set(vllm_names))
    near = difflib.get_close_matches(given, known + vllm, n=1)
    hint = f" (did you mean {near[0]}?)" if near else ""
    also = f"; or vLLM's {', '.join(vllm)}" if vllm else ""
    raise ValueError(f"{flag}={given!r} is invalid{hint}: the smg gateway ({names.get('version', '?')}) knows "
                     f"{', '.join(known)}{also}.")

