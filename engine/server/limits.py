"""What one request may ask for: the per-request limits both gRPC services enforce, and the docs' table of them.

Every list a client sends costs work per entry (validation, per-token stop
checks on the engine thread, per-sample copies), so each has a cap, checked on
the list's length before any entry is looked at. `RequestLimits` holds the
caps (each a `moelink serve` flag); `bad_input_table()` renders the "bad
input" table of docs/serving.md (Bad input and limits) from the same objects
the code checks against, and a test keeps that page equal to it (`python -m
moelink.engine.server.limits` prints it; `--doc` rewrites it in the page).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

from ..contract.safe_text import MAX_SHOWN_CHARS

# Whole-message cap of both listeners (ServerConfig.max_message_size): 64 MiB, so a 1M-token prompt of uint32
# ids fits with room. Here, not in config.py, because the docs' table below renders it and config imports us.
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
# The wire bounds of engine/server/wire_bounds.py (which says why each is what it is).
OTHER_FIELD_MAX_BYTES = 64 << 10  # a Generate field that is not the prompt, the id or the sampling parameters
SMALL_REQUEST_MAX_BYTES = 64 << 10  # a request of any method but Generate and Abort
MAX_METADATA_BYTES = 16 << 10  # every header of a call together: gRPC refuses more before a handler runs
# A text sent with VllmEngine's truncate_prompt_tokens may be longer than can fit (its tail is used), and a
# text that cannot fit gets the precise INVALID_ARGUMENT of the pre-parse check: up to this much is received
# whatever the model's bound. Every message under it is received whole, so it is not larger than that needs:
# room for a 16 MB text with its other fields.
RECEIVE_FLOOR_BYTES = 20 << 20


def _limit(default: int, proto_field: str, unit: str, help: str):
    return field(default=default, metadata=dict(proto_field=proto_field, unit=unit, help=help))


@dataclass(frozen=True)
class RequestLimits:
    """Caps on one request's lists and strings (each is the `--max-...` flag of the same name)."""

    max_request_id_chars: int = _limit(256, "request_id", "characters", "longest request_id")
    # vLLM's bound (VLLM_MAX_N_SEQUENCES, 16384): a request vLLM answers is not refused here.
    max_n: int = _limit(16384, "sampling_params.n", "samples", "most samples (n) per request")
    max_stop_strings: int = _limit(32, "sampling_params.stop", "strings", "most stop strings per request")
    max_stop_string_chars: int = _limit(256, "sampling_params.stop[i]", "characters", "longest stop string")
    max_stop_token_ids: int = _limit(1024, "sampling_params.stop_token_ids", "ids", "most stop token ids per request")
    max_abort_ids: int = _limit(1024, "AbortRequest.request_ids", "ids", "most request ids in one Abort")
    # vLLM's --max-logprobs: at most the engine's own bound (MAX_LOGPROBS), checked in __post_init__.
    max_logprobs: int = _limit(20, "sampling_params.logprobs", "top logprobs", "most top logprobs per token")
    # SGLang's /generate on the HTTP port (gateway/generate_route.py): one request is a batch of prompts x n
    # samples, each an engine sequence. Unbounded, a 0.2 MB body asked for 128,000 sequences; every one is a task, a
    # queue entry and, when the client hangs up, an abort (issue 76 item 2).
    # Its default is vLLM's n bound, so one prompt may ask vLLM's most samples.
    max_batch_sequences: int = _limit(16384, "/generate prompts x n", "sequences",
                                      "most sequences (prompts x n samples) in one HTTP /generate request")
    # The body of a route the HTTP front answers from the engine (/generate, /abort_request, the RL control routes):
    # read whole, then parsed (on a worker thread past 256 KiB). json.loads holds the GIL while it parses, about
    # 16 ms per MB of token ids on a 2-core machine, so its size is what bounds every other stream's pause.
    max_http_body_bytes: int = _limit(8 << 20, "HTTP /generate and RL route bodies", "bytes",
                                      "largest body of /generate, /abort_request and the RL control routes on the "
                                      "HTTP port (HTTP 413 beyond it)")

    # The list fields of the HTTP front's /v1/completions, /v1/chat/completions and /generate (gateway/), each
    # refused by its length before any entry is looked at (a 60 MB allowed_token_ids held the event loop 10.9 s,
    # and the engine thread 110 s at n=64: issue 95 items 3 and 4).
    # allowed_token_ids: every id is in [0, vocab_size) and they are de-duplicated, so a list longer than the largest
    # vocabulary served (Gemma's 262,144) only repeats ids; vLLM's clients send a vocabulary subset.
    max_allowed_token_ids: int = _limit(262144, "allowed_token_ids", "ids",
                                        "most allowed_token_ids per request (HTTP)")
    # logit_bias: OpenAI's API takes 300 keys; a quarter of a 262k vocabulary leaves room for banning whole classes
    # of tokens (each key is parsed once per request, ~1 us, and converted once for all n samples).
    max_logit_bias: int = _limit(65536, "logit_bias", "keys", "most logit_bias keys per request (HTTP)")
    # bad_words: vLLM's VLLM_MAX_NUM_BAD_WORDS (128 token sequences after tokenization, engine/core/logits_rules.py)
    max_bad_words: int = _limit(128, "bad_words", "words", "most bad_words per request (HTTP)")
    max_bad_word_chars: int = _limit(256, "bad_words[i]", "characters", "longest bad word (HTTP)")
    # Prompts in one /v1/completions or /generate request, each prepared (tokenized, checked) in turn: 16,384
    # one-id prompts in a 0.1 MB body took 3.7 s. lm-eval sends its --batch_size prompts (1 by default, tens to
    # hundreds when raised), vllm bench one; OpenAI's API took at most 2,048.
    max_prompts_per_request: int = _limit(4096, "prompt (a batch)", "prompts",
                                          "most prompts in one HTTP /v1/completions or /generate request")
    # A non-streamed HTTP answer is built whole before a byte is sent: its size, estimated at admission from
    # prompts x n x max_tokens x (1 + logprobs) and prompt tokens x prompt_logprobs (gateway/answer_budget.py), is
    # bounded so that no request is admitted whose answer the server cannot build (n=64 x 1,000 tokens x logprobs 20
    # is a 36 MB answer; 512 prompts x prompt_logprobs 20 were 663 MB and +4.6 GB of memory). 128 MiB admits
    # lm-eval's scoring batches (64 prompts x 4,096 tokens with echo and logprobs 1: about 80 MB); streamed answers
    # are not bounded by it.
    max_answer_bytes: int = _limit(128 << 20, "a non-streamed HTTP answer (estimated)", "bytes",
                                   "largest non-streamed answer of HTTP /v1/completions, /v1/chat/completions and "
                                   "/generate, estimated at admission (stream=true is not bounded)")

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{f.name}={v!r} is invalid: must be a positive integer.")
        from ..contract.sampling_params import MAX_LOGPROBS

        if self.max_logprobs > MAX_LOGPROBS:
            raise ValueError(f"max_logprobs={self.max_logprobs} is invalid: the engine returns at most {MAX_LOGPROBS} "
                             f"top logprobs per token (--max-logprobs 1 to {MAX_LOGPROBS}).")

    def check(self, name: str, count: int, what: str | None = None) -> None:
        """ValueError when `count` (a length) is over the limit `name`; `what` names the field if not the usual."""
        limit = getattr(self, name)
        if count > limit:
            meta = self.__dataclass_fields__[name].metadata
            raise ValueError(f"{what or meta['proto_field']} has {count} {meta['unit']}: at most {limit} are allowed "
                             f"(--{name.replace('_', '-')}).")

    def check_sampling(self, sp) -> None:
        """The list fields of either service's SamplingParams message, by length only (O(1) per field)."""
        self.check("max_stop_strings", len(sp.stop))
        self.check("max_stop_token_ids", len(sp.stop_token_ids))
        for name in ("logprobs", "prompt_logprobs"):  # the second on VllmEngine's message only
            if name in sp.DESCRIPTOR.fields_by_name and sp.HasField(name) and getattr(sp, name) > self.max_logprobs:
                raise ValueError(f"sampling_params.{name}={getattr(sp, name)} is invalid: at most {self.max_logprobs} "
                                 "top logprobs per token (--max-logprobs).")
        for i, s in enumerate(sp.stop):
            self.check("max_stop_string_chars", len(s), f"sampling_params.stop[{i}]")

    def max_sampling_params_bytes(self) -> int:
        """No SamplingParams message within these limits is larger, on either service: a stop string is at most
        4 bytes a character plus 6 of tag and length, a stop id at most 11 (tag and a 10-byte varint, unpacked),
        and 64 KiB is room for every other field. A larger one is refused before it is parsed."""
        return self.max_stop_strings * (4 * self.max_stop_string_chars + 6) + 11 * self.max_stop_token_ids + (64 << 10)

    def check_n(self, n: int) -> None:
        if not 1 <= n <= self.max_n:
            raise ValueError(f"sampling_params.n={n} is invalid: must be in [1, {self.max_n}] (--max-n).")


# -- flags ------------------------------------------------------------------------
def add_limit_args(p: argparse.ArgumentParser) -> None:
    d = RequestLimits()
    for f in fields(RequestLimits):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=getattr(d, f.name),
                       help=f"{f.metadata['help']} (INVALID_ARGUMENT beyond it; default %(default)s)")


def limits_from(ns: argparse.Namespace) -> RequestLimits:
    return RequestLimits(**{f.name: getattr(ns, f.name) for f in fields(RequestLimits) if hasattr(ns, f.name)})


# -- the table of docs/serving.md --------------------------------------------------
def bad_input_table(limits: RequestLimits | None = None) -> str:
    """Markdown: field -> limit -> status, from the limits the servers enforce."""
    lim = limits or RequestLimits()
    rows = _request_rows(lim) + _sampling_rows(lim) + _other_rows(lim)
    lines = ["| field | limit | refused with |", "|---|---|---|"]
    lines += [f"| {f} | {limit} | {status} |" for f, limit, status in rows]
    lines.append("")
    lines.append("Every list is checked by its length before any of its entries is looked at, and every field of "
                 "every RPC is measured on the wire before the request is parsed (`engine/server/wire_bounds.py`). "
                 "The same checks hold on `--port` and on `--gateway-port`, with or without `--api-key`; a request "
                 "without a valid `--api-key` is refused unparsed. Client values quoted in error messages and logs are "
                 "cut to "
                 f"{MAX_SHOWN_CHARS} characters, with control characters escaped (text logs quote fields "
                 "logfmt-style).")
    lines.append("")
    lines.append("B is the tokenizer's longest token (times what normalization can shrink), so the text bound is "
                 "loose for large vocabularies: with 128-byte tokens and max_model_len 40960 it is about 5 MB, and "
                 "text under it is tokenized (on a worker thread, about 1 s per MB, never on the event loop) "
                 "before its token count can refuse it; cap request sizes with `--max-message-size` where that "
                 "matters.")
    return "\n".join(lines)


_INVALID = "INVALID_ARGUMENT"
Row = tuple[str, str, str]  # (field, limit, refused with)


def _flag(name: str) -> str:
    return f"`--{name.replace('_', '-')}`"


def _request_rows(lim: RequestLimits) -> list[Row]:
    """The table's rows on a request as a whole (its size, metadata, encoding) and its id and prompt."""
    invalid, flag = _INVALID, _flag
    return [
        ("any request", f"at most {DEFAULT_MAX_MESSAGE_SIZE >> 20} MiB (`--max-message-size`), and at most what the "
                        f"largest request within these limits needs (at least {RECEIVE_FLOOR_BYTES >> 20} MiB): "
                        "refused by gRPC from the message's length prefix, before it is received",
         "RESOURCE_EXHAUSTED"),
        ("any request's metadata (headers)", f"at most {MAX_METADATA_BYTES >> 10} KiB in all, refused by gRPC before "
                                             "any handler or key check", "RESOURCE_EXHAUSTED"),
        ("any request", "decodes as its protobuf message, every string valid UTF-8", invalid),
        ("`Generate` (both services)", "each top-level field written once: a request over 4 KiB with 64 or more "
                                       "top-level field occurrences (padding) is refused before parsing", invalid),
        ("`request_id`", f"at most {lim.max_request_id_chars} characters ({flag('max_request_id_chars')}); over "
                         f"{4 * lim.max_request_id_chars} bytes refused before parsing", invalid),
        ("other `Generate` fields (multimodal inputs, KV transfer parameters)",
         f"at most {OTHER_FIELD_MAX_BYTES >> 10} KiB each, refused before parsing (an image model's `mm_inputs` "
         "and `extra_mm_inputs`: its image limits' pixels, up to --max-message-size; with videos on, "
         "--max-message-size; docs/multimodal.md)", invalid),
        ("`prompt` / `text`", "not empty; at most (max_model_len − 1) × B bytes, where B is the most bytes one "
                              "token of the model's tokenizer can stand for (refused before tokenizing, and before "
                              "parsing); with VllmEngine's `truncate_prompt_tokens` only the text's last "
                              "2 × that many bytes are tokenized", invalid),
        ("`prompt_token_ids.ids` / `tokenized.input_ids`", "1 to max_model_len − 1 ids, each in [0, vocab_size), "
                                                           "counted after `truncate_prompt_tokens` when it is set "
                                                           "(-1 keeps what fits beside max_tokens); "
                                                           "refused by the count alone, and before parsing when "
                                                           "the packed ids' bytes / 5 reach max_model_len", invalid),
    ]


def _sampling_rows(lim: RequestLimits) -> list[Row]:
    """The table's rows on its sampling parameters."""
    from ..contract.sampling_params import FLOAT_RANGES, MAX_LOGPROBS

    invalid, flag = _INVALID, _flag
    rows = [
        ("`sampling_params`", f"at most {lim.max_sampling_params_bytes()} bytes, what the limits below allow "
                              "(refused before parsing)", invalid),
        ("`sampling_params.max_tokens`", "at least 1, and prompt tokens + max_tokens at most max_model_len, as in "
                                         "vLLM (refused, never clamped); unset on VllmEngine (or `unlimited_tokens` "
                                         "on moelink.v1, whose unset default is 16): up to the context", invalid),
        ("`sampling_params.n`", f"1 to {lim.max_n} ({flag('max_n')})", invalid),
        ("`sampling_params.stop`", f"at most {lim.max_stop_strings} strings ({flag('max_stop_strings')})", invalid),
        ("`sampling_params.stop[i]`", f"1 to {lim.max_stop_string_chars} characters "
                                      f"({flag('max_stop_string_chars')})", invalid),
        ("`sampling_params.stop_token_ids`", f"at most {lim.max_stop_token_ids} ids "
                                             f"({flag('max_stop_token_ids')}), each in [0, vocab_size)", invalid),
    ]
    rows += [(f"`sampling_params.{name}`", f"a finite number in {allowed}", invalid)
             for name, allowed in FLOAT_RANGES.items()]
    rows.append(
        ("`sampling_params.logprobs`, VllmEngine's `prompt_logprobs`",
         f"0 to {lim.max_logprobs} (`--max-logprobs`, at most {MAX_LOGPROBS}; prompt logprobs: no prefix-cache hit)",
         invalid))
    return rows


def _other_rows(lim: RequestLimits) -> list[Row]:
    """The table's rows on the other methods, the HTTP gateway's bodies, grammars, KV transfer parameters and the
    queues."""
    from ..config.grammar_config import (DEFAULT_GRAMMAR_COMPILE_TIMEOUT_S, DEFAULT_GRAMMAR_COMPILE_WORKERS,
                                         DEFAULT_MAX_GRAMMAR_CHARS, DEFAULT_MAX_QUEUED_GRAMMAR_COMPILES)
    from ..contract.json_depth import MAX_JSON_DEPTH
    from .pd_role import MAX_KV_PARAMS_JSON

    invalid, flag = _INVALID, _flag
    return [
        ("`AbortRequest.request_ids`", f"at most {lim.max_abort_ids} ids ({flag('max_abort_ids')}), each at most "
                                       f"{4 * lim.max_request_id_chars} bytes: counted and measured before parsing",
         invalid),
        ("every other method's request (health, model and server info, loads, reflection, ...)",
         f"at most {SMALL_REQUEST_MAX_BYTES >> 10} KiB, refused before parsing", invalid),
        ("VllmEngine: `logit_bias`, multimodal inputs", "not supported",
         invalid),
        ("`sampling_params.json_schema` / `regex` / `grammar` / `choice` (HTTP: `response_format`, "
         "`structured_outputs`, `guided_*`)", f"at most {DEFAULT_MAX_GRAMMAR_CHARS} characters "
         f"({flag('max_grammar_chars')}), a JSON schema nested at most {MAX_JSON_DEPTH} levels (measured before it "
         f"is parsed); compiled in {DEFAULT_GRAMMAR_COMPILE_WORKERS} child process of its own "
         f"({flag('grammar_compile_workers')}) within {DEFAULT_GRAMMAR_COMPILE_TIMEOUT_S:g} s "
         f"({flag('grammar_compile_timeout')}), dropped or killed once every client waiting for it has left (a "
         "cancelled call, an Abort, an HTTP client that hung up)", invalid),
        ("`kv_transfer_params_json`", f"at most {MAX_KV_PARAMS_JSON} characters, nested at most {MAX_JSON_DEPTH} "
                                      "levels (measured before it is parsed)", invalid),
        ("HTTP request body (chat, completions)", f"JSON nested at most {MAX_JSON_DEPTH} levels, measured before "
                                                  "it is parsed", "HTTP 400, `param` the top-level field"),
        ("HTTP request body of `/generate`, `/abort_request` and the RL control routes",
         f"at most {lim.max_http_body_bytes >> 20} MiB ({flag('max_http_body_bytes')}), refused from its "
         "Content-Length before it is read; parsed on a worker thread past 256 KiB", "HTTP 413"),
        ("HTTP `allowed_token_ids`", f"at most {lim.max_allowed_token_ids} ids ({flag('max_allowed_token_ids')}), "
                                     "each in [0, vocab_size); de-duplicated and converted once for all n samples",
         "HTTP 400, `param` allowed_token_ids"),
        ("HTTP `logit_bias`", f"at most {lim.max_logit_bias} keys ({flag('max_logit_bias')}), each a token id in "
                              "[0, vocab_size), biases clamped to [-100, 100]", "HTTP 400, `param` logit_bias"),
        ("HTTP `bad_words`", f"at most {lim.max_bad_words} words ({flag('max_bad_words')}), each 1 to "
                             f"{lim.max_bad_word_chars} characters ({flag('max_bad_word_chars')}), tokenized once",
         "HTTP 400, `param` bad_words"),
        ("HTTP `stop`, `stop_token_ids`", "as `sampling_params.stop` and `stop_token_ids` above, counted before any "
                                          "entry is read", "HTTP 400, `param` the field"),
        ("HTTP prompts of `/v1/completions` and `/generate`", f"at most {lim.max_prompts_per_request} prompts "
                                                              f"({flag('max_prompts_per_request')}), each at most "
                                                              "max_model_len − 1 token ids (counted first)",
         "HTTP 400, `param` the prompts' field"),
        ("HTTP non-streamed answer (completions, chat, `/generate`)",
         f"at most {lim.max_answer_bytes >> 20} MiB ({flag('max_answer_bytes')}), estimated at admission from "
         "prompts × n × max_tokens × (1 + logprobs) and prompt tokens × prompt_logprobs; `stream: true` is not "
         "bounded", "HTTP 400, `param` the fields that make it"),
        ("any HTTP string field (prompt, messages, stop, bad_words, request_id, user, model, tools, ...)",
         "valid Unicode (no lone surrogate such as `\\ud800`); `request_id` printable, at most "
         f"{lim.max_request_id_chars} characters", "HTTP 400, `param` the field"),
        ("HTTP `/generate` prompts x `sampling_params.n`", f"at most {lim.max_batch_sequences} sequences "
                                                           f"({flag('max_batch_sequences')})",
         "HTTP 400, `param` the prompts' field"),
        ("grammars waiting to compile", f"at most {DEFAULT_MAX_QUEUED_GRAMMAR_COMPILES} "
                                        f"({flag('max_queued_grammar_compiles')})", "RESOURCE_EXHAUSTED"),
        ("requests waiting for their first token", "`--max-queued-requests` (counts sequences: a request with n "
                                                   "samples counts n), `--max-queued-tokens` (default: no limit); "
                                                   "an empty queue admits one request of any size",
         "RESOURCE_EXHAUSTED"),
    ]


DOC_PAGE = "docs/serving.md"  # the page that holds the table, relative to the repository root
BEGIN_MARK = "<!-- bad-input-table: generated by `python -m moelink.engine.server.limits --doc docs/serving.md`; " \
             "a test keeps it equal -->"
END_MARK = "<!-- /bad-input-table -->"


def doc_table(page: str) -> str | None:
    """The table between a page's markers, or None when they are missing."""
    start, end = page.find(BEGIN_MARK), page.find(END_MARK)
    return None if start < 0 or end < 0 else page[start + len(BEGIN_MARK) + 1:end - 1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=f"Print the bad-input table of {DOC_PAGE}, or rewrite it in place.")
    p.add_argument("--doc", nargs="?", const=DOC_PAGE, default=None, metavar="PAGE",
                   help=f"rewrite the table between the markers in this file (alone: {DOC_PAGE})")
    ns = p.parse_args(argv)
    if ns.doc is None:
        print(bad_input_table())
        return 0
    with open(ns.doc) as f:
        text = f.read()
    old = doc_table(text)
    if old is None:
        raise SystemExit(f"{ns.doc} has no {BEGIN_MARK} ... {END_MARK} section")
    with open(ns.doc, "w") as f:
        f.write(text.replace(f"{BEGIN_MARK}\n{old}\n{END_MARK}", f"{BEGIN_MARK}\n{bad_input_table()}\n{END_MARK}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
