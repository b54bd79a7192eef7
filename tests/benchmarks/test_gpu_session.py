"""benchmarks/gpu_session.sh on CPU, its plans: every step's command list against its budget (dry runs whose flags
are checked against the benchmarks' --help, printed by one Python process), the refusals, tune's unpack, and the
per-compile budgets against the compile report. The steps' CPU smoke runs are test_gpu_session_smokes.py's;
tune_moe's search guarantees are test_tune_moe_search.py's.

A GPU session is lent for minutes: what it runs is checked here so that it produces numbers, not tracebacks.
"""
from __future__ import annotations

import functools
import io
import json
import re
import subprocess
import sys
import tarfile

import pytest
import torch

from moelink.benchmarks import moe_kernels
from moelink.benchmarks.moe_kernels_fp8 import FP8_SHAPES
from moelink.kernels import moe_config

from tests.helpers import zygote
from tests.helpers.gpu_session import PLAN, SAFE_NAME, SCRIPT, session

DEVICE_TOOL_LIMIT_S = 600
STEP_LINE = re.compile(r"^STEP step=(\S+) total_budget_s=(\d+) limit_s=(\d+)$", re.M)
# Every device command of a session (what `plan` lists), plus the variants.
STEPS = (["preflight", "tests-kernels", "tests-engine", "decode", "decode --quick", "decode --model deepseek-v2-lite",
          "decode --quick --model deepseek-v2-lite", "compile-report"]
         + [f"moe {s}" for s in moe_kernels.SHAPES] + [f"moe {s} --quick" for s in moe_kernels.SHAPES]
         + [f"tune {s}" for s in moe_kernels.SHAPES] + ["tune deepseek-v3 1,64"]
         + ["tests-fp8"] + [f"moe-fp8 {s}" for s in FP8_SHAPES] + [f"moe-fp8 {s} --quick" for s in FP8_SHAPES]
         + [f"tune-fp8 {s}" for s in FP8_SHAPES] + ["tune-fp8 deepseek-v3 4096,16384"]
         + ["moe-mxfp4", "moe-mxfp4 --quick", "moe-nvfp4", "moe-nvfp4 --quick"]
         + ["tune-mxfp4 gpt-oss-20b", "tune-mxfp4 gpt-oss-120b", "tune-mxfp4 gpt-oss-120b 4096"]
         + ["e2e", "e2e --quick", "e2e --dtype fp8", "e2e --serve", "e2e --model deepseek-v2-lite",
            "e2e --model deepseek-v2-lite --dtype fp8", "e2e --serve --model deepseek-v2-lite"]
         + ["mla-fp8-kv", "mla-fp8-kv --quick", "kv-transfer", "kv-transfer --quick", "spec --quick", "hybrid",
            "dsa", "int4", "dsv4", "rl", "lora", "mm"]
         + [f"round3 {n}" for n in range(1, 6)]  # issue 80's table (benchmarks/gpu_session/round3.sh)
         + [f"first {n}" for n in range(1, 7)])  # the first plan (test_gpu_session_first.py)
E2E_MODELS = ("qwen3-30b-a3b", "deepseek-v2-lite")


@functools.lru_cache(maxsize=1)
def constants() -> dict[str, int]:
    text = SCRIPT.read_text()
    c = {k: int(v) for k, v in re.findall(r"^(STEP_BUDGET_S|START_S|LAUNCHER_S)=(\d+)", text, re.M)}
    for k, base in re.findall(r"^(S_PER_\w+)=\$\(\((\d+) \+ LAUNCHER_S\)\)", text, re.M):
        c[k] = int(base) + c["LAUNCHER_S"]
    assert set(c) == {"STEP_BUDGET_S", "START_S", "LAUNCHER_S", "S_PER_GEMM_COMPILE", "S_PER_SLOW_COMPILE", "S_PER_COMPILE"}
    return c


# Every benchmark module the script can start, each one's `--help` printed by one Python process (one torch import
# for all: a process per module cost ~1.3 s of CPU each, ~18 s for the 14 of them).
HELP_ALL = """
import contextlib, io, runpy, sys, warnings
warnings.simplefilter("ignore")
for module in sys.argv[1:]:
    buf = io.StringIO()
    sys.argv = [module, "--help"]
    with contextlib.redirect_stdout(buf):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            if e.code not in (0, None):
                continue
        except Exception:  # (module_help asks it alone, in a process of its own)
            continue
    sys.__stdout__.write(f"=== {module}\\n{buf.getvalue()}")
    sys.__stdout__.flush()
"""


@functools.lru_cache(maxsize=1)
def all_module_help() -> dict[str, str]:
    text = SCRIPT.read_text() + "".join(p.read_text() for p in sorted((SCRIPT.parent / "gpu_session").glob("*.sh")))
    modules = sorted(set(re.findall(r"-m (moelink\.benchmarks\.\w+)", text)))
    # (what it could not print, even if it died part way, module_help asks of the module alone)
    # Forked from the test zygote (torch imported there already: tests/helpers/zygote.py), as `python -c` runs it.
    out = zygote.run([sys.executable, "-c", HELP_ALL, *modules], capture_output=True, text=True, timeout=300,
                     fork_code=True).stdout
    helps = dict(re.findall(r"^=== (\S+)\n(.*?)(?=^=== |\Z)", out, re.M | re.S))
    return {m: h for m, h in helps.items() if "usage:" in h}


@functools.lru_cache(maxsize=8)
def module_help(module: str) -> str:
    helps = all_module_help()
    if module in helps:
        return helps[module]
    return subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                          check=True).stdout


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_every_step_fits_its_budget(step):
    """--dry-run prints each command with its compile counts and budget: the budget is the script's stated
    formula, the step's commands add up to at most STEP_BUDGET_S, which leaves the device tool its margin."""
    c = constants()
    assert c["STEP_BUDGET_S"] + 30 <= DEVICE_TOOL_LIMIT_S
    proc = session("--dry-run", *step.split())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plans = PLAN.findall(proc.stdout)
    assert plans, proc.stdout
    total = 0
    for name, cmd, gemm, slow, other, run_s, budget, command in plans:
        assert name == step.split()[0]
        want = (c["START_S"] + int(gemm) * c["S_PER_GEMM_COMPILE"] + int(slow) * c["S_PER_SLOW_COMPILE"]
                + int(other) * c["S_PER_COMPILE"] + int(run_s))
        assert int(budget) == want, (cmd, budget, want)
        total += int(budget)
        m = re.search(r"-m (moelink\.benchmarks\.\w+|pytest)\b(.*)$", command)
        if m and m[1] != "pytest":  # every flag passed to a benchmark is one its parser takes
            flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", m[2]))
            missing = sorted(f for f in flags if f not in module_help(m[1]))
            assert not missing, f"{step}: passes {missing} to {m[1]}"
        if m and m[1] == "pytest":
            assert "--timeout=" in command or "faulthandler_timeout" in command  # a hang cannot eat the step
    (line,) = STEP_LINE.findall(proc.stdout)
    assert int(line[1]) == total <= int(line[2]) == c["STEP_BUDGET_S"], f"{step}: {total} s budgeted"
    assert "split it" not in proc.stderr


@pytest.mark.parametrize("shape", list(moe_kernels.SHAPES))
def test_moe_step_counts_every_config_it_compiles(shape, monkeypatch):
    """The moe step's GEMM compile count covers the distinct configs moelink picks on an H100 at each token
    count (tuned file, else default.json): up + down + the atomic down per config."""
    monkeypatch.setattr(moe_config, "device_name", lambda d: "NVIDIA_H100_80GB_HBM3")
    E, K, D, I = moe_kernels.SHAPES[shape]
    configs = {moe_config.get_moe_config(E, I, T, K, torch.device("cpu")) for T in moe_kernels.TOKENS}
    (plan,) = PLAN.findall(session("--dry-run", "moe", shape).stdout)
    assert int(plan[2]) >= 3 * len(configs)
    assert f"--shapes {shape} " in plan[7] and f"moe_kernels_cpu_{shape}.json" in plan[7]


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_plan_lists_one_device_command_per_step():
    proc = session("plan")
    assert proc.returncode == 0, proc.stderr
    full = proc.stdout.split("\nfull plan (", 1)[1]  # (the first plan before it: test_gpu_session_first.py)
    rows = re.findall(r"^(.+?)\s+budget\s+(\d+) s\s+OUT=\$OUT bash benchmarks/gpu_session.sh (.+)$", full, re.M)
    assert [r[2] for r in rows] == (["preflight", "tests-kernels", "tests-engine"] + [f"moe {s}" for s in moe_kernels.SHAPES]
                                    + [f"tune {s}" for s in moe_kernels.SHAPES] + ["decode", "tests-fp8"]
                                    + [f"moe-fp8 {s}" for s in FP8_SHAPES] + [f"tune-fp8 {s}" for s in FP8_SHAPES]
                                    + ["moe-mxfp4", "moe-nvfp4", "tune-mxfp4 gpt-oss-20b", "tune-mxfp4 gpt-oss-120b"]
                                    + [f"e2e {v}".replace("M", m) for m in E2E_MODELS
                                       for v in ("--model M", "--model M --dtype fp8", "--serve --model M")]
                                    + ["mla-fp8-kv"] + [f"spec --model {m}" for m in E2E_MODELS] + ["kv-transfer"]
                                    + ["hybrid", "dsa", "int4", "dsv4", "rl", "lora", "mm"]
                                    + [f"round3 {n}" for n in range(1, 6)])
    assert all(int(b) <= constants()["STEP_BUDGET_S"] for _, b, _ in rows)
    assert f"\ntotal {sum(int(b) for _, b, _ in rows)} s" in full


def test_unknown_step_and_shape_are_refused():
    assert session("bogus").returncode == 2
    proc = session("--dry-run", "decode", "--model", "llama")
    assert proc.returncode == 2 and "--model must be" in proc.stderr
    (plan,) = PLAN.findall(session("--dry-run", "decode", "--model", "deepseek-v2-lite").stdout)
    assert "--model deepseek-v2-lite --graphs" in plan[7] and "_deepseek-v2-lite.json" in plan[7]
    proc = session("--dry-run", "moe", "qwen3")
    assert proc.returncode == 2 and "SHAPE must be one of" in proc.stderr
    for bad, msg in ((("--model", "llama"), "--model must be one of"), (("--dtype", "fp4"), "--dtype must be"),
                     (("--bogus",), "unknown argument")):
        proc = session("--dry-run", "e2e", *bad)
        assert proc.returncode == 2 and msg in proc.stderr, proc.stderr
    proc = session("--dry-run", "mla-fp8-kv", "--model", "llama")
    assert proc.returncode == 2 and "unknown argument" in proc.stderr


@pytest.mark.parametrize("args, name, flags, out", [
    ("e2e", "engine_e2e_qwen3-30b-a3b_bf16", "--no-serve --models qwen3-30b-a3b --dtypes bf16",
     "engine_e2e_cpu_qwen3-30b-a3b_bf16.json"),
    ("e2e --model deepseek-v2-lite --dtype fp8", "engine_e2e_deepseek-v2-lite_fp8",
     "--no-serve --models deepseek-v2-lite --dtypes fp8", "engine_e2e_cpu_deepseek-v2-lite_fp8.json"),
    ("e2e --serve", "engine_e2e_serve_qwen3-30b-a3b", "--serve-only --models qwen3-30b-a3b --dtypes bf16",
     "engine_e2e_cpu_qwen3-30b-a3b_bf16_serve.json"),
    ("e2e --quick", "engine_e2e_quick", "--quick --models qwen3-30b-a3b", "engine_e2e_cpu_quick.json"),
])
def test_e2e_step_runs_one_part_per_command_and_stops_starting_points_in_time(args, name, flags, out):
    """One device command per (model, dtype) or serving part, each a file of its own under $OUT; the benchmark
    starts no point in the last 120 s of the command's budget, so its JSON is written before `timeout` stops it.
    A serving part first checks what `moelink serve` imports (its own budget line)."""
    plans = PLAN.findall(session("--dry-run", *args.split()).stdout)
    assert [p[1] for p in plans[:-1]] == (["serve_deps"] if "--quick" in args or "--serve" in args else [])
    plan = plans[-1]
    assert plan[1] == name and f"-m moelink.benchmarks.engine_e2e {flags} " in plan[7], plan
    budget = int(re.search(r"--time-budget-s (\d+)", plan[7])[1])
    assert budget == int(plan[6]) - 120
    assert plan[7].endswith(f"--out benchmarks/results/{out}") and SAFE_NAME.match(out)


def test_tune_fp8_step_is_budgeted_as_tune_and_tunes_one_fp8_shape():
    """tune-fp8 runs tune_moe --dtype fp8 for one FP8 shape under the same budget as tune (the tuner's --budget-s
    plus its tail): the reference, the bf16 comparison and the weights' quantization are inside --budget-s."""
    (tune,) = PLAN.findall(session("--dry-run", "tune", "deepseek-v3").stdout)
    for shape in FP8_SHAPES:
        (plan,) = PLAN.findall(session("--dry-run", "tune-fp8", shape, "4096,16384").stdout)
        assert plan[1] == f"tune_moe_fp8_{shape}" and plan[2:7] == tune[2:7]
        assert f"-m moelink.benchmarks.tune_moe --dtype fp8 --shapes {shape} --tokens 4096,16384 " in plan[7]
        budget = re.search(r"--budget-s (\d+)", tune[7])[1]
        assert f"--budget-s {budget} " in plan[7]
        assert plan[7].endswith("/.gpu_session/tuned_fp8")
    (plan,) = PLAN.findall(session("--dry-run", "tune-fp8", "qwen3-30b-a3b").stdout)
    assert "--tokens" not in plan[7]  # every bucket by default: a tuned file replaces the defaults at every size
    for bad in ("mixtral-8x7b", ""):
        proc = session("--dry-run", "tune-fp8", *([bad] if bad else []))
        assert proc.returncode == 2 and "SHAPE must be one of deepseek-v3 qwen3-30b-a3b" in proc.stderr


def test_tune_mxfp4_step_is_budgeted_as_tune_and_tunes_one_gpt_oss_shape_where_dequant_is_decided():
    """tune-mxfp4 runs tune_moe --dtype mxfp4 for one gpt-oss shape under tune's budget (the tuner's --budget-s plus
    its tail), by default at 1,024 and 4,096 tokens (issue 80's MXFP4 row: per-tile against dequantize-once), into
    its own stage directory."""
    (tune,) = PLAN.findall(session("--dry-run", "tune", "deepseek-v3").stdout)
    budget = re.search(r"--budget-s (\d+)", tune[7])[1]
    for shape in ("gpt-oss-20b", "gpt-oss-120b"):
        (plan,) = PLAN.findall(session("--dry-run", "tune-mxfp4", shape).stdout)
        assert plan[1] == f"tune_moe_mxfp4_{shape}" and plan[2:7] == tune[2:7]
        assert f"-m moelink.benchmarks.tune_moe --dtype mxfp4 --shapes {shape} --tokens 1024,4096 " in plan[7]
        assert f"--budget-s {budget} " in plan[7]
        assert plan[7].endswith("/.gpu_session/tuned_mxfp4")
    (plan,) = PLAN.findall(session("--dry-run", "tune-mxfp4", "gpt-oss-120b", "4096").stdout)
    assert "--tokens 4096 " in plan[7]
    for bad in ("qwen3-30b-a3b", ""):
        proc = session("--dry-run", "tune-mxfp4", *([bad] if bad else []))
        assert proc.returncode == 2 and "SHAPE must be one of gpt-oss-20b gpt-oss-120b" in proc.stderr


def test_tuned_file_names_bf16_fp8_and_mxfp4():
    from moelink.kernels.triton_moe_mxfp4 import mxfp4_config_file_name

    ok = moe_config.tuned_file_name_ok
    assert ok("E=256,N=2048,device_name=NVIDIA_H100_80GB_HBM3.json")
    assert ok("fp8_w8a8,E=256,N=2048,device_name=NVIDIA_H100_80GB_HBM3.json")
    assert ok(mxfp4_config_file_name(32, 2880, "NVIDIA_H200")) and not ok("mxfp4,fp8_w8a8,E=8,N=32,device_name=x.json")
    for bad in ("fp8_E=8,N=32,device_name=x.json", "fp8_w8a8,E=8,N=32,device_name=a/b.json", "int8_w8a8,E=8,N=32,"
                "device_name=x.json", "fp8_w8a8,fp8_w8a8,E=8,N=32,device_name=x.json", "default.json"):
        assert not ok(bad), bad


def test_mla_fp8_kv_step_compares_the_caches_in_two_commands():
    """The fp8-vs-bf16 MLA KV step (issue 27): the kernel part and the end-to-end part, one command each, each
    writing its own file under $OUT (the end-to-end one within its budget even on the full workload)."""
    plans = PLAN.findall(session("--dry-run", "mla-fp8-kv").stdout)
    assert [p[1] for p in plans] == ["mla_fp8_kv_kernel", "mla_fp8_kv_e2e"]
    assert "-m moelink.benchmarks.mla_fp8_kv --parts kernel " in plans[0][7]
    assert "-m moelink.benchmarks.mla_fp8_kv --parts e2e " in plans[1][7] and "--quick" not in plans[1][7]
    for p, out in zip(plans, ("mla_fp8_kv_cpu_kernel.json", "mla_fp8_kv_cpu_e2e.json")):
        assert p[7].endswith(f"--out benchmarks/results/{out}") and SAFE_NAME.match(out)
    (quick,) = [p for p in PLAN.findall(session("--dry-run", "mla-fp8-kv", "--quick").stdout) if "e2e" in p[1]]
    assert "--parts e2e --quick " in quick[7] and quick[7].endswith("mla_fp8_kv_cpu_e2e_quick.json")


@pytest.mark.parametrize("member", ["../evil.json", "notes.txt", "E=8,N=32,device_name=a/b.json",
                                    "fp8_w8a8,E=8,N=32,device_name=a/b.json", "../fp8_w8a8,E=8,N=32,device_name=x.json"])
def test_unpack_refuses_what_is_not_a_tuned_config(tmp_path, member):
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tf:
        data = b'{"key": "tokens", "configs": {}}'
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    dest = tmp_path / "dest"
    dest.mkdir()
    proc = session("unpack", str(bad), UNPACK_DEST=str(dest))
    assert proc.returncode == 2 and "refused" in proc.stderr
    assert not list(dest.iterdir()) and not (tmp_path / "evil.json").exists()


def test_per_compile_costs_cover_the_compile_report():
    """Against the cold compiles of the committed sm_90 compile report (benchmarks/results/compile_report_sm90.json),
    per kernel class: the script's per-compile seconds less the launcher are at least twice the mean (a sum of many
    compiles, on a CPU up to 2x slower), and with the launcher at least the slowest single compile."""
    from moelink.benchmarks import compile_report

    rep = json.loads((compile_report.RESULTS / "compile_report_sm90.json").read_text())
    times: dict[str, list[float]] = {"gemm": [], "slow": [], "other": []}
    for k in rep["kernels"]:
        fp32 = any("float32" in c or "fp32" in c for c in k["cases"])
        if (k["name"] in compile_report.ATTN_DOT_KERNELS and fp32) or k["name"] in compile_report.SLOW_OTHER_KERNELS:
            cls = "slow"  # fp32 attention: FMA loops, the longest compiles (and DSA's radix top-k)
        elif k["name"] in compile_report.GEMM_KERNELS + compile_report.ATTN_DOT_KERNELS + compile_report.FP8_GEMM_KERNELS:
            cls = "gemm"
        else:
            cls = "other"
        times[cls].append(k["compile_s"])
    c = constants()
    for cls, key in (("gemm", "S_PER_GEMM_COMPILE"), ("slow", "S_PER_SLOW_COMPILE"), ("other", "S_PER_COMPILE")):
        assert times[cls], f"no {cls} kernel in the report"
        mean = sum(times[cls]) / len(times[cls])
        assert c[key] - c["LAUNCHER_S"] >= 2 * mean, (cls, mean)
        assert c[key] >= max(times[cls]), (cls, max(times[cls]))


def test_round3_names_each_row_result_by_device_and_commit_and_refuses_other_numbers():
    """Issue 80's plan: five commands; each result named <benchmark>_<device>_<commit>_round3_..., the decode
    command with the tiny GEMVs on (and their GPU tests after it), the large-batch one on every shape (no --shapes:
    the min over all of them), the MXFP4 row at both gpt-oss shapes (-120b at 1,024 tokens, the row's 0.66x), the FP8
    tiny GEMVs' GPU tests after it, and after the prefill the FP8 checkpoint's decode graph step."""
    cmds = {n: [p[7] for p in PLAN.findall(session("--dry-run", "round3", str(n)).stdout)] for n in range(1, 6)}
    assert [len(c) for c in cmds.values()] == [4, 2, 2, 3, 2]
    assert "engine_decode --fp8 --graphs" in cmds[5][1] and "--kernel-times" in cmds[5][1]
    assert "--shapes gpt-oss-20b" in cmds[4][0] and "1024" in cmds[4][0]
    assert "--shapes gpt-oss-120b" in cmds[4][1] and "--tokens 1024,4096" in cmds[4][1]
    assert "test_triton_fp8_gpu.py::test_fused_moe_fp8_tiny_at_model_shapes" in cmds[4][2]
    assert all(re.search(r"_cpu_\S+_round3", c) for cs in cmds.values() for c in cs if "-m pytest" not in c)
    assert "tests/kernels/test_triton_moe_tiny_gpu.py" in cmds[1][3]  # the rebuilt GEMVs checked on the GPU too
    assert "--tiny-max-pairs 64" in cmds[1][2] and "--batches 1,4,256" in cmds[1][2] and "--kernel-times" in cmds[1][2]
    assert "--shapes" not in cmds[2][0] and "--tokens 4096,16384" in cmds[2][0]
    for bad in ([], ["0"], ["6"], ["1", "2"]):
        proc = session("--dry-run", "round3", *bad)
        assert proc.returncode == 2 and "round3: give one command number" in proc.stderr
