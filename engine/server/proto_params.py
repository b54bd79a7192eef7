"""One proto -> SamplingParams converter for both gRPC services; each protocol says how it reads its fields.

The native `moelink.v1` proto marks optional fields with proto3 presence; vLLM's proto reads 0 as "the
default" for some fields and has no presence for others. Everything else is shared and lives here once: the
size limits checked before anything is read, the fields a protocol refuses, structured output, and one
ValueError naming the field for a bad value.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from ..contract.sampling_params import SamplingParams
from .limits import RequestLimits
from .serving import optional, structured_from_proto, wire_message

# How a protocol reads one SamplingParams field from its proto message.
FieldReader = Callable[[object], object]


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
    refuse: tuple[tuple[Callable[[object], bool], str], ...] = ()


def sampling_params_from_proto(sp, reading: ProtoReading, limits: RequestLimits = RequestLimits()
                               ) -> tuple[SamplingParams, int]:
    """(engine SamplingParams, n); ValueError naming the field on a bad value (lists checked by length first)."""
    limits.check_sampling(sp)
    for refused, message in reading.refuse:
        if refused(sp):
            raise ValueError(message)
    try:
        params = SamplingParams(**{name: read(sp) for name, read in reading.fields.items()},
                                structured_outputs=structured_from_proto(sp))
    except ValueError as exc:
        raise ValueError(wire_message(str(exc))) from None
    return params, reading.n(sp)


__all__ = ["ProtoReading", "listed", "plain", "present", "sampling_params_from_proto", "zero_means"]
