"""The generic machinery of the tiny random checkpoints, built and saved by transformers itself, and the presets of
the quantized formats' tests.

A tiny checkpoint is transformers' own model class on a tiny config (hidden 32-64, 2-5 layers), randomly initialised
with a fixed seed, made float64 and written by `save_pretrained`, with the tiny tokenizer beside it (tiny_corpus.py):
the layout and config.json are exactly what transformers writes, so transformers is the oracle of moelink's model
code on them. What transformers initialises to constants (biases, norm weights, sinks, DeepSeek's
e_score_correction_bias) gets random values here, so a weight loaded into the wrong place shows. Same seed, same
bytes.

Each family's own presets live in its package, `engine/models/<family>/tiny.py` (ARCHITECTURE.md: How to add a model
family): its tiny configs (a `Preset`, built by `save_preset` or `save_drawn_preset` here, or by a builder of its
own) and its `ARCHS`, the `TinyArch` entries of `moelink make-tiny-model --arch NAME`, which tiny_archs.py gathers
from the registry (engine/config/families.py). The test suite's checkpoints are these (tests/helpers/*_checkpoints.py
name them). Here, beside the builders: FP8_TINY, NVFP4_TINY, INT4_TINY, Qwen3-MoE / DeepSeek-V3 shapes for the
quantized formats (tiny_formats.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

from .file_modes import umask_mode

VOCAB, MAX_POS = 400, 512
WINDOW = 6  # the sliding window of the presets that have one (gpt-oss, MiMo-V2-Flash)

# (transformers config class, model class, config fields beyond VOCAB / MAX_POS / initializer_range 0.1). The model
# class is config.json's `architectures`; one that ends in ForConditionalGeneration is multimodal: its fields are the
# text model's (text_config) but `vision_config`.
Preset = tuple[str, str, dict]

# The quantized formats every family's routed experts can be written in (tiny_archs.FORMATS).
QUANT_FORMATS = ("fp8", "int4", "gptq", "awq", "nvfp4")


@dataclass(frozen=True)
class TinyArch:
    """One `--arch` of `moelink make-tiny-model`, declared by its family (engine/models/<family>/tiny.py, `ARCHS`).

    architecture: the `architectures` its config.json names; covers: the published checkpoints it stands for;
    formats: those moelink reads it in (tiny_archs.FORMATS and `own_formats`), the first the default.
    How its float checkpoint is written, one of:
    - `sized`: by make_tiny_model's own writer of that layout (tiny_model.py: "qwen3_moe", "mixtral";
      tiny_hf_model.py: "deepseek_v3", "deepseek_v2", "glm4_moe"), sized by its arguments;
    - `write(out, *, seed, dtype, fmt, overrides)`: a preset, its config fields changed by `overrides`
      (make_tiny_model's `extra` and the format's fields), saved with the tiny tokenizer (save_model); `fmt` lets a
      family pick a
      preset shaped for a format.
    expert_width: the config field of the routed experts' width (the INT4 formats make it a multiple of the group);
    format_fields: config fields a format needs ({"mxfp4": {"intermediate_size": 32}});
    model_type: config.json's model_type as its publisher writes it (Kimi K2's `kimi_k2`);
    wrap(dir, out): the checkpoint in its format rewritten into `out` as published (Kimi K2.5's multimodal wrapper);
    own_formats: formats of this family alone, name -> (what the checkpoint holds, convert(float_dir, out)).
    """

    architecture: str
    covers: str
    formats: tuple[str, ...]
    sized: Optional[str] = None
    write: Optional[Callable[..., object]] = None
    expert_width: str = "moe_intermediate_size"
    format_fields: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    model_type: Optional[str] = None
    wrap: Optional[Callable[[str, Path], object]] = None
    own_formats: Mapping[str, tuple[str, Callable[[str, Path], object]]] = field(default_factory=dict)


def preset_writer(preset: Preset, drawn: bool = False) -> Callable[..., object]:
    """A `TinyArch.write` of one preset: `save_preset` (or `save_drawn_preset`) with the overrides on top."""
    save = save_drawn_preset if drawn else save_preset

    def write(out: Path, *, seed: int, dtype: torch.dtype, fmt: str, overrides: Mapping) -> object:
        return save(out, preset, seed, dtype=dtype, **overrides)

    return write


def preset_config(preset: Preset, **overrides):
    """transformers' config of a (config class, model class, fields) preset, `overrides` on top (a multimodal one's go
    into its text_config)."""
    import transformers

    config_cls, model_cls, fields = preset
    common = {"vocab_size": VOCAB, "max_position_embeddings": MAX_POS, "initializer_range": 0.1}
    if model_cls.endswith("ForConditionalGeneration"):  # multimodal: the text model's fields in text_config
        text = {k: v for k, v in fields.items() if k != "vision_config"}
        cfg = getattr(transformers, config_cls)(text_config={**common, **text, **overrides},
                                                vision_config=fields["vision_config"])
    else:
        cfg = getattr(transformers, config_cls)(**{**common, **fields, **overrides})
    cfg.architectures = [model_cls]
    return cfg


def save_preset(out: Path, preset: Preset, seed: int = 0, fused: bool = False, dtype: torch.dtype = torch.float64,
                **overrides) -> str:
    """transformers' own model on `preset` (random biases, norms and correction bias: build_hf_model), saved in
    `dtype` with the tiny tokenizer; `fused`: experts as transformers 5 holds them (experts.gate_up_proj /
    down_proj)."""
    cfg = preset_config(preset, **overrides)
    return save_model(build_hf_model(cfg, seed), out, cfg, dtype, fused)


def _randomize_constants(model, seed: int) -> None:
    """Random values where transformers initialises constants: Linear biases, (gated) RMSNorm weights, the DSA
    indexer's LayerNorm, DeepSeek's e_score_correction_bias (one generator, module order: same seed, same values)."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod_name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g, dtype=torch.float64) * 0.1)
            if type(mod).__name__.endswith(("RMSNorm", "RMSNormGated")) and getattr(mod, "weight", None) is not None:
                mod.weight.add_(torch.randn(mod.weight.shape, generator=g, dtype=torch.float64) * 0.1)
            if isinstance(mod, torch.nn.LayerNorm) and ".indexer." in mod_name:  # DSA's k_norm: weight and bias
                mod.weight.add_(torch.randn(mod.weight.shape, generator=g, dtype=torch.float64) * 0.1)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g, dtype=torch.float64) * 0.1)
            bias = getattr(mod, "e_score_correction_bias", None)
            if bias is not None:
                bias.copy_(torch.randn(bias.shape, generator=g, dtype=bias.dtype) * 0.05)


def save_tokenizer(out: Path, cfg=None) -> None:
    """The tiny byte-level BPE tokenizer (tiny_corpus.py) and its configs, for `cfg`'s vocabulary and context
    (a multimodal config's text_config; VOCAB and MAX_POS without a config)."""
    from .tiny_corpus import train_tiny_tokenizer, write_tokenizer_configs

    text = getattr(cfg, "text_config", None) or cfg
    vocab = getattr(text, "vocab_size", None) or VOCAB
    max_pos = getattr(text, "max_position_embeddings", None) or MAX_POS
    tok = train_tiny_tokenizer(vocab)
    tok.save(str(Path(out) / "tokenizer.json"))
    write_tokenizer_configs(Path(out), tok, max_pos)


def save_model(model, out: Path, cfg=None, dtype: torch.dtype = torch.float64, fused: bool = False) -> str:
    """`model` in `dtype` by save_pretrained (`fused`: in transformers 5's own names, save_original_format=False)
    into `out`, the tiny tokenizer beside it, every file 0666 minus the umask."""
    out = Path(out)
    model.to(dtype).save_pretrained(out, **({"save_original_format": False} if fused else {}))
    umask_mode(out.glob("*.safetensors"))
    save_tokenizer(out, cfg if cfg is not None else model.config)
    return str(out)


def build_hf_model(cfg, seed: int = 0):
    """transformers' own model class of `cfg` in float64, its constants randomised (`_randomize_constants`)."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, cfg.architectures[0])(cfg).to(torch.float64)
    _randomize_constants(model, seed)
    return model


def save_drawn_preset(out: Path, preset: Preset, seed: int = 0, dtype: torch.dtype = torch.float64,
                      fused: bool = False, **overrides) -> str:
    """Build `preset` with transformers, draw what it initialises to constants (norm weights, biases, sinks, the
    correction bias: MiniMax-M2's and MiMo-V2-Flash's presets), save it + the tokenizer.
    `fused`: in transformers 5's own names (save_original_format=False: experts.gate_up_proj / down_proj, the
    router at mlp.gate, MiMo's sinks as self_attn.sinks), not the published ones. The MiniMax correction bias is
    drawn in float32: transformers keeps it in the model dtype and adds it to float32 sigmoid scores, moelink holds
    it in float32 as every serving engine does; drawn in float32 the two sums differ only by that add's rounding."""
    import transformers

    cfg = preset_config(preset, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, cfg.architectures[0])(cfg).to(torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)
            elif pname.endswith(".bias"):  # q/k/v biases (MiMo's attention_bias)
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1)
            elif pname.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        for mod in model.modules():
            bias = getattr(mod, "e_score_correction_bias", None)
            if bias is None and type(mod).__name__.endswith("SparseMoeBlock"):
                bias = getattr(mod, "expert_bias", None)  # LFM2-MoE's selection bias (use_expert_bias)
            if isinstance(bias, torch.Tensor):
                bias.copy_((torch.randn(bias.shape, generator=g) * 0.05).to(bias.dtype))
    return save_model(model, out, cfg, dtype, fused)


def published_as(write: Callable[..., object], architecture: str, model_type: Optional[str] = None,
                 rename: Optional[Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = None,
                 text_only: bool = False) -> Callable[..., object]:
    """A `TinyArch.write` of another registry name of the same model (ArchSpec's `alias_of`: vLLM's spelling, a
    text-only name, fused tensors): `write`'s checkpoint, then config.json's `architectures` (and `model_type` where
    given) rewritten, and its tensors by `rename` (name -> tensor to name -> tensor, one model.safetensors).
    `text_only`: a multimodal checkpoint's text model alone (its text_config's fields at the top; its tensors under
    language_model. moved to the top: language_model.model.* -> model.*, language_model.lm_head -> lm_head)."""
    import json

    def write_as(out: Path, **kwargs) -> object:
        path = write(out, **kwargs)
        out_dir = Path(out)
        config = json.loads((out_dir / "config.json").read_text())
        if text_only:
            config = {**config["text_config"], **{k: config[k] for k in ("torch_dtype", "dtype", "transformers_version")
                                                  if k in config}}
        config["architectures"] = [architecture]
        if model_type is not None:
            config["model_type"] = model_type
        (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if text_only or rename is not None:
            from safetensors.torch import load_file, save_file

            files = sorted(out_dir.glob("*.safetensors"))
            if len(files) != 1 or (out_dir / "model.safetensors.index.json").exists():
                raise ValueError(f"published_as: {out_dir} is sharded; the tiny writer rewrites one model.safetensors.")
            tensors = load_file(str(files[0]))
            if text_only:
                tensors = {n[len("language_model."):]: t for n, t in tensors.items() if n.startswith("language_model.")}
            if rename is not None:
                tensors = rename(tensors)
            save_file({n: t.contiguous() for n, t in tensors.items()}, str(files[0]), metadata={"format": "pt"})
            umask_mode(files)
        return path

    return write_as


def random_module(template: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random values for an MTP module's tensors, shaped and typed as `template`'s (name -> a tensor of that shape):
    norms near 1, matrices fan-in scaled (the router's twice as large, so routing is decided), correction and
    expert biases small; the module's own generator (seed + 7919), so the main model's values are untouched."""
    gen = torch.Generator().manual_seed(seed + 7919)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in sorted(template.items()):
        x = torch.randn(t.shape, generator=gen, dtype=torch.float64)
        if name.endswith(("expert_bias", "e_score_correction_bias")):
            x = 0.05 * x
        elif t.dim() == 1:
            x = 1 + 0.2 * x
        else:
            x = x * (2.0 if name.endswith("mlp.gate.weight") else 1.0) / t.shape[-1] ** 0.5
        tensors[name] = x.to(t.dtype)
    return tensors


def write_mtp_module(out: str | Path, template: str, prefix: str, own: Mapping[str, str], *, seed: int,
                     skip: tuple[str, ...] = (), count_in: str = "") -> None:
    """Append one MTP module to the tiny checkpoint in `out` (transformers neither builds nor saves the 2026
    families' modules), in mtp.safetensors beside model.safetensors: the tensors of the main layer under `template`,
    in the names save_pretrained published for it, renamed under `prefix` (those whose rest starts with one of `skip`
    left out: the hyper-connection weights a module does not have), plus the module's own tensors, `own` (name under
    `prefix` -> "norm" [D] or "eh_proj" [D, 2D]); every value drawn from a stream of its own (`seed`): norms around 1,
    matrices fan-in scaled, a correction bias small. `count_in`: config.json's key whose dict takes
    num_nextn_predict_layers 1 ("text_config"; "" the top level)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    out = Path(out)
    if (out / "model.safetensors.index.json").exists():
        raise ValueError(f"write_mtp_module: {out} is sharded; the tiny writer appends to one model.safetensors only.")
    with safe_open(str(out / "model.safetensors"), framework="pt") as st:
        shapes = {prefix + n[len(template):]: st.get_tensor(n) for n in st.keys()
                  if n.startswith(template) and not n[len(template):].startswith(skip)}
    norm = shapes[prefix + "input_layernorm.weight"]
    D = norm.shape[0]
    shapes.update({prefix + n: norm if kind == "norm" else norm.new_zeros(D, 2 * D) for n, kind in own.items()})
    save_file(random_module(shapes, seed), str(out / "mtp.safetensors"), metadata={"format": "pt"})
    umask_mode([out / "mtp.safetensors"])
    raw = json.loads((out / "config.json").read_text())
    (raw[count_in] if count_in else raw)["num_nextn_predict_layers"] = 1
    (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


# -- Qwen3-MoE / DeepSeek-V3 shapes for the quantized formats (tests/helpers/{fp8,nvfp4,int4}_checkpoints.py) ---------

# FP8 blocks of 16 x 16 (tiny_formats.FP8_BLOCK): in the first three every stacked piece starts on a block boundary
# (q 64 / k 32 / v 32; MLA's q_a 32 then kv_a 40; gate / up 16, 48), while ragged blocks occur too: hidden 40 (= 2.5
# blocks), MLA's kv_a 40 rows (24 without q LoRA), and 6 experts; DeepSeek-V3's interleaved rope keeps each head's
# de-interleaved rope rows inside one block. The `*_ragged` ones (issue 27) have pieces that end mid-block, as
# DeepSeek-V2-Lite's dense MLP (10944 = 85.5 blocks of 128) and experts of width 160 or 96 do.
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
    # The widths of issue 27 itself, for 128 x 128 blocks: the dense layer 200 wide (1.56 blocks, as 10944 is 85.5),
    # experts 160 (V2-Lite-like, 2 shared: 320) and, in the Qwen3 one, 96 with a dense layer of 200.
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

# NVFP4: hidden and expert sizes multiples of 16 (one e4m3 scale per 16 values).
NVFP4_TINY: dict[str, tuple[str, str, dict]] = {
    "qwen3": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        moe_intermediate_size=32, intermediate_size=48, num_experts=6, num_experts_per_tok=2, mlp_only_layers=[1],
        norm_topk_prob=True)),
    "dsv3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32,
        kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, moe_intermediate_size=16,
        n_routed_experts=6, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        n_shared_experts=1, routed_scaling_factor=2.5)),
}

# INT4: every reduction dim a multiple of the group (32): hidden 64, expert width 32, o_proj's input 64 / 32.
INT4_TINY: dict[str, tuple[str, str, dict]] = {
    "qwen3": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        moe_intermediate_size=32, intermediate_size=64, num_experts=6, num_experts_per_tok=2, mlp_only_layers=[1],
        norm_topk_prob=True)),
    "dsv3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, q_lora_rank=32,
        kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, moe_intermediate_size=32,
        n_routed_experts=6, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        n_shared_experts=1, routed_scaling_factor=2.5)),
}


__all__ = ["FP8_TINY", "INT4_TINY", "MAX_POS", "NVFP4_TINY", "Preset", "QUANT_FORMATS", "published_as", "random_module", "TinyArch", "VOCAB", "WINDOW",
           "build_hf_model", "preset_config", "preset_writer", "save_drawn_preset", "save_model", "save_preset",
           "save_tokenizer", "write_mtp_module"]
