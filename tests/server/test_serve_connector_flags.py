"""`moelink serve` hands the engine the KV connector its flags ask for (engine/server/cli._serve): the offload tiers
alone (--kv-offload-host-bytes on a --role both server) are a connector too, not only a prefill/decode role. The
serve call is replaced by a recorder: no weights load, no port opens."""
from __future__ import annotations

from moelink.engine.api.cli import build_parser
from moelink.engine.kv_transfer.offload import OffloadKVConnector


def _served_args(monkeypatch, *argv):
    import moelink.engine.server.server as server_mod

    seen = {}
    monkeypatch.setattr(server_mod, "serve", lambda args, config: seen.setdefault("args", args) and 0)
    ns = build_parser().parse_args(["serve", "builtin-model", *argv])
    ns.func(ns)
    return seen["args"]


def test_offload_flags_give_the_engine_the_offload_connector(monkeypatch, tmp_path):
    args = _served_args(monkeypatch, "--kv-offload-host-bytes", str(1 << 20), "--kv-offload-disk-bytes",
                        str(4 << 20), "--kv-offload-dir", str(tmp_path))
    assert isinstance(args.kv_connector, OffloadKVConnector)
    assert args.kv_connector.config.host_bytes == 1 << 20 and args.kv_connector.config.disk_bytes == 4 << 20


def test_no_kv_flags_no_connector(monkeypatch):
    assert _served_args(monkeypatch).kv_connector is None


def test_a_tp_prefill_server_names_a_port_per_rank(monkeypatch):
    """`-tp 2` alone is a world of 2 ranks (expert_parallel_size 1): each rank serves KV on --kv-port + rank."""
    args = _served_args(monkeypatch, "--role", "prefill", "--kv-port", "47000", "--kv-transport", "tcp", "-tp", "2")
    assert args.kv_connector.config.num_ranks == 2


def test_offload_flags_under_tp_bind_the_tiers_to_the_tp_layout(monkeypatch):
    """`-tp 2 --kv-offload-host-bytes N`: the engine's config holds the tiers bound to its TP layout (each rank's own
    tiers, reports joined per group: docs/kv-offload.md), one rank's block bytes counted from its kv heads."""
    args = _served_args(monkeypatch, "--kv-offload-host-bytes", str(1 << 20), "-tp", "2")
    config = args.create_engine_config()
    bound = config.kv_connector
    assert isinstance(bound, OffloadKVConnector) and bound.tp_size == 2 and args.kv_connector.tp_size == 1
    bound.configure(config)
    from moelink.engine.config.kv_sizing import kv_cache_bytes_per_block

    assert config.model.attention.num_kv_heads % 2 == 0  # the built-in model's kv heads split over the two ranks
    assert bound.block_bytes * 2 == kv_cache_bytes_per_block(config.model, config.cache.block_size)
