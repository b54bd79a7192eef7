"""`moelink` subcommands from outside engine/ arrive through the `moelink.cli` entry points."""
from __future__ import annotations

import importlib.metadata
import logging

from moelink.engine.api import cli


def test_bench_serve_is_registered_by_its_entry_point():
    names = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=cli.ENTRY_POINT_GROUP)}
    assert names.get("bench-serve") == "moelink.benchmarks.serve_load:register_cli"
    ns = cli.build_parser().parse_args(["bench-serve", "--target", "127.0.0.1:1"])
    from moelink.benchmarks import serve_load

    assert ns.func is serve_load.run_from_args and ns.target == "127.0.0.1:1"


def test_a_plugin_that_fails_to_import_is_left_out_with_a_warning(monkeypatch, caplog):
    broken = importlib.metadata.EntryPoint("broken", "moelink_no_such_module:register_cli", cli.ENTRY_POINT_GROUP)
    real = importlib.metadata.entry_points

    def entry_points(group):
        return [*real(group=group), broken] if group == cli.ENTRY_POINT_GROUP else real(group=group)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    with caplog.at_level(logging.WARNING, logger=cli.__name__):
        parser = cli.build_parser()
    assert parser.parse_args(["plan"]).command == "plan"  # everything else still registered
    assert "'broken' unavailable" in caplog.text and "moelink_no_such_module" in caplog.text
