"""The JSON body of a route the HTTP front answers itself (vllm_routes.py, generate_route.py): one object, its
flags checked, each refusal naming the field (HttpFieldError, answered 400 by the route)."""
from __future__ import annotations

import json

from ...contract.safe_text import shown
from .openai_fields import HttpFieldError, refuse_too_deep


def json_object(body: bytes) -> dict:
    """The request body as a JSON object; too deep, not JSON or not an object refused naming `body`."""
    refuse_too_deep(body)
    try:
        data = json.loads(body)
    except ValueError as e:
        raise HttpFieldError("body", f"the request body is not JSON ({shown(str(e), quote=False)}).") from None
    if not isinstance(data, dict):
        raise HttpFieldError("body", f"the request body must be a JSON object, not {kind_of(data)}.")
    return data


def json_flag(data: dict, name: str, default: bool = False) -> bool:
    """Field `name` of `data` as a boolean (absent or null: `default`); anything else refused naming it."""
    value = data.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise HttpFieldError(name, f"{name} must be true or false, not {kind_of(value)}.")
    return value


def kind_of(value) -> str:
    """What a JSON value is, for an error message."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


__all__ = ["json_flag", "json_object", "kind_of"]
