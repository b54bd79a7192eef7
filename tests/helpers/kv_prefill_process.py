"""A prefill engine in a process of its own, for the disaggregation tests (tests/engine/test_kv_disagg_*.py).

    python -m tests.helpers.kv_prefill_process SPEC_JSON

SPEC_JSON: {"model", "port", "prompts", "llm": {LLM kwargs}, "ep": 1|2, "stall": bool, "transport": a name (default:
RemoteKVConfig's, nixl where installed; "stall" is tcp's)}. The process prefills
each prompt (max_tokens=1, do_remote_decode) under request ids "p0", "p1", ..., prints one JSON line
{"ready": true, "first": [the first token per prompt], "params": [each output's kv_transfer_params, as a dict],
"scan_params": [the connector's decode_params per prompt: every rank's ports]},
and serves the saved KV until its stdin closes (then it shuts the engine down and prints {"closed": true,
"store": counters}). "stall": the server sends a reply's header and half of its first tensor, prints
{"stalled": true} and stops there (the test then kills the process mid-fetch). "ep": 2 runs the engine on the
Ray executor with expert_parallel_size 2, on a Ray of its own (tests.helpers.local_ray).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import threading


def _stall_the_server() -> None:
    from moelink.engine.kv_transfer import tcp as kv_tcp

    printing = threading.Lock()  # one line per stalled connection, never two interleaved

    def send_saved(sock, saved, query=None, deadline=None):
        from moelink.engine.kv_transfer.wire import saved_header, send_header

        send_header(sock, saved_header(saved))
        first = saved.groups[0][1][0].contiguous().numpy().tobytes()
        sock.sendall(first[:len(first) // 2])
        with printing:
            print(json.dumps({"stalled": True}), flush=True)
        threading.Event().wait()  # until the process is killed

    kv_tcp.send_saved = send_saved


def main(spec: dict) -> None:
    from moelink.engine import LLM, SamplingParams
    from moelink.engine.kv_transfer.remote import RemoteKVConfig, RemoteKVConnector
    from moelink.engine.contract.kv_transfer_params import KVTransferParams

    if spec.get("stall"):
        _stall_the_server()
    ep = spec.get("ep", 1)
    transport = {"transport": spec["transport"]} if "transport" in spec else {}
    # Holds may keep the whole of these tests' small pools (96 blocks, four prompts held at once; gpt-oss holds
    # each prompt's blocks in both its tables): the default quarter would release the oldest before the decode
    # engine comes, which the hold tests check on their own (tests/engine/test_kv_nixl_inplace.py).
    conn = RemoteKVConnector(RemoteKVConfig(port=spec["port"], num_ranks=ep, nixl_hold_fraction=1.0,
                                            nixl_hold_client_fraction=1.0, **transport))
    kw = dict(spec.get("llm", {}))
    with contextlib.ExitStack() as stack:
        if ep > 1:
            from tests.helpers.local_ray import local_ray

            stack.enter_context(local_ray(num_cpus=4))
            kw.update(expert_parallel_size=ep)  # on the Ray just started: the Ray executor
        llm = stack.enter_context(LLM(spec["model"], kv_connector=conn, **kw))
        params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True,
                                kv_transfer_params=KVTransferParams(do_remote_decode=True))
        for i, p in enumerate(spec["prompts"]):
            llm.engine.add_request(f"p{i}", p, params)
        got = {}
        while llm.engine.has_requests():
            got.update({o.request_id: o for o in llm.engine.step() if o.finished})
        outs = [got[f"p{i}"] for i in range(len(spec["prompts"]))]
        print(json.dumps({"ready": True, "first": [o.outputs[0].token_ids for o in outs],
                          "params": [dataclasses.asdict(o.kv_transfer_params) for o in outs],
                          "scan_params": [dataclasses.asdict(conn.decode_params(o.kv_transfer_params)) for o in outs]}),
              flush=True)
        sys.stdin.read()  # serve until the test closes our stdin
        runner = getattr(llm.engine.executor, "runner", None)
        store = runner.plugin("kv_transfer").connector.store if runner is not None else None
        counters = dataclasses.asdict(store.counters) | {"held": len(store)} if store is not None else None
    print(json.dumps({"closed": True, "store": counters}), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
