"""Every kernel backend gives each op of the `Kernels` protocol, taking at least its reference's arguments."""
from __future__ import annotations

import inspect
import typing

import pytest
import torch

from moelink.kernels.ops import REFERENCES, Kernels, ReferenceKernels, TritonKernels, select_kernels


def ops_of_protocol() -> set[str]:
    return {n for n in typing.get_type_hints(Kernels) if n != "name"}


def test_the_protocol_lists_each_op_with_its_reference():
    assert ops_of_protocol() == set(REFERENCES)


@pytest.mark.parametrize("backend", [ReferenceKernels, TritonKernels], ids=lambda b: b.name)
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


def test_select_kernels_names_the_backends():
    assert select_kernels(torch.device("cpu")).name == "reference"
    with pytest.raises(ValueError, match=r"kernels='cuda' is invalid: choose from \['reference', 'triton'\]"):
        select_kernels(torch.device("cpu"), "cuda")
