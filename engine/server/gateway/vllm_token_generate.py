"""vLLM's token-in / token-out generate on the HTTP port, answered from the engine beside the front (docs/rl.md: the
SkyRL and prime-rl recipes).

`POST /inference/v1/generate` is vLLM's (its ServingTokens: `GenerateRequest` in, `GenerateResponse` out): prime-rl's
rollouts (its renderers' client, `prefill_logprobs`) and SkyRL's `RemoteInferenceClient` send it token ids and vLLM's
sampling params, and read back the generated ids, their logprobs (`choices[0].logprobs.content[i].logprob`, the token
as `token_id:N`) and, where the server records routing (--enable-return-routed-experts), the experts every forwarded
position went to. `POST /skyrl/v1/generate` is SkyRL's own route of the same request (its VLLMServerActor), which
SkyRL calls instead when it replays routing: its answer's `routed_experts` is always the packed object.

The routed experts come in the two packed forms vLLM's servers answer (`choices[i].routed_experts`, the int array
[prompt + generated - 1, MoE layers, top_k]):
  * "npy": base64 of the array as a `.npy` file (vLLM's ServingTokens; np.load reads shape and dtype), int32;
  * "packed": {"data": base64 of the raw little-endian array, "shape", "dtype", "start": 0}, dtype the narrowest of
    uint8 / int16 / int32 that holds the largest id (SkyRL's generate_wire; prime-rl's serving_tokens answers the
    same object on /inference/v1/generate).
/skyrl/v1/generate answers "packed"; /inference/v1/generate "npy", or "packed" on a server started with
MOELINK_TOKEN_GENERATE_ROUTED_EXPERTS=packed in its environment (prime-rl's recipe).

Answered through the same Serving as /generate and /v1/completions: the client's fair share and its request-id scope
(client_identity), admission limits, an abort in the engine when the client hangs up (the front's answer_watched),
the body bound (--max-http-body-bytes), request bounds (RequestLimits: --max-logprobs, --max-n,
--max-batch-sequences, the stop lists, --max-request-id-chars) and the answer budget (--max-answer-bytes, routed
experts counted). A field vLLM has and the engine cannot honour (multimodal `features`, `kv_transfer_params`,
`priority` other than 0, structured outputs, an unknown `sampling_params.extra_args` key) is one 400 naming it, as
is any field neither knows; `cache_salt` salts the request's prefix-cache keys (prime-rl salts per weight version).
"""
from __future__ import annotations

import base64
import io
import json
import os
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Optional

from ...contract.safe_text import shown
from ...contract.sampling_params import SamplingParams
from ..client_identity import client_scope
from . import answer_budget
from .completions_request import (SAMPLING, check_request_id, check_stops, is_int, logit_bias_field, logprob_count,
                                  read_stream_options, sampling_fields)
from .generate_route import Streamed, _Runs, _error, _refusal, admit_runs
from .json_body import json_flag, json_text_object, kind_of, off_loop, valid_text
from .openai_fields import HttpFieldError

INFERENCE_PATH = "/inference/v1/generate"
SKYRL_PATH = "/skyrl/v1/generate"
PATHS = (INFERENCE_PATH, SKYRL_PATH)
FORM_ENV = "MOELINK_TOKEN_GENERATE_ROUTED_EXPERTS"  # "npy" (vLLM's, the default) or "packed" (prime-rl's)
FORMS = ("npy", "packed")
# vLLM's GenerateRequest fields: read, or refused unless neutral (REFUSED).
FIELDS = ("request_id", "token_ids", "sampling_params", "model", "stream", "stream_options", "cache_salt", "priority",
          "kv_transfer_params", "features")
REFUSED = {"features": ((None,), "multimodal features are not taken on this route: send images through "
                                 "/v1/chat/completions"),
           "kv_transfer_params": ((None,), "a prefill/decode pair is driven through the gateway's PD mode"),
           "priority": ((None, 0), "moelink's scheduler shares by client, not by priority")}
# vLLM's SamplingParams fields beyond the completions ones (completions_request.SAMPLING): read here.
OWN_SAMPLING = ("max_tokens", "logprobs", "prompt_logprobs", "logit_bias", "truncate_prompt_tokens", "detokenize",
                "flat_logprobs", "extra_args", "output_kind", "structured_outputs", "logits_processors")
# sampling_params.extra_args keys taken: prime-rl's renderers ask compact logprobs, and read vLLM's JSON ones when a
# server answers those instead (what this route answers).
EXTRA_ARGS = ("prl_compact_logprobs",)
# A refused sampling field -> its neutral values.
SAMPLING_REFUSED = {"output_kind": ((None,), "each answer is the whole output (stream for deltas)"),
                    "structured_outputs": ((None,), "structured outputs are taken on /v1/completions and "
                                                    "/v1/chat/completions"),
                    "logits_processors": ((None, []), "moelink takes no per-request logits processors over HTTP")}


def routed_form(environ=os.environ) -> str:
    """The routed experts' form /inference/v1/generate answers (FORM_ENV; ValueError naming it when invalid)."""
    form = environ.get(FORM_ENV, "npy").strip().lower() or "npy"
    if form not in FORMS:
        raise ValueError(f"{FORM_ENV}={form!r} is invalid: choose from {', '.join(FORMS)}.")
    return form


@dataclass(frozen=True)
class TokenRequest:
    rid: str  # the answer's request_id is `generate-tokens-{rid}`, as vLLM names it
    token_ids: list
    params: SamplingParams  # sample 0's; Serving.run makes the n samples
    n: int
    logprobs: Optional[int]
    prompt_logprobs: Optional[int]
    stream: bool
    include_usage: bool
    keep: Optional[int]
    lora: Optional[str]
    cache_salt: Optional[str]


def _refuse_non_neutral(data: dict, refused: dict, prefix: str = "") -> None:
    for key, (neutral, why) in refused.items():
        value = data.get(key)
        if value is not None and not any(value == v and type(value) is type(v) for v in neutral):
            raise HttpFieldError(prefix + key, f"{prefix}{key}={shown(json.dumps(value))} is not supported: {why}.")


def read_request(data: dict, serving, routed: bool) -> TokenRequest:
    """The request, checked against the server's limits; `routed`: the engine records routing (every sample asks
    its routed experts, as vLLM answers them on a server started with --enable-return-routed-experts)."""
    for key in data:
        if key not in FIELDS:
            raise HttpFieldError(key, f"{shown(key)} is not a field of vLLM's generate request (fields: "
                                      f"{', '.join(FIELDS)}).")
    _refuse_non_neutral(data, REFUSED)
    limits = serving.limits
    check_request_id(data, limits)
    rid = data.get("request_id") or uuid.uuid4().hex
    ids = data.get("token_ids")
    if not isinstance(ids, list) or not ids:
        raise HttpFieldError("token_ids", f"token_ids is required: a non-empty list of token ids, not {kind_of(ids)}.")
    max_len = serving.info.max_model_len
    sp = data.get("sampling_params")
    if not isinstance(sp, dict):
        raise HttpFieldError("sampling_params", f"sampling_params is required: an object of vLLM's sampling "
                                                f"parameters, not {kind_of(sp)}.")
    for key in sp:
        if key not in SAMPLING and key not in OWN_SAMPLING:
            raise HttpFieldError(f"sampling_params.{key}", f"sampling_params.{shown(key)} is not a sampling "
                                                           "parameter moelink takes (vLLM's SamplingParams fields: "
                                                           "docs/rl.md#skyrl).")
    _refuse_non_neutral(sp, SAMPLING_REFUSED, "sampling_params.")
    keep = sp.get("truncate_prompt_tokens")
    if keep is not None and keep != -1 and (not is_int(keep) or keep < 1):
        raise HttpFieldError("sampling_params.truncate_prompt_tokens", "sampling_params.truncate_prompt_tokens must "
                                                                       "be an integer >= 1 (or -1: max_model_len).")
    keep = max_len - 1 if keep == -1 else keep
    kept = len(ids) if keep is None else min(len(ids), keep)
    if kept >= max_len:  # refused on its length before any entry is looked at
        raise HttpFieldError("token_ids", f"token_ids has {kept} token ids, too long: max_model_len={max_len} "
                                          f"leaves room for at most {max_len - 1} prompt tokens.")
    if set(map(type, ids)) != {int} or min(ids) < 0:
        raise HttpFieldError("token_ids", "token_ids must hold token ids (integers >= 0).")
    for name in ("detokenize", "flat_logprobs"):  # taken: ids are answered either way, logprobs as vLLM's JSON
        if sp.get(name) is not None and not isinstance(sp[name], bool):
            raise HttpFieldError(f"sampling_params.{name}", f"sampling_params.{name} must be true or false.")
    extra = sp.get("extra_args")
    if extra is not None:
        if not isinstance(extra, dict):
            raise HttpFieldError("sampling_params.extra_args", "sampling_params.extra_args must be an object.")
        for key in extra:
            if key not in EXTRA_ARGS:
                raise HttpFieldError(f"sampling_params.extra_args.{key}",
                                     f"sampling_params.extra_args.{shown(key)} is not taken (moelink takes "
                                     f"{', '.join(EXTRA_ARGS)}; logprobs are answered as vLLM's JSON).")
    try:
        fields = sampling_fields(sp, limits)
        bias = logit_bias_field(sp.get("logit_bias"), limits)
        check_stops(limits, fields)
    except HttpFieldError as e:
        raise HttpFieldError(f"sampling_params.{e.field}", f"sampling_params.{e}") from None
    if bias:
        fields["logit_bias"] = bias
    try:
        logprobs = logprob_count(sp, "logprobs", limits.max_logprobs)
        prompt_logprobs = logprob_count(sp, "prompt_logprobs", limits.max_logprobs)
    except HttpFieldError as e:
        raise HttpFieldError(f"sampling_params.{e.field}", f"sampling_params.{e}") from None
    stream = json_flag(data, "stream")
    options = data.get("stream_options")
    if options is not None and not stream:
        raise HttpFieldError("stream_options", "Stream options can only be defined when `stream=True`.")
    include_usage, _ = read_stream_options(options)
    if prompt_logprobs is not None and stream:
        raise HttpFieldError("sampling_params.prompt_logprobs", "`prompt_logprobs` are not available when "
                                                                "`stream=True`.")
    max_tokens = sp.get("max_tokens")
    if max_tokens is None:  # vLLM's ServingTokens: up to the context's end
        max_tokens = max(max_len - kept, 1)
    elif not is_int(max_tokens) or max_tokens < 1:
        raise HttpFieldError("sampling_params.max_tokens", f"sampling_params.max_tokens="
                                                           f"{shown(json.dumps(max_tokens))} is invalid: an integer "
                                                           ">= 1.")
    fields.update(max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                  return_routed_experts=routed)
    try:
        params = SamplingParams(**fields)
        limits.check_n(params.n)
    except ValueError as e:
        name = str(e).split("=", 1)[0].removeprefix("SamplingParams.").removeprefix("sampling_params.")
        key = next((k for k, (n, _) in SAMPLING.items() if n == name and k in sp), name)
        raise HttpFieldError(f"sampling_params.{key}", shown(str(e), quote=False)) from None
    if params.n > limits.max_batch_sequences:
        raise HttpFieldError("sampling_params.n", f"sampling_params.n={params.n}: at most "
                                                  f"{limits.max_batch_sequences} sequences in one request "
                                                  "(--max-batch-sequences).")
    salt = data.get("cache_salt")
    if salt is not None:
        if not isinstance(salt, str) or not salt:
            raise HttpFieldError("cache_salt", "cache_salt must be a non-empty string.")
        valid_text(salt, "cache_salt")
        if len(salt) > limits.max_request_id_chars:
            raise HttpFieldError("cache_salt", f"cache_salt has {len(salt)} characters: at most "
                                               f"{limits.max_request_id_chars} (--max-request-id-chars).")
    return TokenRequest(rid, ids, params.sample(0), params.n, logprobs, prompt_logprobs, stream, include_usage, keep,
                        None, salt)


def routed_bytes_per_token(serving, form: str) -> int:
    """The answer bytes of one position's routed experts (base64 of int32 ids, top_k per MoE layer)."""
    model = serving.info.model
    return (4 * len(model.sparse_layers) * model.top_k * 4 + 2) // 3


def check_answer(serving, req: TokenRequest, prompt_len: int, routed_per_token: int) -> None:
    """A non-streamed answer's estimated size against --max-answer-bytes (answer_budget.py)."""
    max_tokens = req.params.max_tokens or 1
    top = None if req.logprobs is None else max(req.logprobs, 1)  # logprobs_content answers at least one
    est = answer_budget.estimate([prompt_len], req.n, max_tokens, answer_budget.TOKEN_GENERATE_LOGPROB, top,
                                 req.prompt_logprobs, prompt_entries_per_choice=False)
    routed = req.n * (max_tokens + prompt_len) * routed_per_token
    fields = (f"{prompt_len} prompt tokens x n={req.n} x max_tokens={max_tokens}, logprobs={req.logprobs}, "
              f"prompt_logprobs={req.prompt_logprobs}" + (", routed experts" if routed else ""))
    answer_budget.check(serving.limits, answer_budget.Estimate(est.output + routed, est.prompt), fields,
                        params=("sampling_params.max_tokens", "sampling_params.prompt_logprobs"))


def pack_routed(ids, form: str):
    """The routed experts [positions, MoE layers, top_k] in one of vLLM's packed forms (the module docstring)."""
    import numpy as np

    arr = np.asarray(ids)
    if form == "npy":
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arr, dtype=np.dtype("<i4")))
        return base64.b64encode(buf.getvalue()).decode("ascii")
    top = int(arr.max(initial=0))
    dtype = np.dtype("u1") if top < 2 ** 8 else np.dtype("<i2") if top < 2 ** 15 else np.dtype("<i4")
    compact = np.ascontiguousarray(arr, dtype=dtype)
    return {"data": base64.b64encode(compact.tobytes()).decode("ascii"), "shape": list(compact.shape),
            "dtype": dtype.name, "start": 0}


def _wire(logprob: float) -> float:
    from ..serving import wire_logprob

    return wire_logprob(logprob)


def logprobs_content(token_ids, entries, top: int) -> list:
    """vLLM's ChatCompletionLogProbs content of generated tokens: the token as `token_id:N`, its logprob (floored at
    -9999), and `top_logprobs` the position's entries in vLLM's order (the sampled token first, then by rank), at
    most max(top, 1)."""
    out = []
    for t, entry in zip(token_ids, entries):
        lp = entry.get(t) if entry else None
        if lp is None:
            out.append({"token": f"token_id:{t}", "logprob": -9999.0, "bytes": None, "top_logprobs": []})
            continue
        ranked = [t] + [tid for tid, e in sorted(entry.items(), key=lambda kv: kv[1].rank) if tid != t]
        tops = [{"token": f"token_id:{tid}", "logprob": _wire(entry[tid].logprob), "bytes": None}
                for tid in ranked[:max(top, 1)]]
        out.append({"token": f"token_id:{t}", "logprob": _wire(lp.logprob), "bytes": None, "top_logprobs": tops})
    return out


def prompt_logprobs_json(entries) -> Optional[list]:
    """vLLM's prompt_logprobs: per prompt position None (the first) or {token id: {"logprob", "rank",
    "decoded_token"}}."""
    if entries is None:
        return None
    return [None if e is None else {str(t): {"logprob": _wire(lp.logprob), "rank": lp.rank, "decoded_token": None}
                                    for t, lp in e.items()} for e in entries]


def _dumps(obj: Any) -> bytes:
    """Compact JSON, as vLLM writes it (prime-rl's renderers find `"routed_experts":{"data":"` in it)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


class _Answer:
    """One request's choices, built from the engine's deltas."""

    def __init__(self, req: TokenRequest, model: str, form: str):
        self.req, self.model, self.form = req, model, form
        self.ids = [[] for _ in range(req.n)]
        self.lps = [[] for _ in range(req.n)]
        self.finish: list[Optional[str]] = [None] * req.n
        self.routed: list[Any] = [None] * req.n
        self.prompt_len = 0
        self.cached = 0
        self.prompt_lps = None

    def add(self, sample: int, out) -> tuple[list, list]:
        """Take one delta; (its token ids, its logprobs entries) for a streamed event."""
        comp = out.outputs[0]
        self.prompt_len = len(out.prompt_token_ids)
        self.cached = max(self.cached, out.num_cached_tokens or 0)
        ids = list(comp.token_ids)
        self.ids[sample].extend(ids)
        entries = list(comp.logprobs or [])
        self.lps[sample].extend(entries)
        if comp.finish_reason is not None:
            self.finish[sample] = comp.finish_reason
        if comp.routed_experts is not None:
            self.routed[sample] = pack_routed(comp.routed_experts, self.form)
        if sample == 0 and self.prompt_lps is None and out.prompt_logprobs is not None:
            self.prompt_lps = prompt_logprobs_json(out.prompt_logprobs)
        return ids, entries

    def choice(self, i: int) -> dict:
        logprobs = None
        if self.req.logprobs is not None:
            logprobs = {"content": logprobs_content(self.ids[i], self.lps[i], self.req.logprobs)}
        choice = {"index": i, "logprobs": logprobs, "finish_reason": self.finish[i] or "stop",
                  "token_ids": self.ids[i]}
        if self.routed[i] is not None or self.form == "packed":
            choice["routed_experts"] = self.routed[i]
        return choice

    def usage(self) -> dict:
        done = sum(len(i) for i in self.ids)
        usage = {"prompt_tokens": self.prompt_len, "completion_tokens": done, "total_tokens": self.prompt_len + done}
        if self.cached:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached}
        return usage

    def body(self) -> dict:
        return {"request_id": f"generate-tokens-{self.req.rid}", "created": int(time.time()), "model": self.model,
                "choices": [self.choice(i) for i in range(self.req.n)], "usage": self.usage(),
                "prompt_logprobs": self.prompt_lps, "kv_transfer_params": None}


class TokenGenerateRoute:
    """Answers vLLM's `/inference/v1/generate` and SkyRL's `/skyrl/v1/generate` from a Serving (serving.py)."""

    def __init__(self, serving, environ=os.environ):
        self.s = serving
        self.form = routed_form(environ)

    def body_limit(self, path: str) -> Optional[int]:
        """The largest body the front reads for `path` (413 beyond it), or None for another path."""
        return self.s.limits.max_http_body_bytes if path in PATHS else None

    @property
    def records_routing(self) -> bool:
        """Whether the engine records routed experts (--enable-return-routed-experts)."""
        core = getattr(self.s.engine, "engine", None)
        return bool(getattr(getattr(core, "config", None), "return_routed_experts", False))

    async def answer(self, method: bytes, path: str, body: bytes, query: str = "", client: tuple[str, ...] = ()):
        """(HTTP status, JSON body), a Streamed answer, or None for another path."""
        if path not in PATHS:
            return None
        if method != b"POST":
            return 405, _error(f"{path} takes POST (a JSON body), not {method.decode('latin-1')}.", None, 405)
        scope = client_scope(client)
        form = "packed" if path == SKYRL_PATH else self.form
        try:
            data = await off_loop(body, json_text_object, body)
            lora = self._adapter(data.get("model"))
            req = await off_loop(body, read_request, data, self.s, self.records_routing)
            runs, prompt_len = await self._start(req, lora, client, scope, form)
        except HttpFieldError as e:
            return e.status, _error(str(e), e.field, e.status)
        except Exception as e:  # the engine's or Serving's refusal, mapped as the gRPC services map it
            return _refusal(e)
        answer = _Answer(req, lora or self.s.served_model_name, form)
        if req.stream:
            return Streamed(_events(req, answer, runs), runs.aclose)
        try:
            async with runs:
                async for _, sample, out in runs:
                    answer.add(sample, out)
        except Exception as e:  # the engine failed or stopped mid-request
            return _refusal(e)
        if any(f == "error" for f in answer.finish):
            return 500, _error("the engine failed the request.", None, 500)
        return 200, _dumps(answer.body())

    def _adapter(self, model: Any) -> Optional[str]:
        """The LoRA adapter `model` names, None for the base model (a served name, an alias, or none); 404 for
        another name, as vLLM answers."""
        if model is None:
            return None
        if not isinstance(model, str):
            raise HttpFieldError("model", "model must be a string (a served model's name).")
        if model in self.s.served_model_names or model in self.s.model_aliases:
            return None
        if self.s.adapters.get(model) is not None:
            return model
        from .vllm_routes import NotFound

        raise NotFound("model", f"The model `{shown(model, quote=False)}` does not exist.")

    async def _start(self, req: TokenRequest, lora: Optional[str], client: tuple[str, ...], scope: str, form: str
                     ) -> tuple[_Runs, int]:
        rid = self._request_id(req.rid)
        try:
            one = await self.s.prepare(rid, req.token_ids, req.params, "token_ids", keep=req.keep,
                                       lora=self.s.adapter(lora, "model") if lora else None, scope=scope)
        except ValueError as e:
            raise HttpFieldError(_field_of(str(e)), shown(str(e), quote=False)) from None
        if req.cache_salt is not None:  # the prompt's KV keyed by the salt too (scheduler Request.cache_salt)
            self._check_salt()
            salt = req.cache_salt.encode()
            one = replace(one, cache_salt=one.cache_salt + b"cache_salt|" + len(salt).to_bytes(4, "little") + salt)
        prompt_len = len(one.prompt_token_ids)
        if not req.stream:
            routed = routed_bytes_per_token(self.s, form) if req.params.return_routed_experts else 0
            check_answer(self.s, req, prompt_len, routed)
        return await admit_runs(self.s, [rid], [one], req.n, client, scope), prompt_len

    def _request_id(self, rid: str) -> str:
        try:
            return self.s.request_id(f"generate-tokens-{rid}")
        except ValueError as e:
            raise HttpFieldError("request_id", shown(str(e), quote=False)) from None

    def _check_salt(self) -> None:
        """A salt is taken only where every KV store keys by it (the prefix cache does; a KV connector must too,
        as engine/config/lora.py asks of one that serves adapters)."""
        core = getattr(self.s.engine, "engine", None)
        connector = getattr(getattr(core, "config", None), "kv_connector", None)
        if connector is not None and getattr(connector, "keys_kv_by_cache_salt", False) is not True:
            raise HttpFieldError("cache_salt", f"cache_salt is not supported with kv_connector="
                                               f"{type(connector).__name__}: it does not key KV by the request's "
                                               "cache salt.")


def _field_of(message: str) -> str:
    """The field an engine refusal names (`SamplingParams.max_tokens=...`, `token_ids ...`)."""
    head = message.split("=", 1)[0].split(" ", 1)[0]
    name = head.removeprefix("SamplingParams.").removeprefix("sampling_params.")
    if name in ("token_ids", "prompt", "prompt_token_ids") or not name.isidentifier():
        return "token_ids"
    return f"sampling_params.{name}"


async def _events(req: TokenRequest, answer: _Answer, runs: _Runs) -> AsyncIterator[bytes]:
    """vLLM's GenerateStreamResponse events: each delta's token ids (and logprobs), then the usage when asked, then
    [DONE]; an engine failure meanwhile as vLLM's error event."""
    rid = f"generate-tokens-{req.rid}"
    try:
        async for _, sample, out in runs:
            ids, entries = answer.add(sample, out)
            finish = out.outputs[0].finish_reason
            if finish == "error":
                raise RuntimeError("the engine failed the request")
            if not ids and finish is None:
                continue
            logprobs = ({"content": logprobs_content(ids, entries, req.logprobs)}
                        if req.logprobs is not None else None)
            yield b"data: " + _dumps({"request_id": rid, "choices": [
                {"index": sample, "logprobs": logprobs, "finish_reason": finish, "token_ids": ids}]}) + b"\n\n"
        if req.include_usage:
            yield b"data: " + _dumps({"request_id": rid, "choices": [], "usage": answer.usage()}) + b"\n\n"
    except Exception as e:
        yield b"data: " + _refusal(e)[1] + b"\n\n"
    finally:
        await runs.aclose()
    yield b"data: [DONE]\n\n"


__all__ = ["FORM_ENV", "INFERENCE_PATH", "PATHS", "SKYRL_PATH", "TokenGenerateRoute", "pack_routed", "read_request",
           "routed_form"]
