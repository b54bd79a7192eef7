"""Regenerate the committed Python stubs of engine/server/protos with grpcio-tools.

    python -m moelink.engine.server.protogen          # rewrite engine/server/gen/
    python -m moelink.engine.server.protogen --check  # exit 1 if they are stale

The stubs are committed so that serving needs no code generator; a test runs
the same generation into a temporary folder and compares (grpcio-tools is a
test dependency only).
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_DIR = HERE / "protos"
GEN_DIR = HERE / "gen"
PROTOS = ("moelink_v1.proto",)


def generated_names(proto: str) -> list[str]:
    stem = proto[: -len(".proto")]
    return [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]


def generate(out_dir: Path) -> list[Path]:
    """Compile every proto into out_dir; returns the files written."""
    # grpc_tools (test/dev dependency) is found, not imported: its native protoc module segfaults on import in a
    # process that has loaded NIXL (measured: `import nixl` then `from grpc_tools import protoc`, SIGSEGV), and
    # crashed a test worker that way. protoc runs in a process of its own below.
    spec = importlib.util.find_spec("grpc_tools")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("regenerating the stubs needs grpcio-tools (the test extra)")
    include = Path(list(spec.submodule_search_locations)[0]) / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for proto in PROTOS:
        args = ["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out_dir}",
                f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", str(PROTO_DIR / proto)]
        run = subprocess.run([sys.executable, "-c", "import sys; from grpc_tools import protoc; "
                              "sys.exit(protoc.main(sys.argv[1:]))", *args], capture_output=True, text=True,
                             timeout=120)
        if run.returncode != 0:
            raise RuntimeError(f"protoc failed on {proto} (exit {run.returncode}): {run.stderr[-2000:]}")
        for name in generated_names(proto):
            path = out_dir / name
            # protoc writes `import x_pb2`, which only works with the folder on sys.path;
            # the stubs live in a package, so make the import relative.
            text = re.sub(r"^import (\w+_pb2) as (\w+)$", r"from . import \1 as \2", path.read_text(), flags=re.M)
            path.write_text(text)
            written.append(path)
    return written


def stale_files() -> list[str]:
    """Names of committed stubs that differ from a fresh generation (empty when current)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [p.name for p in fresh if not (GEN_DIR / p.name).is_file()
                or (GEN_DIR / p.name).read_text() != p.read_text()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check that the committed stubs are current")
    ns = ap.parse_args(argv)
    if ns.check:
        stale = stale_files()
        if stale:
            print(f"stale generated stubs: {', '.join(stale)}; run python -m moelink.engine.server.protogen")
            return 1
        print("generated stubs are current")
        return 0
    for path in generate(GEN_DIR):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
