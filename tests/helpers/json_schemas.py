"""Random JSON schemas for the structured-output property tests (not a test module), and the random walk that
plays a model: from a compiled grammar, any token its mask allows, until the grammar ends.

The schemas draw on the keywords moelink enforces: strings with lengths, patterns (with the characters JSON
must escape among them) and formats, enums and consts, integers and numbers with and without ranges, nested
objects, arrays with and without bounds, nullable types."""
from __future__ import annotations

import random

import numpy as np

PATTERNS = [r"^[a-z]{2,5}$", r"^\d{3}-\d{2}$", r"^[ -~]{1,6}$", r'^"[a-z]+"$', r"^a\\b$", r"^[\s\S]{0,4}$",
            r"^.{1,5}$", r"^(x|\"y\"|\n)+$", r"^[^a-z]{1,4}$", r"[0-9]+", r"^[\x00-\x1f]{1,3}$", r"^\w+@\w+\.com$",
            r"^é+ü?$", r"^[\^\-\]]{1,3}$"]
FORMATS = ["date", "time", "date-time", "duration", "email", "ipv4", "ipv6", "uuid", "hostname", "uri", "uri-reference",
           "uri-template", "json-pointer", "idn-hostname", "iri-reference",
           "relative-json-pointer", "idn-email", "iri"]
ENUM_VALUES = ["red", 'say "hi"', "tab\there", "back\\slash", "\u0001ctl", "é", 3, -1.5, True, None]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    kinds = ["string", "lengths", "pattern", "format", "enum", "integer", "number", "boolean", "nullable"]
    if depth < 2:
        kinds += ["object", "array", "object"]
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string"}
    if kind == "lengths":
        lo = rng.randint(0, 4)
        return rng.choice([{"type": "string", "minLength": lo, "maxLength": lo + rng.randint(0, 12)},
                           {"type": "string", "maxLength": rng.randint(1, 8)}, {"type": "string", "minLength": lo}])
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(PATTERNS)}
    if kind == "format":
        return {"type": "string", "format": rng.choice(FORMATS)}
    if kind == "enum":
        return rng.choice([{"enum": rng.sample(ENUM_VALUES, rng.randint(1, 4))}, {"const": rng.choice(ENUM_VALUES)}])
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return rng.choice([{"type": "integer"}, {"type": "integer", "minimum": lo},
                           {"type": "integer", "maximum": lo}, {"type": "integer", "minimum": lo, "maximum": lo + 99},
                           {"type": "integer", "exclusiveMinimum": lo, "exclusiveMaximum": lo + 9},
                           {"type": "integer", "multipleOf": rng.randint(2, 7)}])
    if kind == "number":
        lo = round(rng.uniform(-20, 20), 2)
        return rng.choice([{"type": "number"}, {"type": "number", "minimum": lo},
                           {"type": "number", "minimum": lo, "maximum": lo + 5},
                           {"type": "number", "exclusiveMinimum": lo, "exclusiveMaximum": lo + 1.5}])
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "nullable":
        return rng.choice([{"type": ["string", "null"], "maxLength": 6}, {"type": ["integer", "null"]}])
    if kind == "array":
        lo = rng.randint(0, 2)
        items = random_schema(rng, depth + 1)
        return rng.choice([{"type": "array", "items": items}, {"type": "array", "items": items, "minItems": lo,
                                                                 "maxItems": lo + rng.randint(0, 3)}])
    props = {f"k{i}" if rng.random() < 0.8 else rng.choice(['q"uote', "b\\s", "ctl\u0002", "é"]):
             random_schema(rng, depth + 1) for i in range(rng.randint(1, 4))}
    return {"type": "object", "properties": props, "required": sorted(props)[: rng.randint(0, len(props))],
            "additionalProperties": rng.random() < 0.2}


# (decoded vocabulary, stop ids) -> (which ids stop, the ids that can close something): the same for every grammar
# compiled on one tokenizer, and a scan of the whole vocabulary in Python, so worked out once per tokenizer, not once
# per walk (480 walks in tests/engine/test_json_schema_grammar.py).
_VOCAB_MASKS: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _vocab_masks(vocab: list[bytes], stop_ids) -> tuple[np.ndarray, np.ndarray]:
    key = (tuple(vocab), tuple(stop_ids))
    if key not in _VOCAB_MASKS:
        stops = set(stop_ids)
        is_stop = np.zeros(len(vocab), dtype=bool)
        is_stop[list(stops)] = True
        closing = np.array([i for i, b in enumerate(vocab) if i not in stops and any(c in b for c in b'"}],')])
        _VOCAB_MASKS[key] = is_stop, closing
    return _VOCAB_MASKS[key]


def random_walk(compiled, rng: random.Random, max_steps: int = 600, close_bias: float = 0.2,
                stop_bias: float = 0.5, vocab: list[bytes] | None = None) -> tuple[bytes, bool]:
    """(the bytes written, whether the grammar ended) for one walk over the compiled grammar's own vocabulary.
    Each step takes any token the mask allows; with probability `close_bias` it prefers one that can close
    something (a quote, a bracket, a comma), and an allowed stop token with probability `stop_bias`, so most walks
    end. With both 0 it is adversarial: a stop token only when nothing else is allowed. `vocab`: the grammar's
    tokenizer's decoded vocabulary when the caller holds it (reading `decoded_vocab` converts the whole vocabulary
    again, on every call: most of a short walk's cost)."""
    import xgrammar as xgr

    info = compiled.tokenizer_info
    vocab = info.decoded_vocab if vocab is None else vocab
    is_stop, closing = _vocab_masks(vocab, info.stop_token_ids)
    matcher = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    out = bytearray()
    for _ in range(max_steps):
        if matcher.is_terminated():
            return bytes(out), True
        matcher.fill_next_token_bitmask(mask)
        bits = np.unpackbits(mask[0].numpy().view(np.uint8), bitorder="little")[: info.vocab_size]
        allowed = np.flatnonzero(bits)
        # The allowed ids split in order (numpy, not a Python loop per id: the walks' main cost once): the same
        # picks from the same draws of `rng` as lists would give.
        stopping = is_stop[allowed]
        stop, others = allowed[stopping], allowed[~stopping]
        if stop.size and (rng.random() < stop_bias or not others.size):
            token = int(stop[0])
        elif close_bias and rng.random() < close_bias and (pick := np.intersect1d(others, closing)).size:
            token = int(rng.choice(list(pick)))
        else:
            token = int(rng.choice(others))
        assert matcher.accept_token(token)
        if not is_stop[token]:
            out += vocab[token]
    return bytes(out), matcher.is_terminated()
