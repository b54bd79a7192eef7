"""The kernel seam (kernels/ops.py, kernels/registry.py): each family's protocol states its ops with their references'
signatures, `Kernels` is every registered family, and every backend gives each op, taking at least its reference's
arguments."""
from __future__ import annotations

import inspect
import sys
from typing import Protocol

import pytest
import torch

from moelink.kernels import registry
from moelink.kernels.ops import (FAMILIES, REFERENCES, Kernels, NativeCpuKernels, ReferenceKernels, TritonKernels,
                                 select_kernels)


def ops_of_protocol() -> set[str]:
    return set(registry.protocol_ops(Kernels))


def test_the_protocol_lists_each_op_with_its_reference():
    assert ops_of_protocol() == set(REFERENCES)
    assert sum(len(f.ops) for f in FAMILIES) == len(REFERENCES)  # no op in two families


def test_kernels_is_every_registered_family():
    """A family module that registered but is missing from `Kernels`' bases would never reach a backend."""
    assert {f.name for f in registry.registered()} == {f.name for f in FAMILIES}
    assert [f.protocol for f in FAMILIES] == [b for b in Kernels.__bases__ if b is not Protocol]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_each_protocol_signature_is_its_references(family):
    """The protocol is the contract mypy checks the call sites against: the reference's names, kinds, defaults,
    annotations and return annotation, op by op."""
    for op in family.ops:
        params = list(inspect.signature(getattr(family.protocol, op)).parameters.values())
        assert params[0].name == "self"
        declared = inspect.Signature(params[1:], return_annotation=inspect.signature(
            getattr(family.protocol, op)).return_annotation)
        assert declared == inspect.signature(family.reference[op]), f"{family.protocol.__name__}.{op}"


def test_registering_checks_the_names_against_the_protocol():
    class Two(Protocol):
        def a(self) -> None: ...

        def b(self) -> None: ...

    with pytest.raises(TypeError, match=r"references for \['a'\], Two declares \['a', 'b'\]"):
        registry.register("test-two", Two, reference=dict(a=lambda: None), triton=dict)
    assert "test-two" not in {f.name for f in registry.registered()}

    class Stolen(Protocol):
        def rms_norm(self) -> None: ...

    with pytest.raises(ValueError, match="already family 'norm'"):
        registry.register("test-stolen", Stolen, reference=dict(rms_norm=lambda: None), triton=dict)


def test_no_triton_module_is_imported_until_a_triton_backend_is_built():
    import subprocess

    code = ("import sys; import moelink.kernels.ops as o; o.ReferenceKernels(); o.select_kernels('cpu');"
            "print(sorted(m for m in sys.modules if m.startswith('moelink.kernels.triton') or m == 'triton'"
            " or m.startswith('moelink.kernels.fla')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("backend", [ReferenceKernels, NativeCpuKernels, TritonKernels], ids=lambda b: b.name)
def test_each_backend_takes_the_references_arguments(backend):
    kernels = backend()
    assert isinstance(kernels.name, str)
    for op, ref in REFERENCES.items():
        params = inspect.signature(getattr(kernels, op)).parameters
        ref_params = inspect.signature(ref).parameters
        takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        # A call written against the reference works: the backend accepts each of its arguments ...
        for name in ref_params:
            assert name in params or takes_kwargs, f"{backend.name}.{op} lacks the reference's argument {name!r}"
        # ... and requires nothing the reference does not have.
        for name, p in params.items():
            required = p.default is inspect.Parameter.empty and p.kind not in (
                inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
            assert not required or name in ref_params, f"{backend.name}.{op} requires {name!r}, unknown to the reference"


def test_the_reference_backend_is_the_references():
    kernels = ReferenceKernels()
    assert all(getattr(kernels, op) is fn for op, fn in REFERENCES.items())


def test_each_triton_backend_has_its_own_int4_workspace():
    a, b = TritonKernels(), TritonKernels()
    assert a.int4_workspace is not b.int4_workspace
    assert a.fused_moe_int4.keywords["workspace"] is a.int4_workspace


def test_select_kernels_names_the_backends(monkeypatch):
    # auto on a CPU: the native kernels where they build (this machine has a C compiler), else the references.
    assert select_kernels(torch.device("cpu")).name == "cpu_native"
    monkeypatch.setenv("MOELINK_CPU_NATIVE", "0")
    assert select_kernels(torch.device("cpu")).name == "reference"
    with pytest.raises(ValueError, match="kernels='cpu_native' is not available"):
        select_kernels(torch.device("cpu"), "cpu_native")
    with pytest.raises(ValueError, match=r"kernels='cuda' is invalid: choose from \['batch_invariant', 'batch_invariant_triton', 'cpu_native', 'reference', 'triton'\]"):
        select_kernels(torch.device("cpu"), "cuda")
