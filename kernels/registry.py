"""The kernel registry: each kernel family registers its ops from its own module (ARCHITECTURE.md: Design rules 8).

A family is one `Protocol` of ops with real signatures (`kernels/ops_<family>.py`: each op's signature is its
plain-torch reference's, the contract and the test oracle), registered with

    registry.register("norm", NormKernels, reference=dict(rms_norm=reference_rms_norm, ...), triton=_triton)

`reference` gives the references under the protocol's names; `triton` is a loader that imports the family's Triton
modules and returns its Triton ops under the same names (and any state a backend keeps beside them: the MoE
family's `int4_workspace`). A loader runs each time a Triton backend is built, never at import: Triton decides at
kernel definition whether a kernel runs compiled or in the CPU interpreter (TRITON_INTERPRET=1), and tests replace a
Triton module's function before they build one. `kernels/ops.py` composes the families into `Kernels` and
assembles each backend from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

Op = Callable[..., Any]
TritonLoader = Callable[[], Mapping[str, Any]]


def protocol_ops(protocol: type) -> tuple[str, ...]:
    """The ops a kernel protocol declares (its public methods, its protocol bases' included), in declaration order."""
    names: list[str] = []
    for cls in protocol.__mro__:
        if cls in (object, Protocol) or not getattr(cls, "_is_protocol", False):
            continue
        names += [n for n, v in vars(cls).items() if callable(v) and not n.startswith("_") and n not in names]
    return tuple(names)


@dataclass(frozen=True)
class Family:
    name: str
    protocol: type
    reference: Mapping[str, Op]
    triton: TritonLoader

    @property
    def ops(self) -> tuple[str, ...]:
        return protocol_ops(self.protocol)

    def load_triton(self) -> dict[str, Any]:
        """The family's Triton ops (and kept state), its Triton modules imported now."""
        got = dict(self.triton())
        missing = [op for op in self.ops if op not in got]
        if missing:
            raise TypeError(f"kernel family {self.name!r}: its Triton loader gives no {missing}")
        return got


_FAMILIES: dict[str, Family] = {}


def register(name: str, protocol: type, *, reference: Mapping[str, Op], triton: TritonLoader) -> None:
    """Register a kernel family: its protocol, its references under the protocol's op names, its Triton loader."""
    ops = protocol_ops(protocol)
    if not ops:
        raise TypeError(f"kernel family {name!r}: {protocol.__name__} declares no ops")
    if set(reference) != set(ops):
        raise TypeError(f"kernel family {name!r}: references for {sorted(reference)}, "
                        f"{protocol.__name__} declares {sorted(ops)}")
    for other in _FAMILIES.values():
        if other.name != name and set(other.ops) & set(ops):
            raise ValueError(f"kernel family {name!r} registers {sorted(set(other.ops) & set(ops))}, "
                             f"already family {other.name!r}'s")
    _FAMILIES[name] = Family(name, protocol, dict(reference), triton)


def families(protocol: type) -> tuple[Family, ...]:
    """The registered families a composed protocol (`kernels.ops.Kernels`) is made of, in its bases' order; each of
    its protocol bases that declares ops must be registered."""
    by_protocol = {f.protocol: f for f in _FAMILIES.values()}
    found = []
    for base in protocol.__mro__:
        if base in by_protocol:
            found.append(by_protocol[base])
        elif base is not protocol and getattr(base, "_is_protocol", False) and base is not Protocol and any(
                callable(v) and not n.startswith("_") for n, v in vars(base).items()):
            raise TypeError(f"{protocol.__name__}: its base {base.__name__} is not a registered kernel family")
    return tuple(found)


def registered() -> tuple[Family, ...]:
    """Every family registered so far (their modules imported)."""
    return tuple(_FAMILIES.values())


__all__ = ["Family", "Op", "TritonLoader", "families", "protocol_ops", "register", "registered"]
