"""The native CPU kernels' build (kernels/cpu_native_build.py): one file per key in its cache, readable as the umask
allows, an AVX2 build beside the machine's own, a compiler command with arguments; and every way it can fail (no
compiler, a compiler that fails, an unwritable cache, switched off) leaving the plain-torch references running with
one warning."""
from __future__ import annotations

import logging
import os
import platform

import pytest
import torch

from moelink.kernels import cpu_native as cn
from moelink.kernels import cpu_native_build as build
from moelink.kernels.norm import reference_rms_norm

pytestmark = pytest.mark.skipif(build.library() is None, reason="no C compiler here: the references run")


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A build cache of its own and no library loaded yet in this process."""
    monkeypatch.setenv("MOELINK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build, "_loaded", {})
    return tmp_path


def test_the_library_is_built_once_per_key_into_its_cache(fresh_build, monkeypatch):
    assert build.library() is not None
    first = sorted((fresh_build / "cpu_native").glob("cpu_ops-*.so"))
    assert len(first) == 1
    monkeypatch.setattr(build, "_loaded", {})
    assert build.library() is not None  # loaded from the cache
    assert sorted((fresh_build / "cpu_native").glob("cpu_ops-*.so")) == first
    assert all(p.stat().st_mode & 0o044 == 0o044 & ~_umask() for p in first)  # readable where the umask allows
    if platform.machine().lower() in ("x86_64", "amd64"):
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")  # torch held at AVX2: a build for AVX2 beside it
        assert build.isa_flags() == ("-mavx2", "-mfma")
        assert build.library() is not None
        assert len(list((fresh_build / "cpu_native").glob("cpu_ops-*.so"))) == 2
    assert not list((fresh_build / "cpu_native").glob(".build-*"))  # no temporary file left
    # A compiler command with arguments (`ccache gcc`): split, found, asked its version (no build needed to tell).
    assert build._compiler_version(["env", "cc"]) is not None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_without_a_compiler_the_references_run(fresh_build, monkeypatch, caplog):
    from moelink.kernels.ops import select_kernels

    monkeypatch.setenv("CC", "moelink-no-such-compiler")
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        assert build.library() is None
    assert "no C compiler 'moelink-no-such-compiler'" in caplog.text
    assert select_kernels(torch.device("cpu")).name == "reference"
    x, w = torch.randn(2, 8), torch.randn(8)
    assert torch.equal(cn.native_rms_norm(x, w, 1e-6), reference_rms_norm(x, w, 1e-6))
    failing = fresh_build / "failing-cc"  # answers --version, then cannot compile
    failing.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo failing-cc 1.0; exit 0; fi\n"
                       "echo 'failing-cc: cannot compile' >&2; exit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        assert build.library() is None
    assert "failing-cc: cannot compile" in caplog.text
    assert not list((fresh_build / "cpu_native").glob("*"))  # nothing half-built left


def test_an_unwritable_cache_leaves_the_references_running(monkeypatch, tmp_path, caplog):
    """A cache folder that cannot be made: one warning, auto picks the references, and the sampler's greedy pick
    (which asks for the library at every step) still answers."""
    from moelink.kernels.ops import select_kernels

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MOELINK_CACHE_DIR", str(blocker / "under-a-file"))
    monkeypatch.setattr(build, "_loaded", {})
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        assert build.library() is None
        assert build.library() is None  # memoised: one warning
    assert caplog.text.count("native CPU kernels unavailable") == 1
    assert select_kernels(torch.device("cpu")).name == "reference"
    logits = torch.randn(3, 17)
    assert torch.equal(cn.greedy_ids(logits), logits.argmax(dim=-1))


def test_switched_off_nothing_is_built(fresh_build, monkeypatch):
    monkeypatch.setenv("MOELINK_CPU_NATIVE", "0")
    assert build.library() is None
    assert not (fresh_build / "cpu_native").exists()
