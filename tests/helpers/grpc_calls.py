"""Calls the hostile-input tests make on both services (imported by test_bad_input, test_prompt_size and
test_log_safety; not a test module)."""
from __future__ import annotations

import grpc
import pytest


def refused(call):
    """The RpcError `call()` ends with (a stream is read to its end)."""
    with pytest.raises(grpc.RpcError) as err:
        out = call()
        if hasattr(out, "__next__"):
            list(out)
    return err.value


def native(stubs, rid="bad", **req):
    return lambda: stubs.native.Generate(stubs.pb.GenerateRequest(request_id=rid, **req), timeout=10)


def vllm(stubs, rid="bad", **req):
    if "text" not in req:
        req.setdefault("tokenized", stubs.vpb.TokenizedInput(input_ids=[1, 2, 3]))
    return lambda: stubs.vllm.Generate(stubs.vpb.GenerateRequest(request_id=rid, stream=True, **req), timeout=10)
