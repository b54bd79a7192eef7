"""`moelink serve --role prefill|decode` with the KV plane's security settings (docs/security-kv.md), as an attacker
on loopback meets them: a prefill server refuses to listen off loopback without a deployment secret (before any
weights load); a decode server says at startup whom it loads from and refuses, over gRPC, a request naming any
other KV source (INVALID_ARGUMENT naming the field: no connection made, High 2 / Medium 3); a KV client without
the secret is refused at the handshake (High 1); a forged capability gets nothing and the request is recomputed
token-identically; a real handoff with the secret still loads the whole prompt.
"""
from __future__ import annotations

import json
import socket
import sys

import grpc
import pytest

from moelink.engine import LLM, SamplingParams
from moelink.engine.kv_transfer.wire import Deadline, KVFetchError

from tests.helpers.grpc_server import ENGINE_FLAGS, ServerProcess, make_stubs
from tests.helpers.kv_params import CAP, SECRET
from tests.helpers import zygote
from tests.helpers.net import free_port

PROMPT_IDS = list(range(7, 60))
GREEDY = dict(temperature=0.0, max_tokens=6, ignore_eos=True)


def _secret_file(tmp_path, mode=0o600):
    f = tmp_path / "kv.secret"
    f.write_bytes(SECRET)
    f.chmod(mode)
    return str(f)


REFUSALS = [
    (["--kv-host", "10.0.0.5"], "a KV listener off loopback needs the deployment's KV secret"),
    (["--kv-host", "0.0.0.0", "--kv-advertise-host", "10.0.0.5"], "--kv-secret-file"),
    (["--kv-secret-file", "{world}"], "lets other users read or change it"),
]

# `moelink serve`'s own main, each case in turn in one process started for them (a process of its own each paid
# ~2 s of CPU for its imports): it prints "RESULT <exit status> <stderr and stdout as JSON>" per case. A case
# that starts serving instead of refusing never prints its line (the fixture's timeout fails them).
_REFUSE = """
import contextlib, io, json, sys
from moelink.engine.api.cli import main
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code
    print("RESULT", json.dumps([rc, out.getvalue()]), flush=True)
"""


@pytest.fixture(scope="module")
def refusals(tiny_model, tmp_path_factory):
    """[(exit status, output)] of `moelink serve --role prefill` with each of REFUSALS' flags."""
    world = _secret_file(tmp_path_factory.mktemp("kv-world"), 0o644)
    argvs = [["serve", tiny_model("qwen3_e6k3"), "--role", "prefill", "--kv-port", str(free_port()), "--port", "0",
              "--no-http", *ENGINE_FLAGS, *[world if f == "{world}" else f for f in flags]] for flags, _ in REFUSALS]
    # One process for all (each refuses before its engine starts), forked by the test zygote with `moelink`'s CLI
    # modules imported (tests/helpers/zygote.py), as `moelink serve` runs them.
    out = zygote.run([sys.executable, "-c", _REFUSE, json.dumps(argvs)], capture_output=True, text=True, timeout=180,
                     fork_code=True)
    results = [json.loads(line[len("RESULT "):]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == len(REFUSALS), out.stdout[-2000:] + out.stderr[-2000:]
    return results


@pytest.mark.parametrize("case", range(len(REFUSALS)), ids=["off-loopback", "advertised-off-loopback", "world"])
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_a_prefill_server_refuses_to_start_without_what_its_listener_needs(refusals, case):
    rc, output = refusals[case]
    assert rc != 0 and REFUSALS[case][1] in output, output[-2000:]


@pytest.fixture(scope="module")
def pd(tiny_model, tmp_path_factory):
    """(prefill, decode, prefill stubs, decode stubs, the prefill's KV port), both with the secret."""
    model = tiny_model("qwen3_e6k3")
    secret = _secret_file(tmp_path_factory.mktemp("kv"))
    kv_port = free_port()
    common = ENGINE_FLAGS + ["--served-model-name", "tiny-moe", "--kv-secret-file", secret]
    pre = ServerProcess(model, common + ["--role", "prefill", "--kv-port", str(kv_port)])
    dec = ServerProcess(model, common + ["--role", "decode", "--kv-peers", f"127.0.0.1:{kv_port}",
                                         "--kv-first-byte-timeout", "2"])
    chans = [grpc.insecure_channel(s.addr) for s in (pre, dec)]
    try:
        yield pre, dec, make_stubs(chans[0]), make_stubs(chans[1]), kv_port
    finally:
        for ch in chans:
            ch.close()
        for srv in (pre, dec):
            srv.stop()
            srv.close()


def _generate(stubs, ids, kv_json=None, **params):
    vpb = stubs.vpb
    req = vpb.GenerateRequest(request_id="kv-sec", tokenized=vpb.TokenizedInput(input_ids=ids),
                              sampling_params=vpb.SamplingParams(**params))
    if kv_json is not None:
        req.kv_transfer_params_json = kv_json
    return list(stubs.vllm.Generate(req, timeout=60))[-1].complete


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_the_decode_server_says_whom_it_trusts_and_refuses_other_sources(pd):
    _, dec, _, dec_stubs, kv_port = pd
    assert any(f"loads from peers: 127.0.0.1:{kv_port}" in line and "authenticated by the deployment's KV secret"
               in line for line in dec.stdout_lines), dec.stdout_lines
    for host, port in (("10.255.255.1", kv_port), ("127.0.0.1", 22), ("127.0.0.1", kv_port - 1)):
        kv_json = f'{{"do_remote_prefill": true, "remote_host": "{host}", "remote_port": {port}, ' \
                  f'"remote_kv_token": "{CAP}"}}'
        with pytest.raises(grpc.RpcError) as err:
            _generate(dec_stubs, PROMPT_IDS, kv_json, max_tokens=2)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "KVTransferParams.remote_host=" in err.value.details() and "--kv-peers" in err.value.details()


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_a_handoff_with_the_secret_loads_and_a_forged_capability_gets_nothing(pd, tiny_model):
    import json

    _, _, pre_stubs, dec_stubs, kv_port = pd
    with LLM(tiny_model("qwen3_e6k3"), dtype="float32", max_model_len=512, num_kv_blocks=4096) as llm:
        want = llm.generate([{"prompt_token_ids": PROMPT_IDS}], SamplingParams(**GREEDY), use_tqdm=False)[0]
    first = _generate(pre_stubs, PROMPT_IDS, max_tokens=1, temperature=0.0)
    handoff = json.loads(first.kv_transfer_params_json)
    assert len(handoff["remote_kv_token"]) == 22 and handoff["remote_port"] == kv_port
    forged = dict(handoff, remote_kv_token=CAP)
    done = _generate(dec_stubs, PROMPT_IDS, json.dumps(forged), **GREEDY)
    assert list(done.output_ids) == want.outputs[0].token_ids and done.cached_tokens == 0  # recomputed
    done = _generate(dec_stubs, PROMPT_IDS, first.kv_transfer_params_json, **GREEDY)
    assert list(done.output_ids) == want.outputs[0].token_ids and done.cached_tokens == len(PROMPT_IDS) - 1


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_a_kv_client_without_the_secret_is_refused_at_the_handshake(pd):
    from moelink.engine.kv_transfer.auth import SecretAuth

    _, _, _, _, kv_port = pd
    for auth, match in ((SecretAuth(None), "requires the deployment's KV secret"),
                        (SecretAuth(b"another-secret-0123456789"), "did not prove")):
        with socket.create_connection(("127.0.0.1", kv_port), timeout=5) as sock:
            with pytest.raises(KVFetchError, match=match):
                auth.client(sock, Deadline(5.0, "test"), "test")
