"""benchmarks/host_per_seq.py: its plan and its summary, without running an engine (speed is measured by the
benchmark, never asserted here)."""
from __future__ import annotations

from moelink.benchmarks import host_per_seq


def test_the_dry_run_alternates_the_settings_within_each_repeat_and_size():
    plan = host_per_seq.main(["--seqs", "8", "16", "--tokens", "4", "--repeats", "2", "--baseline", "HEAD",
                              "--dry-run"])["plan"]
    assert plan[:3] == [(0, 8, "baseline", False), (0, 8, "current", False), (0, 8, "current+features", True)]
    assert len(plan) == 2 * 2 * 3 and plan[-1] == (1, 16, "current+features", True)


def test_the_summary_gives_medians_the_fastest_run_and_the_ratios():
    runs = [dict(seqs=8, setting=name, us_per_seq_step=v, cpu_us_per_seq_step=v, host_us_per_seq_step=None,
                 device_us_per_seq_step=None)
            for name, vals in (("baseline", (40.0, 44.0, 90.0)), ("current", (10.0, 12.0, 30.0)),
                               ("current+features", (11.0, 12.0, 13.0))) for v in vals]
    args = host_per_seq.argparse.Namespace(seqs=[8], baseline="HEAD")
    row = host_per_seq._summary(runs, args)["8"]
    assert row["current"]["us_per_seq_step"] == 12.0 and row["current"]["min_us_per_seq_step"] == 10.0
    assert row["baseline_over_current"] == 44.0 / 12.0 and row["baseline_over_current_min"] == 4.0
    assert row["features_over_current"] == 1.0 and row["current"]["host_us_per_seq_step"] is None
