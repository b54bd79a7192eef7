"""One proto -> SamplingParams converter for both gRPC services; each protocol says how it reads its fields.

The native `moelink.v1` proto marks optional fields with proto3 presence; vLLM's proto reads 0 as "the
default" for some fields and has no presence for others. Everything else is shared and lives here once: the
size limits checked before anything is read, the fields a protocol refuses, structured output, and one
ValueError naming the field for a bad value.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..contract.sampling_params import FLOAT_RANGES, SamplingParams
from .limits import RequestLimits
from .serving import optional, structured_from_proto, wire_message

# How a protocol reads one SamplingParams field from its proto message (Any: the generated messages are untyped).
FieldReader = Callable[[Any], object]


def present(field: str, default=None) -> FieldReader:
    """A proto3 `optional` field: its value when set, else `default`."""
    return lambda sp: optional(sp, field, default)


def zero_means(field: str, default) -> FieldReader:
    """A field whose zero (unset in proto3) means `default`."""
    return lambda sp: getattr(sp, field) or default


def plain(field: str) -> FieldReader:
    return lambda sp: getattr(sp, field)


def listed(field: str) -> FieldReader:
    """A repeated field, as a list."""
    return lambda sp: list(getattr(sp, field))


@dataclass(frozen=True)
class ProtoReading:
    """One protocol's reading of its SamplingParams message."""

    fields: Mapping[str, FieldReader]  # SamplingParams field name -> how to read it
    n: FieldReader  # completions per request
    # (predicate on the message, the error when it holds): fields this protocol carries and we refuse.
    refuse: tuple[tuple[Callable[[Any], bool], str], ...] = ()


def as_sent(value):
    """A proto `float` field (float32) as the decimal its sender wrote: the shortest one that rounds to the same
    float32. Read as it arrives, repetition_penalty=0.01 is 0.009999999776 and fell below its documented
    minimum; 0.7 would be 0.699999988. Anything else (None, an int, a value no decimal round-trips) is
    returned as it is."""
    if not isinstance(value, float) or not math.isfinite(value):
        return value
    try:
        for digits in range(1, 10):  # 9 significant digits round-trip every float32
            text = float(f"{value:.{digits}g}")
            if struct.unpack("<f", struct.pack("<f", text))[0] == value:
                return text
    except OverflowError:  # not a float32 at all
        pass
    return value


def sampling_params_from_proto(sp, reading: ProtoReading, limits: RequestLimits = RequestLimits()
                               ) -> tuple[SamplingParams, int]:
    """(engine SamplingParams, n); ValueError naming the field on a bad value (lists checked by length first)."""
    limits.check_sampling(sp)
    for refused, message in reading.refuse:
        if refused(sp):
            raise ValueError(message)
    try:
        values = {name: read(sp) for name, read in reading.fields.items()}
        for name in FLOAT_RANGES.keys() & values.keys():
            values[name] = as_sent(values[name])
        params = SamplingParams(**values, structured_outputs=structured_from_proto(sp))
    except ValueError as exc:
        raise ValueError(wire_message(str(exc))) from None
    return params, reading.n(sp)


__all__ = ["ProtoReading", "listed", "plain", "present", "sampling_params_from_proto", "zero_means"]
