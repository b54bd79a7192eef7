"""Shared pieces for the tests that build prefill/decode parameters or configs by hand, or speak to a KV server:
a capability of the right shape, a deployment secret, the one refusal a server gives for any key it does not
serve, and decode-side kv_transfer_params naming a source (engine/contract/kv_transfer_params.py)."""
from __future__ import annotations

from moelink.engine.kv_transfer.server import NO_KV  # noqa: F401 (re-exported: what refusals are matched against)
from moelink.engine.contract.kv_transfer_params import KVTransferParams

CAP = "test-capability-0123456789"  # the shape a prefill engine's remote_kv_token has (22+ URL-safe characters)
SECRET = b"test-kv-secret-0123456789abcdef"  # a deployment secret (>= 16 bytes)


def decode_kv(host: str = "127.0.0.1", port: int = 5000, ranks: int = 1, token: str = CAP, **kw) -> dict:
    """A decode request's kv_transfer_params as vLLM's JSON object."""
    return dict(do_remote_prefill=True, remote_host=host, remote_port=port, remote_ranks=ranks, remote_kv_token=token,
                **kw)


def decode_params(**kw) -> KVTransferParams:
    return KVTransferParams(**decode_kv(**kw))
