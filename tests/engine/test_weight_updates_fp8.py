"""A trainer's float weights into an FP8 block-scaled deployment (engine/rl/requantize.py; docs/rl.md): the served
checkpoint is FP8 (engine/tools/quantize_fp8.py in 16 x 16 blocks); the trainer sends every weight of a new float
checkpoint in float32, by update_weights_from_tensor and by a gloo broadcast (each rank block-quantizes what it
receives); greedy tokens then equal an engine started on the new checkpoint quantized by the same tool. Sending a
float weight together with its scale is refused naming both."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moelink.engine import LLM
from moelink.engine.rl.trainer import TrainerGroup
from moelink.engine.tools.quantize_fp8 import quantize_checkpoint
from moelink.engine.tools.tiny_formats import FP8_BLOCK
from moelink.engine.tools.tiny_model import make_tiny_model

from tests.engine.test_weight_updates_distributed import _Trainer, _tensors
from tests.helpers.net import free_port
from tests.helpers.parity import assert_same, engine_greedy, prompts
from tests.helpers.tiny_configs import TINY_CONFIGS

pytestmark = pytest.mark.usefixtures("heap_held_frozen")
KW = dict(dtype="float32", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=8,
          enable_weight_updates=True)


@pytest.mark.slow
def test_float_weights_requantized_into_fp8_equal_the_quantized_checkpoint(tmp_path):
    cfg = TINY_CONFIGS["qwen3_e6k3"]
    a = make_tiny_model(tmp_path / "a", **cfg)
    b = make_tiny_model(tmp_path / "b", **{**cfg, "seed": 1})
    fa, fb = str(quantize_checkpoint(a, tmp_path / "fa", FP8_BLOCK)), str(quantize_checkpoint(b, tmp_path / "fb",
                                                                                               FP8_BLOCK))
    new = [(k, v.to(torch.float32)) for k, v in _tensors(str(b)).items()]
    assert any(v.dtype == torch.float8_e4m3fn for v in _tensors(fa).values())
    ps = prompts(cfg["vocab_size"], seed=53, n=4, lo=1, hi=30)
    want = engine_greedy(LLM(fb, **KW), ps)
    llm = LLM(fa, **KW)
    assert engine_greedy(llm, ps) != want
    llm.update_weights_from_tensor(new)
    assert_same(engine_greedy(llm, ps), want, ps)

    llm.update_weights_from_disk(fa)  # back, then the same through a broadcast
    trainer = _Trainer(free_port(), new)
    trainer.start()
    llm.init_weights_update_group("127.0.0.1", trainer.port, 1, 2, "g", "gloo")
    trainer.go.set()
    llm.update_weights_from_distributed(**TrainerGroup.specs(new), group_name="g", bucket_bytes=1 << 14)
    assert_same(engine_greedy(llm, ps), want, ps)
    llm.destroy_weights_update_group("g")
    trainer.done.set()
    trainer.join(30.0)

    name = "model.layers.0.mlp.experts.0.down_proj.weight"
    scale = dict(new)[name]
    with pytest.raises(ValueError, match=rf"'{name}' is float and its scale '{name}_scale_inv' is given too"):
        llm.update_weights_from_tensor([(name, scale), (name + "_scale_inv", torch.ones(1))])
