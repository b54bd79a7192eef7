"""A trainer's float weights into an MXFP4 (gpt-oss), NVFP4 (ModelOpt) or INT4 (compressed-tensors W4A16, Kimi K2's
recipe) deployment (engine/rl/requantize.py; docs/rl.md). Two float checkpoints A and B, each quantized by the
format's own writer; the engine serving quantized A takes every tensor of float B (under the float checkpoint's
names and shapes) by update_weights_from_tensor and by a gloo broadcast, and then gives exactly the tokens and
logprobs of an engine started on quantized B. A float tensor the format cannot take (wrong shape, an integer dtype,
NaN) is refused naming it, and the weights stay."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.rl.trainer import TrainerGroup

from tests.engine.test_weight_updates_distributed import _tensors, _Trainer
from tests.helpers.net import free_port
from tests.helpers.parity import prompts

pytestmark = pytest.mark.usefixtures("heap_held_frozen")
KW = dict(dtype="float32", max_num_seqs=4, max_num_batched_tokens=40, num_kv_blocks=64, block_size=8,
          enable_weight_updates=True)


def quantized_pair(fmt: str, tmp: Path) -> tuple[str, str, str]:
    """(quantized A, quantized B, float B) for `fmt`, each quantized by the format's writer."""
    out = []
    for seed in (0, 1):
        if fmt == "mxfp4":
            from moelink.engine.models.gpt_oss.tiny import save_gpt_oss
            from moelink.engine.tools.mxfp4_checkpoint import quantize_mxfp4_checkpoint

            src = save_gpt_oss(tmp / f"f{seed}", torch.float32, seed, intermediate_size=32)
            q = str(quantize_mxfp4_checkpoint(src, tmp / f"q{seed}"))
        elif fmt == "nvfp4":
            from tests.helpers.nvfp4_checkpoints import nvfp4_checkpoint, save_tiny as save_nvfp4

            src = save_nvfp4(tmp / f"f{seed}", "qwen3", seed)
            q = nvfp4_checkpoint(src, tmp / f"q{seed}")
        elif fmt in ("gptq", "gptq_asym", "awq"):  # round-to-nearest by the plain-torch reference writer
            from tests.helpers.gptq_awq_reference import rtn_checkpoint
            from tests.helpers.int4_checkpoints import save_tiny as save_int4

            src = save_int4(tmp / f"f{seed}", "dsv3", seed)
            q = rtn_checkpoint(src, tmp / f"q{seed}", fmt[:4], fmt == "gptq", 32, "all" if fmt == "gptq" else "experts")
        else:  # Kimi K2's recipe: DeepSeek-V3's routed experts, symmetric, group 32
            from tests.helpers.int4_checkpoints import int4_checkpoint, save_tiny as save_int4

            src = save_int4(tmp / f"f{seed}", "dsv3", seed)
            q = int4_checkpoint(src, tmp / f"q{seed}", True, 32, "experts")
        out.append((q, src))
    return out[0][0], out[1][0], out[1][1]


def run(llm, ps) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and each token's logprob, computed afresh (no prefix-cache hit: a hit computes other bits)."""
    llm.flush_cache()
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=0)
    outs = llm.generate(ps, params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids,
                                                                            o.outputs[0].logprobs)]) for o in outs]


def vocab(path: str) -> int:
    import json

    return json.loads((Path(path) / "config.json").read_text())["vocab_size"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int4"])
def test_float_weights_requantized_equal_the_writers_checkpoint(tmp_path, fmt):
    qa, qb, fb = quantized_pair(fmt, tmp_path)
    new = list(_tensors(fb).items())
    ps = prompts(vocab(qa), seed=61, n=4, lo=1, hi=30)
    want = run(LLM(qb, **KW), ps)
    llm = LLM(qa, **KW)
    before = run(llm, ps)
    assert before != want
    tensor_then_broadcast(llm, qa, new, ps, before, want)


def tensor_then_broadcast(llm, qa: str, new, ps, before, want) -> None:
    """`new` (float tensors) into the quantized engine `llm` (started on `qa`) by update_weights_from_tensor, then,
    after going back to `qa` from disk, through a trainer's gloo broadcast (each rank re-quantizes): both times
    `want`'s tokens and logprobs, bitwise."""
    llm.update_weights_from_tensor(new)
    assert run(llm, ps) == want  # tokens and logprobs, bitwise

    llm.update_weights_from_disk(qa)  # back, then the same through a broadcast (the rank quantizes)
    assert run(llm, ps) == before
    trainer = _Trainer(free_port(), new)
    trainer.start()
    try:
        llm.init_weights_update_group("127.0.0.1", trainer.port, 1, 2, "g", "gloo")
        trainer.go.set()
        llm.update_weights_from_distributed(**TrainerGroup.specs(new), group_name="g", bucket_bytes=1 << 14)
        assert run(llm, ps) == want
        llm.destroy_weights_update_group("g")
    finally:
        trainer.done.set()
        trainer.join(30.0)
    assert trainer.error is None


FLOAT_NAME = {"mxfp4": "model.layers.0.mlp.experts.gate_up_proj",
              "nvfp4": "model.layers.0.mlp.experts.1.up_proj.weight",
              "int4": "model.layers.1.mlp.experts.1.up_proj.weight"}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["nvfp4", "int4"])
def test_a_tensor_the_format_cannot_take_is_refused_naming_it(tmp_path, fmt):
    qa, _, fb = quantized_pair(fmt, tmp_path)
    name = FLOAT_NAME[fmt]
    w = _tensors(fb)[name]
    llm = LLM(qa, **KW)
    ps = prompts(vocab(qa), seed=62, n=2, lo=1, hi=12)
    before = run(llm, ps)
    bad_shape = torch.zeros(w.shape[0], w.shape[1] + 1)
    with pytest.raises(ValueError, match=rf"'{name}' has shape \[{w.shape[0]}, {w.shape[1] + 1}\]"):
        llm.update_weights_from_tensor([(name, bad_shape)])
    with pytest.raises(ValueError, match=rf"'{name}' is torch.int32: {fmt} re-quantizes a float tensor"):
        llm.update_weights_from_tensor([(name, w.to(torch.int32))])
    nan = w.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"'{name}' holds NaN or inf"):
        llm.update_weights_from_tensor([(name, nan)])
    with pytest.raises(ValueError, match=rf"shapes\[0\]=.* tensor '{name}' is quantized into the served {fmt}"):
        _specs_only(llm, name, [w.shape[0], w.shape[1] + 1])
    assert run(llm, ps) == before


def _specs_only(llm, name: str, shape: list[int]) -> None:
    """The broadcast's up-front check alone (no group is needed to refuse a spec)."""
    from moelink.engine.rl.weights import check_tensor_specs

    cfg = llm.engine.config.model
    check_tensor_specs(cfg, cfg.model, [name], ["float32"], [shape])
