"""Prefill/decode disaggregation at the gRPC boundary: the KV transfer parameters as they cross both services,
and a prefill server's default. The roles and their flags: engine/api/kv_args.py.

On the wire the parameters are vLLM's JSON object (GenerateRequest / GenerateComplete kv_transfer_params_json,
and the same field in moelink.v1), bounded; the deprecated typed `KvTransferParams` message (Mooncake's host and
port only) cannot name the saved KV and is refused.
"""
from __future__ import annotations

import dataclasses
import json

from ..contract.json_depth import check_text
from ..contract.kv_transfer_params import KVTransferParams
from .gateway.quirks import prefill_leg_without_grammar
from ..contract.safe_text import shown

PRODUCER = "kv_producer"  # a prefill server's kv_role
MAX_KV_PARAMS_JSON = 16 * 1024  # characters of kv_transfer_params_json: a few hundred in practice


def with_role_default(params, kv_role: str, n: int):
    """A prefill server ("kv_producer") saves the prompt KV of every request that does not say otherwise: routers
    that do not know moelink's connector (the managed gateway's vLLM PD mode treats an unknown one as
    "passthrough": it sends the prefill leg no kv_transfer_params and relays whatever the engine returns) still
    get a decode handoff. n > 1 cannot be handed off (a saved KV is served once): such a request is only computed
    here. Marked
    `by_role_default`: its save is copied to host memory, never held in the cache (only a request that asks for the
    handoff itself may hold blocks: docs/security-kv.md)."""
    if params.kv_transfer_params is None and kv_role == PRODUCER and n == 1:
        params = dataclasses.replace(params, kv_transfer_params=KVTransferParams(do_remote_decode=True,
                                                                                 by_role_default=True))
    return without_grammar_on_prefill_leg(params, kv_role)


def without_grammar_on_prefill_leg(params, kv_role: str):
    """The prefill leg of a handoff (a prefill server's request that hands its KV off and samples one token, as a
    router's PD mode sends it) without its structured-output constraint: that one token is not the answer, and
    compiling a grammar for it could outlast a router's wait for the prefill leg's first answer (the managed
    gateway's quirk, gateway/quirks.py prefill_leg_without_grammar; issue 54)."""
    return prefill_leg_without_grammar(params, kv_role == PRODUCER)


def kv_params_from_json(text: str) -> KVTransferParams:
    """kv_transfer_params_json -> KVTransferParams; ValueError names the field."""
    if len(text) > MAX_KV_PARAMS_JSON:
        raise ValueError(f"kv_transfer_params_json is {len(text)} characters: at most {MAX_KV_PARAMS_JSON} allowed.")
    check_text(text, "kv_transfer_params_json")  # before json.loads, which recurses per level
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"kv_transfer_params_json is not valid JSON: {exc}.") from None
    if not isinstance(obj, dict):
        raise ValueError(f"kv_transfer_params_json={shown(text)} is invalid: must be a JSON object.")
    return KVTransferParams.from_dict(obj)


def kv_params_to_json(params: KVTransferParams) -> str:
    return json.dumps(params.to_dict(), separators=(",", ":"))


__all__ = ["with_role_default", "without_grammar_on_prefill_leg", "kv_params_from_json", "kv_params_to_json", "MAX_KV_PARAMS_JSON"]
