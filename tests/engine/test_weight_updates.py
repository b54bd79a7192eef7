"""Weights while serving (`LLM.update_weights_from_disk`, engine/rl/weights.py; docs/rl.md): a checkpoint of the same
architecture with new values written in place, after which greedy tokens equal transformers' on the new checkpoint
(float64) and going back equals the old one's: on Qwen3-MoE, on Qwen3-Next (zero-centred norms converted at load,
linear-attention layers) and on LongCat-Flash (MLA's q and latent scales folded at load), so a conversion applies to
the written weights once, never twice. The prefix cache is flushed (a prompt cached before is computed again); a
checkpoint whose tensors differ, an update while requests run and bad arguments are refused naming the field, the
served weights untouched. `update_weights_from_tensor` writes the named tensors alone (float32 values into a
float64 model: cast as written), its conversions for those alone, equal to transformers with the same tensors
replaced."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from moelink.engine import LLM, SamplingParams

from tests.helpers.hf_checkpoints import save_hf_checkpoint
from tests.helpers.longcat_checkpoints import save_longcat_checkpoint
from tests.helpers.parity import assert_pool_free, assert_same, engine_greedy, hf_greedy, prompts
from tests.helpers.tiny_configs import TINY_CONFIGS

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


def _pair(kind: str, tmp_path) -> tuple[str, str, int]:
    """Two checkpoints of one architecture, different values (seeds 0 and 1), and the vocab."""
    if kind == "qwen3_moe":
        from moelink.engine.tools.tiny_model import make_tiny_model

        cfg = TINY_CONFIGS["qwen3_e6k3"]
        return (str(make_tiny_model(tmp_path / "a", **cfg)), str(make_tiny_model(tmp_path / "b", **{**cfg, "seed": 1})),
                cfg["vocab_size"])
    if kind == "qwen3_next":
        return (save_hf_checkpoint(tmp_path / "a", "qwen3_next"), save_hf_checkpoint(tmp_path / "b", "qwen3_next", seed=1),
                128)
    return save_longcat_checkpoint(tmp_path / "a"), save_longcat_checkpoint(tmp_path / "b", seed=1), 128


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen3_next", "longcat_flash"])
def test_update_then_back_equals_transformers(kind, tmp_path):
    a, b, vocab = _pair(kind, tmp_path)
    ps = prompts(vocab, seed=19, n=4, lo=1, hi=40)
    want_a, want_b = hf_greedy(a, ps), hf_greedy(b, ps)
    assert want_a != want_b, "the two checkpoints must answer differently"
    llm = LLM(a, dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=128, block_size=8,
              enable_weight_updates=True)
    assert_same(engine_greedy(llm, ps), want_a, ps)
    info = llm.update_weights_from_disk(b, weight_version="step-1")
    assert info["weight_version"] == llm.get_weight_version() == "step-1" and info["bytes_read"] > 0
    got = llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert_same([o.outputs[0].token_ids for o in got], want_b, ps)
    assert all(o.num_cached_tokens == 0 for o in got), "KV of the old weights was served from the prefix cache"
    llm.update_weights_from_disk(a)  # and back: each conversion applied to the written weights once
    assert_same(engine_greedy(llm, ps), want_a, ps)
    assert_pool_free(llm)


def test_bad_updates_are_refused_and_the_weights_stay(tmp_path, tiny_model):
    from moelink.engine.tools.tiny_model import make_tiny_model

    path = tiny_model("qwen3_e6k3")
    cfg = TINY_CONFIGS["qwen3_e6k3"]
    other = str(make_tiny_model(tmp_path / "wide", **{**cfg, "moe_intermediate_size": cfg["moe_intermediate_size"] * 2}))
    llm = LLM(path, dtype="float32", num_kv_blocks=64, block_size=8, enable_weight_updates=True)
    ps = [[1, 2, 3, 4, 5], [9, 8, 7]]
    before = engine_greedy(llm, ps)
    with pytest.raises(ValueError, match=r"model_path=.* tensor 'model\.layers\.0\.mlp\.experts\.0\.down_proj\.weight'"
                                         r" is F32 \[.*\]: an update keeps every tensor's dtype and shape"):
        llm.update_weights_from_disk(other)
    with pytest.raises(ValueError, match="model_path=.* is invalid: not a directory"):
        llm.update_weights_from_disk(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="load_format='dummy' is invalid"):
        llm.update_weights_from_disk(path, load_format="dummy")
    llm.engine.add_request("running", [1, 2, 3], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="refused while requests run"):
        llm.update_weights_from_disk(path)
    llm.engine.abort_requests(["running"])
    assert engine_greedy(llm, ps) == before


def _hf_with(path: str, tensors: dict):
    """transformers' model of `path` in float64 with `tensors` (checkpoint names) in place of its own."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, experts_implementation="eager").eval()
    state = model.state_dict()
    with torch.no_grad():
        for name, t in tensors.items():
            fused = re.fullmatch(r"(.*\.experts)\.(\d+)\.down_proj\.weight", name)
            if name not in state and fused:  # transformers 5 holds the experts fused: [E, D, I]
                state[fused.group(1) + ".down_proj"][int(fused.group(2))].copy_(t)
            else:
                state[name].copy_(t)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("kind, names", [
    # LongCat-Flash: one layer's q_b_proj (its q scale folded again for it alone, the other layers' kept) and its
    # kv_a_layernorm (the latent scale likewise)
    ("longcat_flash", ("model.layers.0.self_attn.0.q_b_proj.weight", "model.layers.0.self_attn.1.kv_a_layernorm.weight")),
    # Qwen3-Next: a zero-centred norm (its offset added again for it alone) and one expert's down projection
    ("qwen3_next", ("model.layers.1.input_layernorm.weight", "model.layers.1.mlp.experts.0.down_proj.weight")),
])
def test_update_from_tensors_writes_those_alone(kind, names, tmp_path):
    from safetensors.torch import load_file

    from tests.helpers.fp8_checkpoints import hf_greedy_with

    a, b, vocab = _pair(kind, tmp_path)
    new = {}
    for f in sorted(Path(b).glob("*.safetensors")):
        new.update({k: v for k, v in load_file(f).items() if k in names})
    assert set(new) == set(names)
    ps = prompts(vocab, seed=23, n=4, lo=1, hi=40)
    want = hf_greedy_with(_hf_with(a, new), ps, 10)
    assert want != hf_greedy(a, ps), "the tensors must change the answers"
    llm = LLM(a, dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=128, block_size=8,
              enable_weight_updates=True)
    engine_greedy(llm, ps)  # the prompts' KV now cached
    info = llm.update_weights_from_tensor([(n, t.to(dtype=torch.float32)) for n, t in new.items()],
                                          weight_version="t1")
    assert info["bytes_read"] > 0 and llm.get_weight_version() == "t1"
    assert_same(engine_greedy(llm, ps), want, ps)
    assert_pool_free(llm)


def test_bad_named_tensors_are_refused(tiny_model):
    path = tiny_model("qwen3_e6k3")
    llm = LLM(path, dtype="float32", num_kv_blocks=16, block_size=8, enable_weight_updates=True)
    name = "model.layers.0.mlp.experts.0.down_proj.weight"
    for bad, match in [
        ([("model.nope.weight", torch.zeros(2))], r"named_tensors\[0\] names 'model\.nope\.weight', which is not"),
        ([(name, torch.zeros(3, 3))], r"named_tensors\[0\] .*down_proj\.weight' has shape \[3, 3\]"),
        ([(name, torch.zeros(1))] * 0, "named_tensors is empty"),
        ([("x",)], r"named_tensors\[0\] is invalid: must be a \(name, torch\.Tensor\) pair"),
    ]:
        with pytest.raises(ValueError, match=match):
            llm.update_weights_from_tensor(bad)


def test_model_path_errors_do_not_tell_which_directories_exist(tmp_path):
    """Issue 76 item 12: update_weights_from_disk answered "not a directory" for a missing path and "holds no
    safetensors tensors" for an existing one (/etc, /root): a client could map the server's directories. Missing,
    a file, empty, full of other files, a 10 MB path: one error. Checked on the driver's check alone (no engine)."""
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from moelink.engine.rl.weights import check_same_tensors

    served = tmp_path / "served"
    served.mkdir()
    save_file({"w": torch.zeros(2)}, str(served / "model.safetensors"))
    cfg = SimpleNamespace(text_weights_prefix="")
    empty, other, a_file = tmp_path / "empty", tmp_path / "other", tmp_path / "file"
    empty.mkdir()
    other.mkdir()
    (other / "notes.txt").write_text("x")
    a_file.write_text("x")
    errors = set()
    for p in (tmp_path / "missing", empty, other, a_file, "/etc", "x" * 10_000_000):
        with pytest.raises(ValueError) as e:
            check_same_tensors(cfg, str(served), str(p))
        assert len(str(e.value)) < 400
        errors.add(str(e.value).split(" is invalid: ", 1)[1])
    assert errors == {"not a directory holding a readable safetensors checkpoint."}, errors
