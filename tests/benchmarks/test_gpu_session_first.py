"""The first plan of benchmarks/gpu_session.sh (benchmarks/gpu_session/first.sh, carry.sh): what a lease of 45 minutes
runs first, on CPU. `plan` prints it first, within its budget; each command runs what it says (dry-run), its engine
tests exist, its NVFP4 smoke skips below sm_100; one command's CPU smoke as on the GPU image (no Ray, smg, xgrammar,
smg-grpc-proto, grpc health or reflection; no git): its log and results named by device and commit, its serving part
skipped with one line; the carried serving wheels installed where an import fails; `prepare`. Each command's
budget against the compile model is test_gpu_session.py's (its STEPS hold `first 1` .. `first 6`).
About 25 s on 2 cores, most of it the smoke run and the engine tests' collection.
"""
from __future__ import annotations

import pytest

import functools
import json
import os
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from tests.helpers import zygote
from tests.helpers.gpu_session import PLAN, ROOT, SAFE_NAME, session

DOC = ROOT / "docs" / "gpu-sessions.md"
MAX_FILES_PER_COMMAND = 8
STEP_BUDGET_S = 570  # 600 s of the device tool less its start and transfers (test_gpu_session.py holds it)
FIRST_BUDGET_S = 2400  # a lease of 45 minutes less the tool's starts
ROW = re.compile(r"^(.+?)\s+budget\s+(\d+) s\s+OUT=\$OUT bash benchmarks/gpu_session.sh (.+)$", re.M)
# The GPU image (docs: .library/device/KINDS.md): none of these is there.
NOT_ON_THE_GPU_IMAGE = "ray,smg,xgrammar,smg_grpc_proto,grpc_health,grpc_reflection"
# A sitecustomize that makes those imports fail in every Python process the script starts (PYTHONPATH), except
# from ALLOW_DIR (where the script installs carried wheels).
BLOCKER = '''
import importlib.machinery, os, sys
_BLOCK = set(filter(None, os.environ.get("BLOCK_MODULES", "").split(",")))
_ALLOW = os.environ.get("ALLOW_DIR")
class _Block:
    def find_spec(self, name, path=None, target=None):
        if "." in name or name not in _BLOCK:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, [_ALLOW]) if _ALLOW else None
        if spec is None:
            raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU image)", name=name)
        return spec
sys.meta_path.insert(0, _Block())
'''


def git_commit() -> str:
    c = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "--no-optional-locks", "diff", "--quiet", "HEAD", "--"], cwd=ROOT).returncode != 0
    return c + ("-dirty" if dirty else "")


@functools.lru_cache(maxsize=1)
def plan_output() -> str:
    proc = session("plan")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@functools.lru_cache(maxsize=8)
def dry_run(n: int, **env) -> tuple[list[tuple], str]:
    proc = session("--dry-run", "first", str(n), **dict(env))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return PLAN.findall(proc.stdout), proc.stdout


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_plan_prints_the_first_plan_first_within_a_lease():
    """`plan` starts with the first plan: first 1 .. first 6 in order, each one device command within the tool's
    limit, their total (printed) within 2400 s; then the full plan, as before."""
    out = plan_output()
    assert out.startswith("first plan (one GPU for 45 minutes: these commands, in this order")
    first, full = out.split("\nfull plan (", 1)
    rows = ROW.findall(first)
    assert [r[2] for r in rows] == [f"first {n}" for n in range(1, 7)]
    budgets = [int(b) for _, b, _ in rows]
    assert all(b <= STEP_BUDGET_S for b in budgets), budgets
    total = sum(budgets)
    assert total <= FIRST_BUDGET_S and f"first total {total} s" in first, first
    assert ROW.findall(full)[0][2] == "preflight"
    for n, b in enumerate(budgets, 1):  # each row is its command's dry-run total
        assert sum(int(p[6]) for p in dry_run(n)[0]) == b


def test_first_plan_runs_what_it_says_in_this_order():
    """1: e2e --quick (both loops, serving); 2: the GPU engine tests; 3: spec --quick; 4: decode --quick; 5:
    kv-transfer --quick; 6: one smoke per kernel family. Every result file is named by device and commit."""
    cmds = {n: [(p[1], p[7]) for p in dry_run(n)[0]] for n in range(1, 7)}
    assert [name for name, _ in cmds[1]] == ["serve_deps", "engine_e2e_quick"]
    assert "-m moelink.benchmarks.engine_e2e --quick --models qwen3-30b-a3b " in cmds[1][1][1]
    assert "--no-serve" not in cmds[1][1][1]
    assert [name for name, _ in cmds[2]] == ["gpu_engine_first", "verify_graphs"]
    tests = " ".join(cmd for _, cmd in cmds[2])
    for what in ("test_cuda_graph_decode_matches_eager[float32]", "test_cuda_graph_decode_matches_eager_mla[dsv3_lora]",
                 "test_gpu_triton_matches_cpu_reference_fp32[qwen3_e6k3]", "tests/engine/test_gpu_verify_graphs.py",
                 "test_kv_pipelined.py::test_on_a_gpu_the_save_copies_on_a_side_stream"):
        assert what in tests
    assert re.search(r"-m moelink\.benchmarks\.spec_decode --shape qwen3-30b-a3b --batch 4 --p 0\.8 --k 2 ", cmds[3][0][1])
    assert "-m moelink.benchmarks.engine_decode --model qwen3-30b-a3b --graphs --batches 1,64,256 " in cmds[4][0][1]
    assert "-m moelink.benchmarks.kv_transfer_engines --device cuda --tokens 1024 --repeats 2 " in cmds[5][0][1]
    assert [name for name, _ in cmds[6]] == ["moe_bf16_smoke", "moe_fp8_smoke", "moe_mxfp4_smoke", "moe_nvfp4_smoke"]
    assert "--dtype fp8" in cmds[6][1][1] and "--tokens 1,64,1024" in cmds[6][2][1]
    for n, rows in cmds.items():
        for _, cmd in rows:
            m = re.search(r"--(?:out|json) (\S+)", cmd)
            if m:
                name = Path(m[1]).name
                # device "cpu" (a dry-run), the commit as git has it (others may commit meanwhile: any hash)
                assert re.search(r"_cpu_[0-9a-f]{7,}(-dirty)?[_.]", name) and SAFE_NAME.match(name), (n, name)
    # MOELINK_COMMIT names them where git does not work (the device's copy of the tree may have no .git).
    plans, _ = dry_run(4, MOELINK_COMMIT="abc1234")
    assert plans[0][7].endswith("--out benchmarks/results/engine_decode_cpu_abc1234.json")


def test_first_6_runs_nvfp4_on_sm100_only():
    plans, out = dry_run(6, GPU_CC="9.0")
    assert [p[1] for p in plans] == ["moe_bf16_smoke", "moe_fp8_smoke", "moe_mxfp4_smoke"]
    assert re.search(r"^SKIPPED moe_nvfp4_smoke: NVFP4 smoke runs on sm_100 and later only; this GPU is sm_90 ", out, re.M)
    plans, out = dry_run(6, GPU_CC="10.0")
    assert plans[-1][1] == "moe_nvfp4_smoke" and "SKIPPED" not in out


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_first_2_selects_tests_that_exist():
    """A renamed test would cost the command its selection: every node id of `first 2` is collected."""
    targets = []
    for p in dry_run(2)[0]:
        targets += p[7].split(" -m gpu ", 1)[1].split()
    proc = zygote.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                       *targets], cwd=str(ROOT), capture_output=True, text=True, timeout=120)  # (torch imported once)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"^8 tests collected", proc.stdout, re.M), proc.stdout[-2000:]


def test_first_refuses_what_is_not_a_command_number():
    for args in ((), ("0",), ("7",), ("1", "2"), ("x",)):
        proc = session("--dry-run", "first", *args)
        assert proc.returncode == 2 and "give one command number, 1 to 6" in proc.stderr, args


def gpu_image_env(tmp_path: Path, **extra) -> dict:
    site = tmp_path / "sitecustomize"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    return dict(PYTHONPATH=str(site), BLOCK_MODULES=NOT_ON_THE_GPU_IMAGE, **extra)


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_cpu_smoke_first_1_as_on_the_gpu_image(tmp_path):
    """No git (the carried commit names the files and fills the JSON's "commit"), none of the modules the GPU image
    lacks: the engine parts run, the serving part is skipped with one line, the log holds all that was printed."""
    out, state = tmp_path / "out", tmp_path / "state"
    (state / "carry").mkdir(parents=True)
    (state / "carry" / "commit").write_text("c0ffee1-dirty\n")
    proc = session("--cpu-smoke", "first", "1", out=out,
                   **gpu_image_env(tmp_path, GPU_SESSION_STATE=str(state), GIT_DIR=str(tmp_path / "no-git")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(f.name for f in out.iterdir())
    assert files == ["engine_e2e_cpu_smoke_c0ffee1-dirty.json", "first1_e2e_quick_cpu_smoke_c0ffee1-dirty.log"], files
    assert all(SAFE_NAME.match(f) for f in files) and len(files) <= MAX_FILES_PER_COMMAND
    log = (out / files[1]).read_text()
    assert "commit c0ffee1-dirty (from .gpu_session/carry/commit)" in log
    assert re.search(r"^SKIPPED the gRPC serving part: `moelink serve` cannot import here: import grpc_health", log, re.M)
    assert "--no-serve" in log and "[gpu_session] first 1: exit 0;" in log
    doc = json.loads((out / files[0]).read_text())
    assert doc["commit"] == "c0ffee1-dirty"  # the benchmark found no git: the script wrote the carried commit in
    assert {r["part"] for r in doc["rows"]} == {"startup", "graph", "generate"}  # no serve rows
    assert all(r.get("error") is None for r in doc["rows"]), [r for r in doc["rows"] if r.get("error")]


def test_a_command_that_fails_at_setup_still_leaves_its_log(tmp_path):
    out = tmp_path / "out"
    proc = session("--cpu-smoke", "first", "5", out=out, PYTHON="/bin/false", MOELINK_COMMIT="abc1234")
    assert proc.returncode == 2
    (log,) = out.iterdir()
    assert log.name == "first5_kv_transfer_quick_cpu_smoke_abc1234.log"
    text = log.read_text()
    assert "cannot import moelink.kernels.moe_config" in text and "[gpu_session] first 5: exit 2;" in text


def fake_wheel(dist_name: str, where: Path) -> Path:
    """A wheel of an installed pure-Python distribution, from its own files and RECORD."""
    dist = metadata.distribution(dist_name)
    tag = "py3-none-any"
    name = dist.metadata["Name"].replace("-", "_")
    whl = where / f"{name}-{dist.version}-{tag}.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for f in dist.files:
            p = Path(f.locate())
            if p.is_file() and "__pycache__" not in f.parts and not str(f).startswith(".."):
                z.write(p, str(f))
    return whl


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_serve_deps_installs_the_carried_wheels_where_an_import_fails(tmp_path):
    """grpc_health missing (as on the GPU image) and carried as a wheel: serve_deps installs it under
    .gpu_session/site, puts that first on PYTHONPATH and finds every serving import."""
    state = tmp_path / "state"
    (state / "carry" / "wheels").mkdir(parents=True)
    fake_wheel("grpcio-health-checking", state / "carry" / "wheels")
    # moelink through a shim as the script's (setup writes it; made here the same way), the blocker first.
    shim = tmp_path / "shim" / "moelink"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(f"__path__ = [{str(ROOT)!r}]\n")
    env = gpu_image_env(tmp_path, ALLOW_DIR=str(state / "site"))
    env.update(BLOCK_MODULES="grpc_health", PYTHONPATH=f"{env['PYTHONPATH']}:{tmp_path / 'shim'}")
    harness = f"""
set -uo pipefail
REPO={ROOT}; STATE={state}; PY={sys.executable}; MODE=run
say() {{ echo "[gpu_session] $*"; }}
safe_name() {{ printf '%s' "$1" | tr -c 'A-Za-z0-9._-' '_'; }}
plan_only() {{ :; }}
source "$REPO/benchmarks/gpu_session/carry.sh"
serve_deps
echo "SERVE_OK=$SERVE_OK WHY=$SERVE_WHY"
echo "PYTHONPATH=$PYTHONPATH"
"""
    proc = subprocess.run(["bash", "-c", harness], capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, **env))
    assert "SERVE_OK=1" in proc.stdout, proc.stdout + proc.stderr
    assert "installing the carried wheels into .gpu_session/site" in proc.stdout
    assert f"PYTHONPATH={state / 'site'}:" in proc.stdout
    assert (state / "site" / "grpc_health" / "v1" / "health.py").is_file()


def test_prepare_stamps_the_commit_and_pins_the_serving_wheels(tmp_path):
    proc = session("--dry-run", "prepare")
    assert proc.returncode == 0, proc.stderr
    lock = (ROOT / "requirements" / "lock-gpu.txt").read_text()
    for dist in ("grpcio", "protobuf", "grpcio-health-checking", "grpcio-reflection", "smg-grpc-proto"):
        (pin,) = re.findall(rf"^{re.escape(dist)}==\S+$", lock, re.M)
        assert f" {pin}" in proc.stdout, (pin, proc.stdout)
    assert "--python-version 3.12 --implementation cp" in proc.stdout and "--only-binary=:all:" in proc.stdout
    before = git_commit()
    proc = session("prepare", "--no-wheels", GPU_SESSION_STATE=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "carry" / "commit").read_text().strip() in (before, git_commit())  # (others commit too)
    assert "carry [\".gpu_session/carry\"]" in proc.stdout


def test_doc_gives_the_first_plan_in_order():
    """docs/gpu-sessions.md lists the first plan's commands in the plan's order, each with its budget."""
    text = DOC.read_text()
    rows = ROW.findall(plan_output().split("\nfull plan (", 1)[0])
    at = [text.find(f"OUT=$OUT bash benchmarks/gpu_session.sh {cmd}\n") for _, _, cmd in rows]
    assert all(i >= 0 for i in at) and at == sorted(at), at
    for _, b, cmd in rows:
        assert re.search(rf"`{cmd}`.*\b{b} s\b", text), (cmd, b)
