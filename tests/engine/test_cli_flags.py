"""Flags shared by several `moelink` subcommands are spelled the same in each, and a mistyped flag is answered
with the usage of the subcommand it was given to (issue 27, item 10). Parsing only: nothing loads."""
from __future__ import annotations

import pytest

from moelink.engine.api.cli import build_parser, main

# Every subcommand that takes an expert-parallel size, with what else it needs to parse, and where it lands.
EP_SUBCOMMANDS = [(["generate", "m", "--prompt", "x"], "expert_parallel_size"),
                  (["serve", "m"], "expert_parallel_size"),
                  (["plan"], "ep")]


@pytest.mark.parametrize("spelling", ["--expert-parallel-size", "-ep", "--ep"])
@pytest.mark.parametrize("argv,dest", EP_SUBCOMMANDS)
def test_the_expert_parallel_size_has_the_same_flags_on_every_subcommand(argv, dest, spelling):
    # `--ep 2` was "ambiguous option: --ep could match --eplb-interval, ..., --ep-rejoin-delay-s" on serve/generate.
    assert getattr(build_parser().parse_args(argv + [spelling, "2"]), dest) == 2
    assert getattr(build_parser().parse_args(argv + [f"{spelling}=3"]), dest) == 3


def test_the_ep_alias_leaves_the_other_ep_flags_alone():
    ns = build_parser().parse_args(["serve", "m", "--ep", "4", "--ep-rejoin", "--ep-decode-capacity", "8"])
    assert (ns.expert_parallel_size, ns.ep_rejoin, ns.ep_decode_capacity) == (4, True, 8)


@pytest.mark.parametrize("argv", [["serve", "m", "--no-such-flag"], ["generate", "m", "--prompt", "x", "--bogus", "1"],
                                  ["plan", "--nope"]])
def test_an_unknown_flag_shows_the_usage_of_its_subcommand(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    command = argv[0]
    assert err.startswith(f"usage: moelink {command} "), err
    assert f"moelink {command}: error: unrecognized arguments: {' '.join(argv[-2 if argv[-1] == '1' else -1:])}" \
        in err, err
    assert "{generate," not in err  # not the top-level usage, which lists only the subcommands
