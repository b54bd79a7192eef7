"""`moelink bench-serve --prefill-target P --target D`: load on a prefill/decode pair, each request driven as a
router drives it, with time-to-first-token split into its parts.

Per request, as the OpenAI HTTP gateway's PD mode does: the prefill leg (the prompt, max_tokens=1, on the prefill
server; its last message says where the prompt's KV is), then the decode leg (the same prompt and the handoff,
streamed from the decode server). The client sees TTFT = prefill leg + decode leg's first token. The decode leg's first token
itself is the KV handoff (the decode server reserving blocks, fetching and writing the KV) and the first decode
step: the handoff's mean comes from the decode server's own counters (`moelink_kv_transfer_load_seconds_total` /
`moelink_kv_transfer_loads_total` over the level, from --metrics-url), the first decode is the rest. Both
protocols carry the handoff (`kv_transfer_params_json`).
"""
from __future__ import annotations

import time
import urllib.request
from typing import Optional


class PDClient:
    """Two legs per request over one protocol: the prefill server's stub, then the decode server's (a
    serve_load._Client, whose run() streams the decode leg and measures it)."""

    def __init__(self, decode_client, prefill_channel, timeout_s: float):
        self.decode = decode_client
        self.timeout_s = timeout_s
        pb = decode_client.pb
        if decode_client.protocol == "native":
            from moelink.engine.server.gen import moelink_v1_pb2_grpc as native_grpc

            self.prefill_stub = native_grpc.GenerationStub(prefill_channel)
        else:
            from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vllm_grpc

            self.prefill_stub = vllm_grpc.VllmEngineStub(prefill_channel)
        self.pb = pb

    def _prefill_request(self, rid: str, prompt: list[int]):
        pb = self.pb
        sp = pb.SamplingParams(temperature=0.0, max_tokens=1)
        if self.decode.protocol == "native":
            return pb.GenerateRequest(request_id=rid, prompt_token_ids=pb.TokenIds(ids=prompt), sampling_params=sp)
        return pb.GenerateRequest(request_id=rid, tokenized=pb.TokenizedInput(input_ids=prompt), sampling_params=sp)

    @staticmethod
    def _handoff(msg, protocol: str) -> str:
        if protocol == "native":
            return msg.kv_transfer_params_json
        return msg.complete.kv_transfer_params_json if msg.HasField("complete") else ""

    async def run(self, rid: str, prompt: list[int], output_len: int) -> dict:
        import grpc

        t0 = time.perf_counter()
        handoff = ""
        try:
            call = self.prefill_stub.Generate(self._prefill_request(rid, prompt), timeout=self.timeout_s,
                                              metadata=self.decode.metadata)
            async for msg in call:
                handoff = self._handoff(msg, self.decode.protocol) or handoff
        except grpc.aio.AioRpcError as exc:
            return dict(ok=False, error=f"prefill {exc.code().name}", start=t0, end=time.perf_counter())
        prefill_s = time.perf_counter() - t0
        res = await self.decode.run(rid, prompt, output_len, kv_transfer_params_json=handoff or None)
        res["start"] = t0
        res["prefill_leg"] = prefill_s
        res["handoff"] = bool(handoff)
        if res.get("ttft") is not None:
            res["decode_leg_ttft"] = res["ttft"]
            res["ttft"] += prefill_s
            res["e2e"] += prefill_s
        return res


class TransferScrapes:
    """The decode server's KV transfer counters around one level; nothing without a URL."""

    def __init__(self, url: Optional[str]):
        self.url, self.before = url, None

    def begin(self) -> None:
        if self.url is not None:
            self.before = scrape_transfers(self.url)

    def end(self) -> dict:
        if self.url is None:
            return {}
        after = scrape_transfers(self.url)
        loads = after["loads"] - self.before["loads"]
        failed = after["failed"] - self.before["failed"]
        wait = after["load_seconds"] - self.before["load_seconds"]
        return dict(loads=loads, failed=failed, mean_transfer_s=wait / (loads + failed) if loads + failed else None)


def scrape_transfers(url: str, timeout_s: float = 5.0) -> dict:
    """moelink_kv_transfer_* at a /metrics endpoint: loads ok, failed, and the summed load seconds."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (a URL the user gave)
        text = resp.read().decode()
    out = dict(loads=0.0, failed=0.0, load_seconds=0.0)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "moelink_kv_transfer_loads_total":
                out["loads" if s.labels.get("result") == "ok" else "failed"] += s.value
            elif s.name == "moelink_kv_transfer_load_seconds_total":
                out["load_seconds"] += s.value
    return out


def ttft_split(results: list[dict], transfers: dict) -> dict:
    """Mean TTFT and its parts over a level's completed requests (ms): prefill leg, handoff (the decode server's
    mean load time), first decode (the decode leg's first token minus the handoff)."""
    ok = [r for r in results if r.get("ok") and r.get("decode_leg_ttft") is not None]
    if not ok:
        return {}
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    prefill = mean([r["prefill_leg"] for r in ok])
    decode_leg = mean([r["decode_leg_ttft"] for r in ok])
    transfer = transfers.get("mean_transfer_s")
    out = dict(ttft_ms=round((prefill + decode_leg) * 1e3, 3), prefill_ms=round(prefill * 1e3, 3),
               handoffs=sum(1 for r in ok if r["handoff"]), loads=transfers.get("loads"),
               failed_loads=transfers.get("failed"))
    if transfer is not None:
        out["transfer_ms"] = round(transfer * 1e3, 3)
        out["first_decode_ms"] = round(max(decode_leg - transfer, 0.0) * 1e3, 3)
    else:
        out["decode_leg_first_token_ms"] = round(decode_leg * 1e3, 3)
    return out


class PDLevels:
    """bench-serve's PD mode around its levels: off (every call a no-op) without --prefill-target."""

    def __init__(self, ns, options):
        self.ns, self.options = ns, options
        self.on = ns.prefill_target is not None
        self.channel = None
        self.transfers = TransferScrapes(ns.metrics_url if self.on else None)

    async def open(self, client):
        if not self.on:
            return client
        import grpc

        self.channel = grpc.aio.insecure_channel(self.ns.prefill_target, options=self.options)
        return PDClient(client, self.channel, self.ns.timeout_s)

    def begin(self) -> None:
        self.transfers.begin()

    def end(self, results: list[dict]) -> dict:
        if not self.on:
            return {}
        return dict(ttft_split=ttft_split(results, self.transfers.end()))

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()


def split_text(level: dict) -> str:
    """The TTFT split of a level for bench-serve's printed row ("" outside PD mode)."""
    sp = level.get("ttft_split")
    if not sp:
        return ""
    if "transfer_ms" in sp:
        return (f"  TTFT mean {sp['ttft_ms']:.1f} = prefill {sp['prefill_ms']:.1f} + transfer {sp['transfer_ms']:.1f}"
                f" + first decode {sp['first_decode_ms']:.1f} ms ({sp['handoffs']} handoffs, {sp['failed_loads']:g} "
                f"failed loads)")
    return (f"  TTFT mean {sp['ttft_ms']:.1f} = prefill {sp['prefill_ms']:.1f} + decode leg "
            f"{sp['decode_leg_first_token_ms']:.1f} ms (give --metrics-url of the decode server to split it)")


__all__ = ["PDClient", "PDLevels", "TransferScrapes", "scrape_transfers", "split_text", "ttft_split"]
