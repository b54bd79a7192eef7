"""Every flag of `vllm serve --help` (vLLM 0.33.0) on `moelink serve` (issue 54 items 2 and 4): the table of
engine/api/vllm_flag_table.py covers each spelling of vLLM's parser (tests/engine/vllm_serve_flags_0.33.0.txt), each
row is parsed by `moelink serve`'s parser and does what it says (accepted, mapped onto the moelink flags named, or
refused in exactly one line naming the flag), docs/vllm-compat.md prints the tables as they are, vLLM's KV
connectors map onto moelink's transports, and `moelink serve --help` imports no torch. Parsing only."""
from __future__ import annotations

import functools
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from moelink.engine.api.cli import build_parser
from moelink.engine.api.vllm_flag_table import (EARLIER_VLLM_FLAGS, VLLM_RELEASE, VLLM_SERVE_FLAGS, VllmFlag,
                                                markdown_table)
from moelink.engine.api.vllm_flags import _Refused, apply_vllm_engine_flags, human_int
from moelink.engine.server.gateway.options import gateway_args
from moelink.engine.api.vllm_kv_config import (CONNECTORS, NIXL_HOST_ENV, NIXL_PORT_ENV, OFFLOAD,
                                               apply_kv_transfer_config, connector_table)
from moelink.engine.server.limits import limits_from

ROOT = Path(__file__).resolve().parents[2]
VLLM_HELP = Path(__file__).with_name(f"vllm_serve_flags_{VLLM_RELEASE}.txt")
PAGE = ROOT / "docs" / "vllm-compat.md"
ALL = {**VLLM_SERVE_FLAGS, **EARLIER_VLLM_FLAGS}


@pytest.fixture(autouse=True)
def _no_nixl_env(monkeypatch):
    monkeypatch.delenv(NIXL_PORT_ENV, raising=False)
    monkeypatch.delenv(NIXL_HOST_ENV, raising=False)


@functools.cache
def _parser():
    """`moelink serve`'s parser, built once for the module's 500 parses (argparse keeps no state between parses;
    building it is most of a parse's cost)."""
    return build_parser("serve")


def serve_parser():
    return _parser()._subparsers._group_actions[0].choices["serve"]


def parse(words: list[str]):
    """`moelink serve MODEL <words>` as `_serve` reads it before anything loads."""
    ns = _parser().parse_args(["serve", "MODEL", *words])
    apply_kv_transfer_config(ns)
    apply_vllm_engine_flags(ns)
    ns.gateway_args = gateway_args(ns)
    ns.max_logprobs = limits_from(ns).max_logprobs
    return ns


def spelled(key: tuple[str, ...], flag: VllmFlag, spelling: str) -> list[str]:
    """The row's example with `spelling` for the row's first spelling (its first spelling alone when none)."""
    words = shlex.split(flag.example) if flag.example else [key[0]]
    return [spelling if w == key[0] else w for w in words]


def one_line_refusal(words: list[str], capsys) -> str:
    """The parse of `words` stops with one line (an argparse exit or a ValueError), which is returned."""
    with pytest.raises((SystemExit, ValueError)) as exc:
        parse(words)
    if exc.type is ValueError:
        message = str(exc.value)
        assert "\n" not in message, message
        return message
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith("moelink serve: error: "), err
    return err


def vllm_spellings() -> list[list[str]]:
    return [line.split() for line in VLLM_HELP.read_text().splitlines() if line and not line.startswith("#")]


ROWS = [(key, f, s) for key, f in ALL.items() for s in key]


def test_the_table_covers_every_flag_of_vllm_serve_help():
    help_flags = [s for action in vllm_spellings() for s in action]
    table = [s for key in VLLM_SERVE_FLAGS for s in key]
    assert len(help_flags) == len(set(help_flags)) == 433
    assert sorted(table) == sorted(help_flags)  # each spelling once, none left out, none made up
    assert not set(table) & {s for key in EARLIER_VLLM_FLAGS for s in key}
    for action in vllm_spellings():  # an action's spellings are in one row unless the row says each apart
        rows = {next(k for k in VLLM_SERVE_FLAGS if s in k) for s in action}
        assert len(rows) == 1 or all(len(k) == 1 for k in rows), action
    for key, f in ALL.items():
        assert f.kind in ("accepted", "mapped", "refused") and f.says and "\n" not in f.says, key
        assert (f.kind == "mapped") == bool(f.same_as), key
        assert not f.values or f.kind == "accepted", key


@pytest.mark.parametrize("key,flag,spelling", [r for r in ROWS if r[1].kind == "refused"], ids=lambda v: str(v))
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_a_refused_flag_stops_in_one_line_saying_what_to_use(key, flag, spelling, capsys):
    message = one_line_refusal([spelling], capsys)
    assert spelling in message and flag.says in message, message
    if any(isinstance(a, _Refused) for a in serve_parser()._actions if spelling in a.option_strings):
        one_line_refusal([spelling, "4"], capsys)  # with a value, as a script writes it


@pytest.mark.parametrize("key,flag,spelling", [r for r in ROWS if r[1].kind == "accepted"], ids=lambda v: str(v))
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_an_accepted_flag_parses(key, flag, spelling, capsys):
    (action,) = [a for a in serve_parser()._actions if spelling in a.option_strings]
    assert not isinstance(action, _Refused)
    parse(spelled(key, flag, spelling))
    if flag.values:  # a value it does not take is refused in one line naming the flag and what it takes
        message = one_line_refusal([spelling, "not-a-value"], capsys)
        assert spelling in message and all(v in message for v in flag.values), message


@pytest.mark.parametrize("key,flag,spelling", [r for r in ROWS if r[1].kind == "mapped"], ids=lambda v: str(v))
def test_a_mapped_flag_parses_as_the_moelink_flags_it_names(key, flag, spelling):
    base, theirs, ours = parse([]), parse(spelled(key, flag, spelling)), parse(shlex.split(flag.same_as))
    changed = {k: v for k, v in vars(ours).items() if getattr(base, k, None) != v}
    assert changed, flag.same_as  # the moelink spelling does something
    assert {k: getattr(theirs, k, None) for k in changed} == changed


def test_the_docs_print_the_tables_as_they_are():
    text = PAGE.read_text()
    for marker, table in (("vllm-serve-flags", markdown_table(VLLM_SERVE_FLAGS)),
                          ("vllm-earlier-flags", markdown_table(EARLIER_VLLM_FLAGS)),
                          ("kv-connectors", connector_table())):
        begin, end = f"<!-- {marker} -->\n", f"\n<!-- /{marker} -->"
        assert text[text.index(begin) + len(begin):text.index(end)] == table, (
            f"docs/vllm-compat.md's {marker} table is not the code's: render it with "
            "engine/api/vllm_flag_table.markdown_table / vllm_kv_config.connector_table")
    assert f"## Every flag of `vllm serve` {VLLM_RELEASE}" in text


# -- issue 54 item 2: vLLM's PD launch line ---------------------------------------------------------------------
NIXL_BOTH = '{"kv_connector":"NixlConnector","kv_role":"kv_both"}'


def test_vllms_nixl_launch_line_serves_pd_over_nixl(monkeypatch):
    ns = parse(["--kv-transfer-config", NIXL_BOTH])
    assert (ns.role, ns.kv_transport, ns.kv_port, ns.kv_host) == ("both", "nixl", 5600, "127.0.0.1")
    monkeypatch.setenv(NIXL_PORT_ENV, "5611")  # vLLM's side channel, as its docs set it per instance
    monkeypatch.setenv(NIXL_HOST_ENV, "127.0.0.2")
    ns = parse(["--kv-transfer-config", NIXL_BOTH])
    assert (ns.kv_port, ns.kv_host) == (5611, "127.0.0.2")


@pytest.mark.parametrize("kv_role,role", [("kv_producer", "prefill"), ("kv_consumer", "decode"), ("kv_both", "both")])
@pytest.mark.parametrize("connector", [n for n, (t, _) in CONNECTORS.items() if t and t != OFFLOAD
                                       and n not in ("MoelinkConnector", "MultiConnector")])
def test_each_pd_connector_is_its_transport_and_kv_role_is_the_role(connector, kv_role, role):
    ns = parse(["--kv-transfer-config", f'{{"kv_connector":"{connector}","kv_role":"{kv_role}"}}'])
    assert (ns.role, ns.kv_transport) == (role, CONNECTORS[connector][0])
    assert (ns.kv_port is None) == (role == "decode")  # a decode server serves nothing


@pytest.mark.parametrize("connector", [n for n, (t, _) in CONNECTORS.items() if t is None])
def test_a_connector_without_a_moelink_equivalent_is_refused_saying_what_to_use(connector):
    with pytest.raises(ValueError) as exc:
        parse(["--kv-transfer-config", f'{{"kv_connector":"{connector}","kv_role":"kv_both"}}'])
    message = str(exc.value)
    assert message.startswith(f"--kv-transfer-config: kv_connector='{connector}' is not supported by moelink: ")
    assert CONNECTORS[connector][1] in message and "\n" not in message


def test_a_connector_vllm_does_not_name_lists_the_ones_moelink_takes():
    with pytest.raises(ValueError, match=r"kv_connector='Nope' is not supported: moelink takes MoelinkConnector, "
                                         r"NixlConnector, .*OffloadingConnector"):
        parse(["--kv-transfer-config", '{"kv_connector":"Nope","kv_role":"kv_both"}'])


def test_nixl_options_and_disagreements():
    cfg = ('{"kv_connector":"NixlConnector","kv_role":"kv_producer","kv_port":7000,"kv_buffer_device":"cpu",'
           '"kv_load_failure_policy":"recompute","kv_connector_extra_config":{"backends":["UCX"],"ttl":30}}')
    ns = parse(["--kv-transfer-config", cfg])
    assert (ns.role, ns.kv_port, ns.kv_nixl_in_place, ns.kv_ttl) == ("prefill", 7000, False, 30)
    for words, match in (
            (["--kv-transport", "tcp"], "moves KV over nixl and --kv-transport tcp disagrees"),
            (["--kv-transfer-config", NIXL_BOTH.replace("}", ',"kv_load_failure_policy":"fail"}')],
             "kv_load_failure_policy='fail' is not supported"),
            (["--kv-transfer-config", NIXL_BOTH.replace("}", ',"kv_connector_extra_config":{"backends":["GDS"]}}')],
             r"backends=\['GDS'\] is not supported: moelink's NIXL transport runs UCX")):
        with pytest.raises(ValueError, match=match):
            parse(words + (["--kv-transfer-config", NIXL_BOTH] if words[0] == "--kv-transport" else []))


def test_offloading_connectors_are_the_host_tier_per_rank():
    cfg = ('{"kv_connector":"OffloadingConnector","kv_role":"kv_both","kv_connector_extra_config":'
           '{"cpu_bytes_to_use":8589934592}}')
    assert parse(["--kv-transfer-config", cfg]).kv_offload_host_bytes == 8 << 30
    assert parse(["--kv-transfer-config", cfg, "-tp", "2"]).kv_offload_host_bytes == 4 << 30  # over the TP group
    assert parse(["--kv-offloading-size", "1.5"]).kv_offload_host_bytes == 3 << 29
    with pytest.raises(ValueError, match="disagree"):
        parse(["--kv-offloading-size", "1", "--kv-offload-host-bytes", "5"])
    with pytest.raises(ValueError, match="needs kv_connector_extra_config.cpu_bytes_to_use"):
        parse(["--kv-transfer-config", '{"kv_connector":"OffloadingConnector","kv_role":"kv_both"}'])
    with pytest.raises(ValueError, match="kv_connector_extra_config.block_size is not supported"):
        parse(["--kv-transfer-config", cfg.replace("{\"cpu", "{\"block_size\":64,\"cpu")])


def test_a_multi_connector_maps_each_of_its_connectors():
    cfg = ('{"kv_connector":"MultiConnector","kv_role":"kv_consumer","kv_connector_extra_config":{"connectors":['
           '{"kv_connector":"NixlConnector"},{"kv_connector":"OffloadingConnector","kv_connector_extra_config":'
           '{"cpu_bytes_to_use":1024}}]}}')
    ns = parse(["--kv-transfer-config", cfg])
    assert (ns.role, ns.kv_transport, ns.kv_port, ns.kv_offload_host_bytes) == ("decode", "nixl", None, 1024)
    two = cfg.replace('{"kv_connector":"OffloadingConnector"', '{"kv_connector":"P2pNcclConnector"').replace(
        ',"kv_connector_extra_config":{"cpu_bytes_to_use":1024}', "")
    with pytest.raises(ValueError, match="a second prefill/decode connector"):
        parse(["--kv-transfer-config", two])
    with pytest.raises(ValueError, match=r"connectors\[1\]: kv_connector='LMCacheConnectorV1' is not supported"):
        parse(["--kv-transfer-config", cfg.replace("OffloadingConnector", "LMCacheConnectorV1")])


# -- issue 54 item 4: the flags a vLLM user tripped on ----------------------------------------------------------
@pytest.mark.parametrize("words,field,value", [
    (["--enable-eplb"], "eplb_interval", 3000),
    (["--enable-eplb", "--eplb-config", '{"step_interval": 100}'], "eplb_interval", 100),
    (["--enable-dbo"], "enable_two_batch_overlap", True),
    (["--disable-log-stats"], "vllm_disable_log_stats", True),
    (["--max-log-len", "100"], "max_log_len", 100),
    (["--enable-log-requests"], "disable_log_requests", False),
    (["--uvicorn-log-level", "debug"], "uvicorn_log_level", "debug"),  # the HTTP front's level (engine/server/cli.py)
    (["--lora-dtype", "bfloat16", "--dtype", "bfloat16"], "lora_dtype", "bfloat16"),
])
def test_item_4_flags_that_work_with_vllms_meaning(words, field, value):
    assert getattr(parse(words), field) == value


@pytest.mark.parametrize("words,flag,instead", [
    (["--all2all-backend", "deepep_low_latency"], "--all2all-backend", "--all-to-all"),
    (["--uvicorn-log-level", "verbose"], "--uvicorn-log-level", "critical"),
    (["--enable-uvicorn-access-log"], "--enable-uvicorn-access-log", "no access lines"),
    (["--lora-dtype", "float16", "--dtype", "bfloat16"], "--lora-dtype", "auto"),
    (["--kv-events-config", "{}"], "--kv-events-config", "cache-aware routing"),
    (["--override-generation-config", '{"temperature": 0.5}'], "--override-generation-config", "per request"),
    (["--enable-force-include-usage"], "--enable-force-include-usage", "stream_options.include_usage"),
    (["--swap-space", "4"], "--swap-space", "--kv-offload-host-bytes"),
    (["--enable-eplb", "--eplb-config", '{"window_size": 10}'], "--eplb-config", "step_interval"),
])
def test_item_4_flags_refused_in_one_line_saying_what_to_use(words, flag, instead, capsys):
    message = one_line_refusal(words, capsys)
    assert flag in message and instead in message, message


def test_a_refused_flag_answers_through_main_in_one_line(capsys):
    from moelink.engine.api.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "MODEL", "--swap-space", "4"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "--kv-offload-host-bytes" in err, err


def test_a_bad_value_of_a_known_flag_is_one_line_an_unknown_flag_gets_the_usage(capsys):
    with pytest.raises(SystemExit):
        parse(["--kv-cache-dtype", "fp8_e5m2"])
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit):
        parse(["--no-such-flag"])
    assert capsys.readouterr().err.startswith("usage: moelink serve ")


def test_dash_ep_is_vllms_enable_expert_parallel_bare_and_moelinks_size_with_a_number(capsys):
    assert parse(["-dp", "4", "-ep"]).expert_parallel_size == 4
    assert parse(["-ep", "2"]).expert_parallel_size == 2
    assert parse(["-ep=3"]).expert_parallel_size == 3
    assert one_line_refusal(["-ep", "x"], capsys) == "moelink serve: error: argument -ep: invalid int value: 'x'\n"


def test_vllm_sizes_read_as_vllm_reads_them(capsys):
    assert [human_int(v) for v in ("4096", "1k", "1K", "25.6k", "2M", "1g")] == [4096, 1000, 1024, 25600, 2 << 20,
                                                                                  10**9]
    assert parse(["--max-model-len", "32k", "--max-num-batched-tokens", "2K"]).max_model_len == 32000
    for bad in ("1.5K", "k", "-5"):
        one_line_refusal(["--max-num-batched-tokens", bad], capsys)
    assert "--max-model-len auto" in one_line_refusal(["--max-model-len", "auto"], capsys)


def test_spec_shorthands_and_the_json_are_one_or_the_other():
    with pytest.raises(ValueError, match="give one of them"):
        parse(["--spec-tokens", "2", "--speculative-config", "{}"])


# -- `moelink serve --help` without torch ------------------------------------------------------------------------
HEAVY = ("torch", "numpy", "ray", "transformers", "triton", "safetensors")


@pytest.mark.parametrize("argv", [["serve", "--help"], ["serve", "MODEL", "--swap-space", "4"],
                                  ["serve", "MODEL", "--max-model-len", "x"],
                                  ["serve", "MODEL", "--generation-config", "./dir"],
                                  ["serve", "MODEL", "--kv-transfer-config", '{"kv_connector": "LMCacheConnectorV1", '
                                                                             '"kv_role": "kv_both"}']])
def test_the_serve_parser_imports_no_torch(argv):
    """A fresh interpreter runs the `moelink` entry point on `argv` (help, a refused flag or value) and lists the
    heavy modules it imported: none (`moelink serve --help` took 5-8 s importing torch; a refusal as long)."""
    code = ("import sys\nfrom moelink.engine.api.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
            f"    pass\nprint('IMPORTED', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "IMPORTED []" in out.stdout, (out.stdout[-2000:], out.stderr[-2000:])
