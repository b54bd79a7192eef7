"""The request walk and the token walk, measured: which of moelink's files one request and one token pass through.

    python -m moelink.benchmarks.code_walk [--out benchmarks/results/code_walk.json]

ARCHITECTURE.md draws the two walks; this counts them from a run instead of from reading. A tiny Qwen3-MoE
checkpoint (`moelink make-tiny-model`) is served by `LLM` in this process (one rank, the reference kernels);
after a first request has warmed every lazy path, a second request (3 tokens, greedy) runs under a profiler
hook (`sys.setprofile` and `threading.setprofile`, every thread) that records each moelink file in which a
function is entered, in the order first entered (module bodies run by a late import do not count):
- request walk: every file entered from `LLM.generate` to its return (the offline API; the gRPC front adds
  its own files, which ARCHITECTURE.md lists);
- token walk: the files entered inside the model's forward (the decoder, its layers, the MoE layer, the
  kernels), from the hidden states' entry to the logits.
One rank runs no all-to-all: under expert parallelism a MoE layer adds its backend's files (comm/all_to_all.py or
comm/two_level.py or comm/nccl_all_to_all.py, over comm/a2a_base.py), which ARCHITECTURE.md lists.

Only public entry points are used (`LLM`, `SamplingParams`, the `moelink` command), so the same script measures
an older checkout: `PYTHONPATH=<shim of that checkout> python benchmarks/code_walk.py`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path



def package_root() -> Path:
    """The folder the `moelink` package is imported from, as the interpreter names its files (an editable
    install: the checkout; a path shim of an older checkout: the shim)."""
    import moelink.engine
    return Path(moelink.engine.__file__).parents[1]


class FileWalk:
    """Records the moelink files whose functions are entered, first-entry order; `inside` restricts the record
    to calls made (transitively) within a function of a file under the given folder whose name is `forward`."""

    def __init__(self, root: Path, inside: str | None = None):
        self.root = str(root) + "/"
        self.inside = inside
        self.files: list[str] = []
        self._seen: set[str] = set()
        self._depth: dict[int, int] = {}  # per thread: > 0 while within an `inside` frame
        self.recording = False

    def _rel(self, filename: str) -> str | None:
        if (not filename.startswith(self.root) or "/tests/" in filename or "/.venv/" in filename
                or filename == __file__):
            return None
        return filename[len(self.root):]

    def hook(self, frame, event, arg):
        if not self.recording or event not in ("call", "return"):
            return
        code = frame.f_code
        rel = self._rel(code.co_filename)
        if rel is None or code.co_name == "<module>":
            return
        if self.inside is not None:
            thread = threading.get_ident()
            depth = self._depth.get(thread, 0)
            if rel.startswith(self.inside) and code.co_name == "forward":
                depth += 1 if event == "call" else -1
                self._depth[thread] = depth
                if event == "return":
                    return
            if depth <= 0:
                return
        if event == "call" and rel not in self._seen:
            self._seen.add(rel)
            self.files.append(rel)

    def __enter__(self):
        self.recording = True
        return self

    def __exit__(self, *exc):
        self.recording = False


class Profiler:
    """One profile hook on this thread and on every thread started after it (the engine's device-stream and
    output threads start with the engine): it hands each event to the walk that is recording."""

    def __init__(self, walks: list[FileWalk]):
        self.walks = walks

    def hook(self, frame, event, arg):
        for w in self.walks:
            if w.recording:
                w.hook(frame, event, arg)

    def __enter__(self):
        sys.setprofile(self.hook)
        threading.setprofile(self.hook)
        return self

    def __exit__(self, *exc):
        sys.setprofile(None)
        threading.setprofile(None)


def by_folder(files: list[str]) -> dict[str, int]:
    """Files per folder: engine's sub-packages apart (engine/core, engine/rank, ...), other folders whole."""
    out: dict[str, int] = {}
    for f in files:
        parts = f.split("/")
        key = "/".join(parts[:2]) if parts[0] == "engine" and len(parts) > 2 else parts[0]
        out[key] = out.get(key, 0) + 1
    return out


def _walks(model_dir: Path) -> dict:
    from moelink.engine import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    root = package_root()
    request, token = FileWalk(root), FileWalk(root, inside="engine/models/")
    # The hook goes in before the engine starts its threads, so they carry it; it records only within `with`.
    with Profiler([request, token]), LLM(str(model_dir), dtype="float32", max_model_len=256) as llm:
        llm.generate(["warm every lazy path first"], params)
        with request:
            llm.generate(["the walk of one request"], params)
        with token:
            llm.generate(["the walk of one token"], params)
    return {"request": request.files, "token": token.files}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moelink.benchmarks.code_walk", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write the walks as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "tiny"
        cli = "moelink.engine.api.cli" if (package_root() / "engine/api/cli.py").exists() else "moelink.engine.cli"
        subprocess.run([sys.executable, "-c", f"from {cli} import main; main()",
            "make-tiny-model", str(model_dir), "--arch", "qwen3_moe"], check=True, capture_output=True)
        result = _walks(model_dir)
    for name, files in result.items():
        print(f"{name} walk: {len(files)} files  {json.dumps(by_folder(files))}")
        for f in files:
            print(f"  {f}")
    if args.out is not None:
        args.out.write_text(json.dumps({k: {"files": v, "count": len(v), "by_folder": by_folder(v)}
                                        for k, v in result.items()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
