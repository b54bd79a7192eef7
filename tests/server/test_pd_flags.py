"""The prefill/decode serving flags and fields, checked without a server: `--role` with the KV flags (validated before
any weights load, each refusal naming the flag; NIXL in place and its hold), and `kv_transfer_params` JSON in vLLM's
shape (bad input named). The served pair is test_pd_serving.py's."""
from __future__ import annotations

import argparse

import pytest

from moelink.engine.api.kv_args import ServerRole, add_role_args, role_from_args
from moelink.engine.server.pd_role import kv_params_from_json


def test_the_flags_spell_the_kv_planes_names_as_it_does():
    """kv_args spells out the transports and the secret's variable (importing the KV plane loads torch, which the
    parser must not): they must be kv_transfer's own."""
    from moelink.engine.api import kv_args
    from moelink.engine.kv_transfer.auth import SECRET_ENV
    from moelink.engine.kv_transfer.transport import KV_TRANSPORTS

    assert kv_args.KV_TRANSPORT_NAMES == tuple(sorted(KV_TRANSPORTS)) and kv_args.SECRET_ENV == SECRET_ENV


def test_cli_roles_are_validated_before_any_weights_load(tmp_path):
    p = argparse.ArgumentParser()
    add_role_args(p)
    assert role_from_args(p.parse_args([]), 1) == ServerRole("both")
    with pytest.raises(ValueError, match="kv_port=None is invalid with role=prefill"):
        role_from_args(p.parse_args(["--role", "prefill"]), 1)
    with pytest.raises(ValueError, match="--kv-port=5600 is invalid with --role decode"):
        role_from_args(p.parse_args(["--role", "decode", "--kv-port", "5600"]), 1)
    with pytest.raises(ValueError, match="advertise_host"):
        role_from_args(p.parse_args(["--role", "prefill", "--kv-port", "5600", "--kv-host", "0.0.0.0"]), 1)
    with pytest.raises(ValueError, match="a KV listener off loopback needs the deployment's KV secret"):
        role_from_args(p.parse_args(["--role", "prefill", "--kv-port", "5600", "--kv-host", "0.0.0.0",
                                     "--kv-advertise-host", "10.0.0.7"]), 4)
    secret = tmp_path / "kv.secret"
    secret.write_text("a-deployment-secret-of-32-chars!")
    secret.chmod(0o600)
    role = role_from_args(p.parse_args(["--role", "prefill", "--kv-port", "5600", "--kv-host", "0.0.0.0",
                                        "--kv-advertise-host", "10.0.0.7", "--kv-secret-file", str(secret)]), 4)
    assert role.kv_role == "kv_producer" and role.kv.num_ranks == 4 and role.kv.reachable_host == "10.0.0.7"
    assert role_from_args(p.parse_args(["--role", "decode"]), 1).connector().kv_role == "kv_consumer"
    held = role_from_args(p.parse_args(["--role", "prefill", "--kv-port", "5600"]), 1).kv
    assert held.nixl_in_place and held.nixl_hold_s == 480.0  # NIXL reads held blocks in place by default
    copied = role_from_args(p.parse_args(["--role", "prefill", "--kv-port", "5600", "--no-kv-nixl-in-place",
                                          "--kv-nixl-hold", "30"]), 1).kv
    assert not copied.nixl_in_place and copied.nixl_hold_s == 30.0
    with pytest.raises(ValueError, match="nixl_hold_s"):
        role_from_args(p.parse_args(["--role", "prefill", "--kv-port", "5600", "--kv-nixl-hold", "-1"]), 1)
    # What held saves may keep out of the pool (issue 53): a quarter of the cache, a sixteenth per client.
    assert (held.nixl_hold_fraction, held.nixl_hold_client_fraction) == (0.25, 0.0625)
    bounded = role_from_args(p.parse_args(["--role", "prefill", "--kv-port", "5600", "--kv-nixl-hold-fraction",
                                           "0.1", "--kv-nixl-hold-client-fraction", "0.05"]), 1).kv
    assert (bounded.nixl_hold_fraction, bounded.nixl_hold_client_fraction) == (0.1, 0.05)
    for flags, match in ((["--kv-nixl-hold-fraction", "1.5"], "nixl_hold_fraction"),
                         (["--kv-nixl-hold-fraction", "0.1", "--kv-nixl-hold-client-fraction", "0.2"],
                          "nixl_hold_client_fraction.*at most nixl_hold_fraction")):
        with pytest.raises(ValueError, match=match):
            role_from_args(p.parse_args(["--role", "prefill", "--kv-port", "5600", *flags]), 1)


def test_kv_params_json_accepts_vllms_shape_and_names_bad_input():
    p = kv_params_from_json('{"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null, '
                            '"remote_block_ids": null, "remote_host": null, "remote_port": null}')
    assert p.do_remote_decode and not p.do_remote_prefill
    for text, match in [("{", "kv_transfer_params_json is not valid JSON"),
                        ("[1]", "must be a JSON object"),
                        ('{"bootstrap_room": 3}', "unknown keys"),
                        ('{"do_remote_prefill": true}', "remote_host"),
                        ("{" + " " * 20000 + "}", "at most 16384")]:
        with pytest.raises(ValueError, match=match):
            kv_params_from_json(text)
