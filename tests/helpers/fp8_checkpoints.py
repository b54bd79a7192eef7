"""Tiny Qwen3-MoE and DeepSeek-V3 checkpoints for the FP8 tests, built and saved (float64) by transformers.

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

VOCAB, MAX_POS = 400, 512
BLOCK = (16, 16)

FP8_TINY: dict[str, tuple[str, str, dict]] = {
    "qwen3_fp8": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        hidden_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        moe_intermediate_size=16, intermediate_size=48, num_experts=6, num_experts_per_tok=2, mlp_only_layers=[1],
        norm_topk_prob=True)),
    "dsv3_fp8": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        hidden_size=40, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32,
        kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, moe_intermediate_size=16,
        n_routed_experts=6, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        n_shared_experts=1, routed_scaling_factor=2.5)),
    # q_proj without q LoRA (its 32 rows stacked before kv_a), biases on kv_a and o, two shared experts.
    "dsv3_fp8_noq": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        hidden_size=40, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=None,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, moe_intermediate_size=16,
        n_routed_experts=6, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        n_shared_experts=2, routed_scaling_factor=2.5, attention_bias=True)),
    # k and v of 24 rows (v starts at 72), experts 20 wide, the dense layer 24 wide.
    "qwen3_fp8_ragged": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        hidden_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
        moe_intermediate_size=20, intermediate_size=24, num_experts=6, num_experts_per_tok=2, mlp_only_layers=[1],
        norm_topk_prob=True)),
    # q_a 24 rows then kv_a (with biases on both), experts and the shared expert 12 wide, the dense layer 40.
    "dsv3_fp8_ragged": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        hidden_size=40, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=24,
        kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, moe_intermediate_size=12,
        n_routed_experts=6, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        n_shared_experts=1, routed_scaling_factor=2.5, attention_bias=True)),
    # DeepSeek-V2-Lite's layout (no q LoRA, group-limited greedy over 9 experts, 2 shared experts, a dense first
    # layer): the dense layer 56 wide, experts 20, the shared MLP 40.
    "dsv2_fp8_ragged": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=None,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, moe_intermediate_size=20,
        n_routed_experts=9, topk_method="group_limited_greedy", n_group=3, topk_group=1, num_experts_per_tok=3,
        first_k_dense_replace=1, n_shared_experts=2, routed_scaling_factor=16.0)),
    # The widths of the issue itself, for 128 x 128 blocks: the dense layer 200 wide (1.56 blocks, as 10944 is
    # 85.5), experts 160 (V2-Lite-like, 2 shared: 320) and, in the Qwen3 one, 96 with a dense layer of 200.
    "dsv2_fp8_128": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        hidden_size=40, intermediate_size=200, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=None,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, moe_intermediate_size=160,
        n_routed_experts=9, topk_method="group_limited_greedy", n_group=3, topk_group=1, num_experts_per_tok=3,
        first_k_dense_replace=1, n_shared_experts=2, routed_scaling_factor=16.0)),
    "qwen3_fp8_128": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        hidden_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        moe_intermediate_size=96, intermediate_size=200, num_experts=6, num_experts_per_tok=2, mlp_only_layers=[1],
        norm_topk_prob=True)),
}


def save_fp8_tiny(out: Path, name: str, seed: int = 0, fused: bool = False) -> str:
    """transformers' own model on FP8_TINY[name], random norms / biases / correction bias, saved float64 with
    the tiny tokenizer; `fused`: experts as transformers 5 holds them (experts.gate_up_proj / down_proj)."""
    import transformers

    from moelink.engine.tools.tiny_corpus import train_tiny_tokenizer, write_tokenizer_configs

    config_cls, model_cls, fields = FP8_TINY[name]
    cfg = getattr(transformers, config_cls)(vocab_size=VOCAB, max_position_embeddings=MAX_POS, initializer_range=0.1,
                                             **fields)
    cfg.architectures = [model_cls]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).to(torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear) and mod.bias is not None:  # zeros from transformers' init
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g, dtype=torch.float64) * 0.1)
            if type(mod).__name__.endswith("RMSNorm"):
                mod.weight.add_(torch.randn(mod.weight.shape, generator=g, dtype=torch.float64) * 0.1)
            bias = getattr(mod, "e_score_correction_bias", None)
            if bias is not None:
                bias.copy_(torch.randn(bias.shape, generator=g, dtype=bias.dtype) * 0.05)
    out = Path(out)
    model.save_pretrained(out, **({"save_original_format": False} if fused else {}))
    tok = train_tiny_tokenizer(VOCAB)
    tok.save(str(out / "tokenizer.json"))
    write_tokenizer_configs(out, tok, MAX_POS)
    return str(out)


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


def fake_quant_hf_model(path: str, block: tuple[int, int]):
    """transformers' float64 model of `path` (a dequantized_copy) with the W8A8 activation rounding applied
    where the FP8 engine applies it: the input of every linear the checkpoint holds in FP8 (kv_b_proj apart:
    moelink absorbs it into the query and the output, so no activation of its own is quantized, as in vLLM and
    SGLang's MLA), and both GEMM inputs of every routed expert (hidden state, then silu(gate) * up)."""
    import types

    from transformers import AutoModelForCausalLM

    from moelink.engine.tools.quantize_fp8 import is_quantized_name
    from moelink.kernels.fp8 import fake_quant_activation

    bk = block[1]

    def fq(x):
        return fake_quant_activation(x.reshape(-1, x.shape[-1]), bk).to(x.dtype).view_as(x)

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, experts_implementation="eager").eval()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and is_quantized_name(name + ".weight") and not name.endswith("kv_b_proj"):
            mod.register_forward_pre_hook(lambda m, args: (fq(args[0]),) + tuple(args[1:]))
        elif name.endswith("mlp.experts"):
            mod.forward = types.MethodType(_fake_quant_experts_forward(fq), mod)
    return model


def _fake_quant_experts_forward(fq):
    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in range(self.gate_up_proj.shape[0]):
            top_k_pos, token_idx = torch.where(top_k_index.T == e)
            if token_idx.numel() == 0:
                continue
            gate, up = torch.nn.functional.linear(fq(hidden_states[token_idx]), self.gate_up_proj[e]).chunk(2, dim=-1)
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
