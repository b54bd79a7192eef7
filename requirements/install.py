"""Install the project into a virtual environment under the locked dependency set (`make setup`).

    python requirements/install.py --python .venv/bin/python --lock requirements/lock-cpu.txt \
        --torch-spec torch==2.13.0 --extras test

With uv (pinned by --uv-spec, itself installed by pip into the environment) when it can, else with pip alone; both
install exactly the same set: the lock's pins as constraints, torch first as the given spec, the project editable.
uv takes about 15 s where pip takes 80-90 s on the 2-core machines (a fresh clone's set-up, 2026-11-26: most of
pip's time is unpacking and byte-compiling wheels one at a time), which counts against `make test`'s 12 minutes.

uv does not read pip's configuration, so the indexes, find-links and constraints pip is configured with (pip.conf
files and PIP_* variables, as `pip config list` reports them) are handed to it; with them, `unsafe-best-match`: pick
from every index as pip does (uv's default takes a package from the first index that has it). An empty --lock
(`make setup LOCK=`) installs the newest releases pyproject.toml allows, as pip would. Any failure of the uv path
(no uv wheel on the index, a resolution error) falls back to pip, said in one line.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def pip_settings(python: str) -> dict[str, list[str]]:
    """pip's configured index-url, extra-index-url, find-links, constraint and cert, each a list of values."""
    out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    got: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if name in ("index-url", "extra-index-url", "find-links", "constraint", "cert") and value:
            for v in shlex.split(value.strip("'\"")):
                if v not in got.setdefault(name, []):
                    got[name].append(v)
    for name in ("index-url", "extra-index-url", "find-links", "constraint", "cert"):  # the environment wins
        env = os.environ.get("PIP_" + name.upper().replace("-", "_"))
        if env:
            got[name] = env.split()
    return got


def uv_args(settings: dict[str, list[str]]) -> list[str]:
    args = ["--index-strategy", "unsafe-best-match"]
    for url in settings.get("index-url", [])[:1]:
        args += ["--index-url", url]
    for url in settings.get("extra-index-url", []):
        args += ["--extra-index-url", url]
    for link in settings.get("find-links", []):
        args += ["--find-links", link]
    for c in settings.get("constraint", []):
        if Path(c).is_file():
            args += ["-c", c]
    return args


def run(cmd: list[str], env: dict | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env=env)


def with_uv(python: str, lock: str, torch_spec: str, extras: str, uv_spec: str) -> None:
    run([python, "-m", "pip", "install", "-q", uv_spec])
    settings = pip_settings(python)
    env = dict(os.environ)
    for cert in settings.get("cert", [])[:1]:
        env.setdefault("SSL_CERT_FILE", cert)
    # --compile-bytecode: pip writes the .pyc files at install and uv does not; these machines set
    # PYTHONDONTWRITEBYTECODE=1, so without them every process of the suite compiled torch's and transformers'
    # sources again (a fresh clone's suite ran 25 minutes and more instead of 17, 2026-11-26).
    base = [python, "-m", "uv", "pip", "install", "-q", "--compile-bytecode", "--python", python, *uv_args(settings)]
    if lock:
        base += ["-c", lock, "--build-constraint", lock]  # the build backend pinned too, as PIP_CONSTRAINT does
    # torch first, alone, as pip does below: the spec picks the CPU wheel before anything else can ask for torch.
    run(base + [torch_spec], env)
    run(base + ["-e", f".[{extras}]"], env)


def with_pip(python: str, lock: str, torch_spec: str, extras: str) -> None:
    env = dict(os.environ)
    if lock:
        env["PIP_CONSTRAINT"] = lock  # reaches pip's build environment too
    run([python, "-m", "pip", "install", torch_spec], env)
    run([python, "-m", "pip", "install", "-e", f".[{extras}]"], env)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--python", required=True, help="the virtual environment's interpreter")
    ap.add_argument("--lock", default="", help="constraints file (empty: none)")
    ap.add_argument("--torch-spec", required=True)
    ap.add_argument("--extras", default="test")
    ap.add_argument("--uv-spec", default="uv==0.13.9", help="empty: pip alone")
    ns = ap.parse_args(argv)
    lock = str(Path(ns.lock).resolve()) if ns.lock else ""
    if lock and not Path(lock).is_file():
        ap.error(f"--lock {ns.lock}: no such file")
    if ns.uv_spec:
        try:
            with_uv(ns.python, lock, ns.torch_spec, ns.extras, ns.uv_spec)
            return 0
        except subprocess.CalledProcessError as exc:
            print(f"install: uv failed ({' '.join(exc.cmd[:4])}... exited {exc.returncode}); installing with pip",
                  flush=True)
    with_pip(ns.python, lock, ns.torch_spec, ns.extras)
    return 0


if __name__ == "__main__":
    sys.exit(main())
