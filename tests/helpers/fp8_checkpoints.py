"""Tiny Qwen3-MoE and DeepSeek-V3 checkpoints for the FP8 tests, built and saved (float64) by transformers (the
builder and FP8_TINY live in engine/tools/tiny_families.py), and the oracles of the FP8 tests.

Shapes are chosen for FP8 blocks of 16 x 16 (BLOCK): in the first three every stacked piece starts on a block
boundary (q 64 / k 32 / v 32; MLA's q_a 32 then kv_a 40; gate / up 16, 48), as in most published checkpoints,
while ragged blocks occur too: hidden 40 (= 2.5 blocks: every K of a hidden-input linear and every N of an
output one), MLA's kv_a 40 rows (24 without q LoRA), and 6 experts. DeepSeek-V3's interleaved rope keeps
each head's de-interleaved rope rows (8 of its 16) inside one block, as 64-row rope parts do in 128 blocks.

The `*_ragged` ones break that on purpose (issue 27): pieces that end mid-block, so the next piece of the
stack would start inside a block, as DeepSeek-V2-Lite's dense MLP (intermediate_size 10944 = 85.5 blocks of
128) and experts of width 160 or 96 do: expert widths 20 (1.25 blocks, like 160), 12 (0.75, like 96) and 20,
dense widths 24, 40 and 56 (like 10944), GQA k / v of 24 rows, MLA's q_a of 24 rows before kv_a.
"""
from __future__ import annotations

from pathlib import Path

import torch

from moelink.engine.tools.tiny_families import FP8_TINY, MAX_POS, VOCAB, save_preset  # noqa: F401
from moelink.engine.tools.tiny_formats import FP8_BLOCK as BLOCK  # noqa: F401


def save_fp8_tiny(out: Path, name: str, seed: int = 0, fused: bool = False) -> str:
    """transformers' own model on FP8_TINY[name] (engine/tools/tiny_families.py), random norms / biases / correction
    bias, saved float64 with the tiny tokenizer; `fused`: experts as transformers 5 holds them."""
    return save_preset(out, FP8_TINY[name], seed, fused)


def dequantized_copy(fp8_dir: str, out: Path) -> str:
    """The FP8 checkpoint with every FP8 weight dequantized (kernels/fp8.block_dequantize: what the published
    layout means) to float64 and its scales dropped; no quantization_config. transformers loads it as a
    float model holding exactly the FP8 model's weights."""
    import json
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from moelink.kernels.fp8 import FP8_DTYPE, block_dequantize

    src, out = Path(fp8_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    block = tuple(config.pop("quantization_config")["weight_block_size"])
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            tensors = {}
            with safe_open(str(f), framework="pt") as st:
                names = set(st.keys())
                for name in names:
                    t = st.get_tensor(name)
                    if t.dtype == FP8_DTYPE:
                        scale_name = (name[: -len(".weight")] + ".weight_scale_inv" if name.endswith(".weight")
                                      else name + "_scale_inv")
                        t = block_dequantize(t, st.get_tensor(scale_name), block, torch.float64)
                    tensors[name] = t
            tensors = {k: v for k, v in tensors.items() if not k.endswith("scale_inv")}
            save_file(tensors, str(out / f.name), metadata={"format": "pt"})
        elif f.name == "model.safetensors.index.json":
            data = json.loads(f.read_text())
            data["weight_map"] = {k: v for k, v in data["weight_map"].items() if not k.endswith("scale_inv")}
            (out / f.name).write_text(json.dumps(data))
        elif f.is_file() and f.name != "config.json":
            shutil.copy2(f, out / f.name)
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


def fake_quant_hf_model(path: str, block: tuple[int, int], published=lambda name: name, runs_float=lambda name: False):
    """transformers' float64 model of `path` (a dequantized_copy) with the W8A8 activation rounding applied
    where the FP8 engine applies it: the input of every linear the checkpoint holds in FP8 (kv_b_proj apart:
    moelink absorbs it into the query and the output, so no activation of its own is quantized, as in vLLM and
    SGLang's MLA), and both GEMM inputs of every routed expert (hidden state, then silu(gate) * up, or the experts'
    own gated activation where they have one, `_apply_gate`: Hy4's clamped SwiGLU). `published(name)`: the
    checkpoint's name of transformers' module `name` where they differ (Hy4's `linear_gate` for `gate_proj`).
    `runs_float(name)`: an FP8 checkpoint linear moelink holds float, dequantized at load (engine/rank/fp8_linears.py:
    GLM-5.3-Flash's NoPE MLA projections, KDA's gates), whose input is not rounded. A multimodal checkpoint served as
    its text model is built by the class config.json names (as tests/helpers/parity.py does)."""
    import types

    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    from moelink.engine.tools.quantize_fp8 import is_quantized_name
    from moelink.kernels.fp8 import fake_quant_activation

    bk = block[1]

    def fq(x):
        return fake_quant_activation(x.reshape(-1, x.shape[-1]), bk).to(x.dtype).view_as(x)

    cfg = AutoConfig.from_pretrained(path)
    cls = (AutoModelForCausalLM if type(cfg) in AutoModelForCausalLM._model_mapping
           else getattr(transformers, cfg.architectures[0]))
    model = cls.from_pretrained(path, dtype=torch.float64, experts_implementation="eager").eval()
    for name, mod in model.named_modules():
        if (isinstance(mod, torch.nn.Linear) and is_quantized_name(published(name) + ".weight")
                and not name.endswith("kv_b_proj") and not runs_float(name)):
            mod.register_forward_pre_hook(lambda m, args: (fq(args[0]),) + tuple(args[1:]))
        elif name.endswith("mlp.experts"):
            mod.forward = types.MethodType(_fake_quant_experts_forward(fq), mod)
    return model


def _fake_quant_experts_forward(fq):
    """The experts with W8A8 activation rounding. Ids past the routed experts (down_proj's) are zero-computation
    experts (LongCat-Flash's): the token itself times its weight, no GEMM, nothing quantized."""
    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        routed = self.down_proj.shape[0]
        for e in range(int(top_k_index.max()) + 1 if top_k_index.numel() else 0):
            top_k_pos, token_idx = torch.where(top_k_index.T == e)
            if token_idx.numel() == 0:
                continue
            if e >= routed:
                y = hidden_states[token_idx] * top_k_weights[token_idx, top_k_pos, None]
            else:
                gate_up = torch.nn.functional.linear(fq(hidden_states[token_idx]), self.gate_up_proj[e])
                if hasattr(self, "_apply_gate"):  # Hy4's clamped SwiGLU
                    h = fq(self._apply_gate(gate_up))
                else:
                    gate, up = gate_up.chunk(2, dim=-1)
                    h = fq(self.act_fn(gate) * up)
                y = torch.nn.functional.linear(h, self.down_proj[e]) * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out
    return forward


def hf_greedy_with(model, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                                 min_new_tokens=max_new, eos_token_id=None, pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
    return outs


def check_fp8_gqa_block_parity(src: str, tmp_path: Path, vocab: int) -> None:
    """A GQA MoE float checkpoint `src` quantized by `moelink quantize-fp8` (16 x 16 blocks) loads through the FP8 block
    path (layer 1's qkv FP8, its router float) and gives the greedy tokens of transformers' float64 model on the
    dequantized weights with the W8A8 activation rounding where the engine applies it."""
    from moelink.engine import LLM
    from moelink.engine.config.model import ModelConfig
    from moelink.engine.tools.quantize_fp8 import quantize_checkpoint
    from moelink.kernels.fp8 import FP8_DTYPE

    from .parity import engine_greedy, prompts

    dst = str(quantize_checkpoint(src, tmp_path / "fp8", BLOCK))
    deq = dequantized_copy(dst, tmp_path / "dequantized")
    cfg = ModelConfig.from_pretrained(dst, dtype="float64")
    assert cfg.quantization.method == "fp8" and cfg.quantization.block == BLOCK
    ps = prompts(vocab, seed=5, n=4, lo=1, hi=40)
    with LLM(dst, dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=8) as llm:
        layer = llm.engine.executor.worker.runner.model.layers[1]
        assert layer.self_attn.qkv_proj.weight.dtype == FP8_DTYPE and layer.moe.gate_GD.dtype != FP8_DTYPE
        got = engine_greedy(llm, ps, max_new=6)
    assert len({t for g in got for t in g}) > 5, "degenerate model"
    assert got == hf_greedy_with(fake_quant_hf_model(deq, BLOCK), ps, 6)
