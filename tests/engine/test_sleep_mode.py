"""Memory back to the trainer (`LLM.sleep` / `wake_up`, SGLang's release / resume_memory_occupation;
engine/rl/memory.py, engine/rl/rank/sleep_mode.py; docs/rl.md). The tensors stay the same objects, their storages
emptied and given back: sleep(1) frees every weight and KV byte (their nbytes measured) and wake_up gives the same
greedy tokens; requests are refused while asleep, naming why; sleep(2) drops the weights, an update from disk fills
them, and after wake_up the new model answers (equal to the new checkpoint's own engine). Requests are refused after
a wake-up of level 2 without an update (the weights are not whole)."""
from __future__ import annotations

import pytest

from moelink.engine import LLM, SamplingParams
from moelink.engine.tools.tiny_model import make_tiny_model

from tests.helpers.parity import assert_pool_free, engine_greedy, prompts
from tests.helpers.tiny_configs import TINY_CONFIGS

pytestmark = pytest.mark.usefixtures("heap_held_frozen")
KW = dict(dtype="float32", num_kv_blocks=32, block_size=4, enable_weight_updates=True)


def _device_bytes(llm) -> tuple[int, int]:
    """The bytes the rank's weights and KV cache hold now (their storages)."""
    runner = llm.engine.executor.runner
    seen: set = set()

    def total(tensors) -> int:
        n = 0
        for t in tensors:
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                n += s.nbytes()
        return n

    kv = [t for layer in runner.kv_caches for t in (layer if isinstance(layer, (tuple, list)) else (layer,))]
    return total(list(runner.model.parameters()) + list(runner.model.buffers())), total(kv)


@pytest.mark.slow
def test_sleep_1_then_wake_gives_the_same_tokens(tiny_model):
    llm = LLM(tiny_model("qwen3_e6k3"), **KW)
    ps = prompts(TINY_CONFIGS["qwen3_e6k3"]["vocab_size"], seed=41, n=3, lo=2, hi=20)
    before = engine_greedy(llm, ps)
    weights, kv = _device_bytes(llm)
    params = list(llm.engine.executor.runner.model.parameters())
    info = llm.sleep(1)
    assert info["bytes_freed"] == weights + kv and _device_bytes(llm) == (0, 0)
    with pytest.raises(RuntimeError, match=r"requests are refused: the engine is asleep \(sleep\(level=1\); "
                                           r"weights, kv_cache released\): wake_up first"):
        llm.generate(ps[:1], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="the engine is asleep already"):
        llm.sleep(1)
    woke = llm.wake_up()
    assert woke["bytes"] == weights + kv and _device_bytes(llm) == (weights, kv)
    assert list(llm.engine.executor.runner.model.parameters())[0] is params[0]  # the same tensor objects
    assert engine_greedy(llm, ps) == before
    assert_pool_free(llm)


@pytest.mark.slow
def test_sleep_2_then_update_then_wake_serves_the_new_model(tiny_model, tmp_path):
    a = tiny_model("qwen3_e6k3")
    b = str(make_tiny_model(tmp_path / "b", **{**TINY_CONFIGS["qwen3_e6k3"], "seed": 1}))
    ps = prompts(TINY_CONFIGS["qwen3_e6k3"]["vocab_size"], seed=43, n=3, lo=2, hi=20)
    want = engine_greedy(LLM(b, **KW), ps)
    llm = LLM(a, **KW)
    assert engine_greedy(llm, ps) != want
    llm.release_memory_occupation()  # SGLang's name: level 1
    llm.resume_memory_occupation()
    info = llm.sleep(2)
    assert info["bytes_freed"] > 0
    llm.update_weights_from_disk(b, weight_version="b")  # fills the dropped weights (the rank gives them bytes first)
    with pytest.raises(RuntimeError, match=r"asleep .*kv_cache released"):
        llm.generate(ps[:1], SamplingParams(max_tokens=2), use_tqdm=False)
    llm.wake_up(["kv_cache"])
    assert engine_greedy(llm, ps) == want
    llm.sleep(2)
    llm.wake_up()  # no update: the weights are not whole
    with pytest.raises(RuntimeError, match=r"the weights were dropped by sleep\(level=2\)"):
        llm.generate(ps[:1], SamplingParams(max_tokens=2), use_tqdm=False)
    llm.update_weights_from_disk(a)
    assert engine_greedy(llm, ps) != want
    assert_pool_free(llm)


def test_bad_sleep_calls(tiny_model):
    llm = LLM(tiny_model("qwen3_e6k3"), **KW)
    with pytest.raises(ValueError, match="level=3 is invalid: choose from 1, 2"):
        llm.sleep(3)
    with pytest.raises(ValueError, match=r"tags=\['gpu'\] is invalid"):
        llm.wake_up(["gpu"])
    llm.engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="sleep is refused while requests run"):
        llm.sleep(1)
    llm.engine.abort_requests(["r"])
    off = LLM(tiny_model("qwen3_e6k3"), dtype="float32", num_kv_blocks=16, block_size=4)
    with pytest.raises(ValueError, match=r"sleep is refused: start the engine with enable_weight_updates=True"):
        off.sleep(1)
