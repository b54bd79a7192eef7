"""A model announced and served elsewhere whose definition the locked transformers lacks (engine/config/awaited.py;
DeepSeek-V4.1 and Kimi K3 were, and are served now: tests/engine/test_deepseek_v41.py, test_kimi_k3.py): a
checkpoint of one is refused naming the model and the transformers it waits for (issue 57), not as an unknown
architecture; the version named is the one the lock pins and the one installed."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import transformers

from moelink.engine.config.awaited import LOCKED_TRANSFORMERS
from moelink.engine.config.model import ModelConfig

ROOT = Path(__file__).resolve().parents[2]


def test_locked_version_is_the_lock_and_the_installed_one():
    for lock in ("lock-cpu.txt", "lock-gpu.txt"):
        pinned = re.search(r"^transformers==(\S+)$", (ROOT / "requirements" / lock).read_text(), re.M).group(1)
        assert pinned.startswith(LOCKED_TRANSFORMERS + "."), (lock, pinned)
    assert transformers.__version__.startswith(LOCKED_TRANSFORMERS + ".")


@pytest.mark.parametrize("raw,name", [
    ({"architectures": ["ExampleX1ForCausalLM"], "model_type": "example_x1"}, "Example-X1"),
    ({"architectures": ["SomethingForCausalLM"], "model_type": "example_x1"}, "Example-X1"),
])
def test_awaited_models_are_refused_naming_the_transformers_they_wait_for(tmp_path, monkeypatch, raw, name):
    # An entry of the table's shape stands in (DeepSeek-V4.1 and Kimi K3 were awaited, and are served since).
    from moelink.engine.config import awaited

    monkeypatch.setattr(awaited, "AWAITED", (awaited.Awaited("Example-X1", "its new blocks", ("example_x1",),
                                                             ("ExampleX1ForCausalLM",)),))
    (tmp_path / "config.json").write_text(json.dumps({**raw, "hidden_size": 64}))
    with pytest.raises(ValueError) as e:
        ModelConfig.from_pretrained(str(tmp_path))
    msg = str(e.value)
    assert f"is {name}, which transformers {LOCKED_TRANSFORMERS} " in msg
    assert f"the first transformers release after {LOCKED_TRANSFORMERS} that implements {name}" in msg


def test_longcat_flash_lite_is_awaited(tmp_path):
    """LongCat-Flash-Lite (LongcatFlashNgramForCausalLM, issue 96): its n-gram embedding is in no transformers
    release; refused by its architecture whatever model_type its file spells (LongCat-Flash's own included)."""
    raw = {"architectures": ["LongcatFlashNgramForCausalLM"], "model_type": "longcat_flash", "hidden_size": 64}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=rf"is LongCat-Flash-Lite, which transformers {LOCKED_TRANSFORMERS} .*its "
                                         rf"n-gram embedding tables come with the first transformers release"):
        ModelConfig.from_pretrained(str(tmp_path))


def test_an_unknown_architecture_is_still_refused_listing_what_runs(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"], "model_type": "foo"}))
    with pytest.raises(ValueError, match=r"architectures=\['FooForCausalLM'\] is not supported: moelink runs "):
        ModelConfig.from_pretrained(str(tmp_path))
