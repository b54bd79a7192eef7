"""A minimal streaming client of `moelink.v1.Generation`, for trying a server from the shell.

    python -m moelink.engine.server.client --target 127.0.0.1:50051 "The quick brown fox" --max-tokens 32
"""
from __future__ import annotations

import argparse
import os
import sys

import grpc

from .gen import moelink_v1_pb2 as pb
from .gen import moelink_v1_pb2_grpc as pb_grpc
from .tls import check_ca_bundle


def open_channel(target: str, tls_ca: str | None, api_key: str | None):
    """(channel, call metadata) for a server: TLS when a CA file is given, a bearer token when a key is."""
    if tls_ca:
        ca = check_ca_bundle(tls_ca, "tls_ca")  # ValueError naming the file: unreadable, not PEM, bad certificate
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca))
    else:
        channel = grpc.insecure_channel(target)
    return channel, ((("authorization", f"Bearer {api_key}"),) if api_key else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prompt", nargs="+")
    ap.add_argument("--target", default="127.0.0.1:50051")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--api-key", default=os.environ.get("MOELINK_API_KEY"))
    ap.add_argument("--tls-ca", default=None, help="PEM file of the CA (or self-signed cert) to trust: use TLS")
    ap.add_argument("--timeout", type=float, default=60.0)
    ns = ap.parse_args(argv)
    try:
        channel, metadata = open_channel(ns.target, ns.tls_ca, ns.api_key)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stub = pb_grpc.GenerationStub(channel)
    params = pb.SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature)
    if ns.seed is not None:
        params.seed = ns.seed
    try:
        for prompt in ns.prompt:
            print(f"--- prompt: {prompt!r}")
            for msg in stub.Generate(pb.GenerateRequest(prompt=prompt, sampling_params=params),
                                     timeout=ns.timeout, metadata=metadata):
                sys.stdout.write(msg.text)
                sys.stdout.flush()
                if msg.finish_reason:
                    u = msg.usage
                    print(f"\n--- finish_reason={msg.finish_reason}, {u.prompt_tokens} prompt + "
                          f"{u.completion_tokens} completion tokens ({u.cached_tokens} cached)")
    except grpc.RpcError as exc:
        print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    finally:
        channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
