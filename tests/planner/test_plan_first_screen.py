"""`moelink plan`'s first screen (issue 48): the best setup that fits, with its $/M tokens, comes first; a setup
asked for that does not fit is marked so, and the $/M line belongs to the setup it follows."""
from __future__ import annotations

import pytest

import re

from moelink.planner.hardware import get_profile
from moelink.planner.models import get_model
from moelink.planner.plan import PlanInputs, plan
from moelink.planner.report import format_plan


def _screen(ep: int, batch: int) -> tuple[dict, list[str]]:
    res = plan(PlanInputs(get_model("deepseek-v3"), get_profile("h100-hgx"), ep=ep, batch_per_rank=batch))
    return res, format_plan(res).splitlines()


def test_the_best_setup_that_fits_comes_first_with_its_price():
    res, lines = _screen(8, 128)  # the default: DeepSeek-V3's FP8 weights leave EP 8 no KV for 3000 tokens
    assert res["memory"]["max_batch_per_rank"] < 128
    best, cost = res["best_decode_under_slo"], res["cost"]
    m = re.fullmatch(r"BEST SETUP THAT FITS \(ITL <= 50 ms\): decode EP (\d+) x batch (\d+)/rank, .*prefill EP (\d+), .*",
                     lines[1])
    assert m and (int(m.group(1)), int(m.group(2)), int(m.group(3))) == \
        (best["ep"], best["batch_per_rank"], res["best_prefill"]["ep"])
    assert lines[2].strip().startswith(f"${cost['usd_per_m_output']:.3f} per M output tokens")
    # The setup it beats sits in the sweep as one that fits (a decode row with a batch, a prefill rate).
    row = next(r for r in res["sweep"] if r["ep"] == best["ep"])
    assert row["decode"]["batch_per_rank"] == best["batch_per_rank"] and row["prefill_tokens_per_s_per_gpu"]
    assert lines[3].startswith("the setup asked for (DOES NOT FIT")
    assert any(x.strip().startswith("DOES NOT FIT: batch 128/rank") for x in lines)
    assert any("of the best setup that fits:" in x for x in lines)
    sweep = lines[lines.index(next(x for x in lines if x.startswith("EP sweep:"))) + 1:]
    assert any(x.split("|")[0].strip() == "8" and "does not fit" in x for x in sweep)


def test_a_setup_that_fits_is_not_marked():
    res, lines = _screen(32, 64)
    assert res["memory"]["max_batch_per_rank"] >= 64
    assert lines[3] == "the setup asked for:" and not any("DOES NOT FIT" in x for x in lines)


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_defaults_nobody_asked_for_are_not_headlined_as_not_fitting(capsys):
    """Issue 54 item 10: `moelink plan --hardware all` headlined "the setup asked for (DOES NOT FIT): EP 8, batch
    128/rank" for defaults no one asked for. Without --ep / --batch-per-rank the block details the best setup that
    fits; the headline stays for a setup the user did ask for."""
    from moelink.engine.api import plan_cli

    assert plan_cli.main(["--hardware", "all"]) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT" not in out and "the setup asked for" not in out
    blocks = out.split("BEST SETUP THAT FITS")[1:]
    assert len(blocks) == len(plan_cli.README_HARDWARE)
    for block in blocks:
        m = re.match(r" \(ITL <= 50 ms\): decode EP (\d+) x batch (\d+)/rank", block)
        detail = next(x for x in block.splitlines() if x.startswith("the best setup that fits, in detail"))
        shown = block.splitlines()[block.splitlines().index(detail) + 1]
        assert shown.startswith(f"EP {m.group(1)}, decode batch {m.group(2)}/rank"), shown
    assert plan_cli.main(["--hardware", "h100-hgx", "--batch-per-rank", "128"]) == 0  # asked for: EP 8 by default
    out = capsys.readouterr().out
    assert "the setup asked for (DOES NOT FIT" in out and "EP 8, decode batch 128/rank" in out
