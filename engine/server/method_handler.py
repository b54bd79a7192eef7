"""`handler_like`: a gRPC method handler that stands in for another one, of the same kind.

The server's interceptors (auth.py's API-key check, decoding.py's parse guard) answer an RPC with their own
behaviour in place of, or around, the service's: the stand-in must keep the method's kind (which sides
stream) and its response serializer, and picks its own request deserializer (none: the request stays raw
bytes). Both build it here, so the four kinds are mapped to grpc's constructors in one place.
"""
from __future__ import annotations

from typing import Callable, Optional

import grpc


def handler_like(handler: grpc.RpcMethodHandler, behaviour: Callable,
                 request_deserializer: Optional[Callable]) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind and response serializer that runs `behaviour`."""
    kwargs = dict(request_deserializer=request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(behaviour, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(behaviour, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(behaviour, **kwargs)
    return grpc.unary_unary_rpc_method_handler(behaviour, **kwargs)
