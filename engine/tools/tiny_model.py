"""Tiny random MoE checkpoints in the exact Hugging Face on-disk layout.

Tests, examples and benchmarks need real-looking models without a network: a
directory that `transformers` loads with no missing or unexpected weights
(so it is the test oracle for our model code) and that our loader reads like
any downloaded checkpoint. Qwen3-MoE and Mixtral files are written here;
DeepSeek-V3, DeepSeek-V2 and GLM-4-MoE are built and saved by transformers
itself (tiny_hf_model.py), and every other family moelink serves from its own
presets (engine/models/<family>/tiny.py, gathered by tiny_archs.py from the
family registry). `format` rewrites the float checkpoint in a quantized format
(tiny_archs.py lists which arch takes which). Everything is
seeded, so the same arguments give byte-identical files.

Shape legend: V vocab, D hidden, E experts, I expert (or dense MLP) width,
H query heads, K kv heads, Dh head dim.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence, Union

import torch
from safetensors.torch import save_file

from .file_modes import umask_mode
from .tiny_corpus import (CHAT_TEMPLATE, EOS_TOKEN, IM_END, IM_START, SPECIAL_TOKENS,  # noqa: F401 (re-exported)
                          train_tiny_tokenizer, write_tokenizer_configs)
from . import tiny_archs
from .tiny_formats import FP8_BLOCK, INT4_GROUPS
from .tiny_hf_model import HF_ARCHS, build_hf_config, write_generation_config, write_hf_model

ARCHS = tuple(tiny_archs.ARCHS)  # qwen3_moe, mixtral, deepseek_v3, ... (`moelink make-tiny-model --list`)
FORMATS = tuple(tiny_archs.FORMATS)
_MLA_ARCHS = ("deepseek_v3", "deepseek_v2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
# make_tiny_model's sizes for the archs it sizes itself (tiny_archs.SIZED); None in its signature means these.
SIZE_DEFAULTS = dict(num_layers=2, hidden_size=64, num_experts=8, top_k=2, num_heads=4, num_kv_heads=2,
                     moe_intermediate_size=32, vocab_size=512, max_position_embeddings=1024, rope_theta=10000.0)
# Of those, what a preset family (tiny_archs.PRESETS) takes: its other fields go through `extra`.
_PRESET_ARGS = ("vocab_size", "max_position_embeddings")
MIN_VOCAB_SIZE = 300  # 256 byte tokens + specials + a few merges

# Init gains (std = gain / sqrt(fan_in)). Found by checking greedy
# generations: the router gain makes the top-k choice differ between tokens,
# the lm_head gain makes logits peaked enough that greedy decoding follows the
# context instead of repeating one token.
_ROUTER_GAIN = 2.0
_LM_HEAD_GAIN = 4.0
_NORM_NOISE = 0.1


def _fail(name: str, value, allowed: str) -> None:
    raise ValueError(f"make_tiny_model: {name}={value!r} is invalid: {allowed}.")


def _pos_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        _fail(name, value, "must be a positive integer")


def _validate(a: dict) -> None:
    for name in ("num_layers", "hidden_size", "num_experts", "top_k", "num_heads", "num_kv_heads",
                 "moe_intermediate_size", "max_position_embeddings", "decoder_sparse_step"):
        _pos_int(name, a[name])
    if a["top_k"] > a["num_experts"]:
        _fail("top_k", a["top_k"], f"must be <= num_experts ({a['num_experts']})")
    if a["num_heads"] % a["num_kv_heads"]:
        _fail("num_heads", a["num_heads"], f"must be a multiple of num_kv_heads ({a['num_kv_heads']})")
    if not isinstance(a["vocab_size"], int) or a["vocab_size"] < MIN_VOCAB_SIZE:
        _fail("vocab_size", a["vocab_size"], f"must be an integer >= {MIN_VOCAB_SIZE} (256 byte tokens + specials)")
    if a["head_dim"] is not None:
        _pos_int("head_dim", a["head_dim"])
    if a["arch"] in HF_ARCHS:
        _validate_hf_arch(a)
    elif a["extra"]:
        _fail("extra", dict(a["extra"]), f"applies to {', '.join(HF_ARCHS)} only")
    if a["arch"] == "mixtral":
        if a["hidden_size"] % a["num_heads"]:
            _fail("hidden_size", a["hidden_size"], f"must be divisible by num_heads ({a['num_heads']}) for mixtral")
        if a["head_dim"] is not None and a["head_dim"] != a["hidden_size"] // a["num_heads"]:
            _fail("head_dim", a["head_dim"], "must be None or hidden_size // num_heads for mixtral")
        if a["intermediate_size"] is not None:
            _fail("intermediate_size", a["intermediate_size"],
                  "applies to qwen3_moe dense layers only; mixtral's expert width is moe_intermediate_size")
        if a["norm_topk_prob"] is False:
            _fail("norm_topk_prob", a["norm_topk_prob"], "must be True for mixtral (it always renormalises its top-k)")
        if tuple(a["mlp_only_layers"]) or a["decoder_sparse_step"] != 1:
            _fail("mlp_only_layers", a["mlp_only_layers"], "must be empty (and decoder_sparse_step 1) for mixtral")
    elif a["intermediate_size"] is not None:
        _pos_int("intermediate_size", a["intermediate_size"])
    for layer in a["mlp_only_layers"]:
        if not isinstance(layer, int) or not 0 <= layer < a["num_layers"]:
            _fail("mlp_only_layers", list(a["mlp_only_layers"]), f"must hold layer indices in [0, {a['num_layers']})")
    if a["dtype"] not in DTYPES:
        _fail("dtype", a["dtype"], f"must be one of {', '.join(DTYPES)}")
    if a["max_shard_size"] is not None:
        _pos_int("max_shard_size", a["max_shard_size"])
    if not isinstance(a["rope_theta"], (int, float)) or not a["rope_theta"] > 0:
        _fail("rope_theta", a["rope_theta"], "must be a number > 0")
    if a["init_std"] is not None and not (isinstance(a["init_std"], (int, float)) and a["init_std"] > 0):
        _fail("init_std", a["init_std"], "must be None (fan-in scaled) or a number > 0")
    if not isinstance(a["seed"], int) or isinstance(a["seed"], bool):
        _fail("seed", a["seed"], "must be an integer")


def _validate_hf_arch(a: dict) -> None:
    if a["arch"] in _MLA_ARCHS and a["head_dim"] is not None:
        _fail("head_dim", a["head_dim"], "must be None for MLA models (set qk_rope_head_dim etc. through extra)")
    if tuple(a["mlp_only_layers"]) or a["decoder_sparse_step"] != 1:
        _fail("mlp_only_layers", list(a["mlp_only_layers"]), f"must be empty (and decoder_sparse_step 1) for "
              f"{a['arch']}: its dense layers are extra['first_k_dense_replace']")
    if a["arch"] == "deepseek_v2" and a["norm_topk_prob"]:
        _fail("norm_topk_prob", a["norm_topk_prob"], "must be None or False for deepseek_v2 (it never renormalises)")
    if a["intermediate_size"] is not None:
        _pos_int("intermediate_size", a["intermediate_size"])


def is_moe_layer(layer: int, mlp_only_layers: Sequence[int], decoder_sparse_step: int) -> bool:
    """Qwen3-MoE's rule (transformers Qwen3MoeDecoderLayer) for which layers are sparse."""
    return layer not in mlp_only_layers and (layer + 1) % decoder_sparse_step == 0


def make_tiny_model(
    out_dir: Union[str, Path],
    arch: str = "qwen3_moe",
    *,
    format: Optional[str] = None,
    num_layers: Optional[int] = None,
    hidden_size: Optional[int] = None,
    num_experts: Optional[int] = None,
    top_k: Optional[int] = None,
    num_heads: Optional[int] = None,
    num_kv_heads: Optional[int] = None,
    head_dim: Optional[int] = None,
    moe_intermediate_size: Optional[int] = None,
    intermediate_size: Optional[int] = None,
    vocab_size: Optional[int] = None,
    max_position_embeddings: Optional[int] = None,
    norm_topk_prob: Optional[bool] = None,
    rope_theta: Optional[float] = None,
    seed: int = 0,
    init_std: Optional[float] = None,
    dtype: str = "float32",
    max_shard_size: Optional[int] = None,
    mlp_only_layers: Sequence[int] = (),
    decoder_sparse_step: int = 1,
    extra: Optional[Mapping] = None,
    int4_group: int = 32,
    int4_zero_point: bool = False,
    fp8_block: tuple[int, int] = FP8_BLOCK,
) -> Path:
    """Write a random `arch` checkpoint in `format` with a trained byte-level BPE tokenizer; return its directory.

    arch: any of ARCHS, the arches the families declare (engine/models/<family>/tiny.py; `moelink make-tiny-model
        --list`: qwen3_moe, mixtral, deepseek_v3, deepseek_v2, glm4_moe, kimi_k2, kimi_k25, deepseek_v32,
        glm_moe_dsa, qwen3_next, qwen3_5_moe, gpt_oss, minimax_m2, deepseek_v4, mimo_v2_flash).
    format: None is the arch's default (float; int4 for kimi_k2 / kimi_k25); else one of the arch's formats
        (tiny_archs.ARCHS): fp8, mxfp4, int4, gptq, awq, nvfp4, published (DeepSeek-V4's).
    The sizes (num_layers .. rope_theta; None: SIZE_DEFAULTS) size qwen3_moe, mixtral, deepseek_v3, deepseek_v2,
    glm4_moe, kimi_k2 and kimi_k25. The other archs are their families' presets (tiny.py): `extra` sets any
    of their config fields as transformers names them (num_hidden_layers with layer_types, hidden_size, ...), and of
    the sizes only vocab_size and max_position_embeddings apply.
    head_dim: qwen3_moe and glm4_moe (default 16); mixtral uses hidden_size // num_heads; the MLA
        models (deepseek_v3, deepseek_v2) set their widths through `extra`.
    num_kv_heads: GQA models; MLA has one key and value per query head.
    norm_topk_prob: None is the family's rule (renormalise; never for deepseek_v2).
    moe_intermediate_size: width of each expert (Mixtral calls it intermediate_size).
    intermediate_size: dense-layer MLP width (qwen3_moe: layers in mlp_only_layers or off
        decoder_sparse_step; DeepSeek / GLM: the first_k_dense_replace layers); default 2 * moe_intermediate_size.
    extra: further config fields as transformers names them (DeepSeek / GLM: q_lora_rank, kv_lora_rank, n_group,
        topk_group, n_shared_experts, first_k_dense_replace, rope_parameters, ...; the presets: any field);
        num_nextn_predict_layers=n appends n MTP layers (deepseek_v3, glm4_moe: tiny_hf_model.add_mtp_layers).
    init_std: None scales each matrix by 1/sqrt(fan_in); a number uses that std everywhere.
    max_shard_size: bytes; above it the weights go to model-0000x-of-0000N.safetensors
        plus model.safetensors.index.json.
    int4_group, int4_zero_point: the INT4 formats' group (32, 64 or 128; hidden and expert widths follow it where
        not given) and zero points (asymmetric; awq always has them). fp8_block: the FP8 format's block.
    """
    tiny_arch = tiny_archs.check_arch(arch)
    fmt = tiny_archs.default_format(arch) if format is None else format
    tiny_archs.check_format(arch, fmt)
    if fmt in ("int4", "gptq", "awq") and int4_group not in INT4_GROUPS:
        _fail("int4_group", int4_group, f"must be one of {', '.join(map(str, INT4_GROUPS))}")
    if fmt == "fp8" and not (len(fp8_block) == 2 and all(isinstance(b, int) and b > 0 for b in fp8_block)):
        _fail("fp8_block", fp8_block, "must be two positive integers (rows, columns)")
    sizes = dict(num_layers=num_layers, hidden_size=hidden_size, num_experts=num_experts, top_k=top_k,
                 num_heads=num_heads, num_kv_heads=num_kv_heads, moe_intermediate_size=moe_intermediate_size,
                 vocab_size=vocab_size, max_position_embeddings=max_position_embeddings, rope_theta=rope_theta)
    out = Path(out_dir)
    if arch in tiny_archs.PRESETS:
        others = dict(head_dim=head_dim, intermediate_size=intermediate_size, norm_topk_prob=norm_topk_prob,
                      init_std=init_std, **{k: v for k, v in sizes.items() if k not in _PRESET_ARGS})
        for name, value in others.items():
            if value is not None:
                _fail(name, value, f"applies to {', '.join(tiny_archs.SIZED)} only: set {arch}'s config fields "
                                   f"through extra (--set FIELD=VALUE, as transformers names them)")
        if tuple(mlp_only_layers) or decoder_sparse_step != 1:
            _fail("mlp_only_layers", list(mlp_only_layers), f"applies to qwen3_moe only (for {arch}: extra)")
        return _make_preset(out, arch, fmt, seed=seed, dtype=dtype, max_shard_size=max_shard_size,
                            overrides={k: sizes[k] for k in _PRESET_ARGS if sizes[k] is not None},
                            extra=extra, int4_group=int4_group, int4_zero_point=int4_zero_point, fp8_block=fp8_block)
    if fmt in ("int4", "gptq", "awq"):  # INT4's reduction dims (hidden, expert width) a multiple of the group
        for name in ("hidden_size", "moe_intermediate_size"):
            if sizes[name] is None:
                sizes[name] = max(SIZE_DEFAULTS[name], int4_group)
    sizes = {k: SIZE_DEFAULTS[k] if v is None else v for k, v in sizes.items()}
    base = tiny_archs.SIZED[arch]
    kwargs = dict(sizes, head_dim=head_dim, intermediate_size=intermediate_size, norm_topk_prob=norm_topk_prob,
                  seed=seed, init_std=init_std, dtype=dtype, max_shard_size=max_shard_size,
                  mlp_only_layers=tuple(mlp_only_layers), decoder_sparse_step=decoder_sparse_step, extra=extra)
    _validate(dict(kwargs, arch=base))
    if fmt == "float" and arch == base:
        return _write_sized(out, base, **kwargs)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        src = _write_sized(Path(tmp) / "float", base, **kwargs)
        if tiny_arch.model_type is not None:
            tiny_archs.set_model_type(src, tiny_arch.model_type)
        out.mkdir(parents=True, exist_ok=True)
        tiny_archs.convert(src, out, arch, fmt, int4_group=int4_group, int4_symmetric=not int4_zero_point,
                           fp8_block=fp8_block)
    return out


def _make_preset(out: Path, arch: str, fmt: str, *, seed: int, dtype: str, max_shard_size: Optional[int],
                 overrides: dict, extra: Optional[Mapping], int4_group: int, int4_zero_point: bool,
                 fp8_block: tuple[int, int]) -> Path:
    """A family's preset (its tiny.py) in `fmt`: its config, the format's sizes, `overrides`, `extra` on top;
    bos / eos / pad the tokenizer's <|endoftext|> and generation_config.json's stops it and <|im_end|>."""
    if dtype not in DTYPES:
        _fail("dtype", dtype, f"must be one of {', '.join(DTYPES)}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        _fail("seed", seed, "must be an integer")
    if max_shard_size is not None:
        _pos_int("max_shard_size", max_shard_size)
        if fmt in tiny_archs.ARCHS[arch].own_formats:
            _fail("max_shard_size", max_shard_size, f"applies to {arch}'s float format only (its {fmt} format is "
                                                    "written as one file)")
    for name, value in overrides.items():
        _pos_int(name, value)
    if overrides.get("vocab_size", MIN_VOCAB_SIZE) < MIN_VOCAB_SIZE:
        _fail("vocab_size", overrides["vocab_size"], f"must be an integer >= {MIN_VOCAB_SIZE} (256 byte tokens + "
                                                     "specials)")
    fields = {**tiny_archs.format_overrides(arch, fmt, int4_group), **overrides, **dict(extra or {})}
    eos_id, im_end_id = SPECIAL_TOKENS.index(EOS_TOKEN), SPECIAL_TOKENS.index(IM_END)  # trained first: ids 0, 1, 2
    # Not pad_token_id: transformers zeroes the embedding row of the padding id, a token whose hidden state is then
    # 0 (DSA's index keys of it all tie); generation_config.json names the pad id instead.
    fields = {"bos_token_id": eos_id, "eos_token_id": eos_id, **fields}

    def write(dst: Path) -> Path:
        try:
            tiny_archs.write_preset(dst, arch, seed=seed, dtype=DTYPES[dtype], fmt=fmt, overrides=fields)
        except (TypeError, ValueError) as e:  # transformers' config classes name the bad field themselves
            if "make_tiny_model" in str(e):
                raise
            raise ValueError(f"make_tiny_model: transformers refused {arch}'s config: {e}") from None
        write_generation_config(dst, [eos_id, im_end_id], eos_id)
        if max_shard_size is not None:
            _reshard(dst, max_shard_size)
        return dst

    if fmt == "float":
        return write(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        src = write(Path(tmp) / "float")
        out.mkdir(parents=True, exist_ok=True)
        tiny_archs.convert(src, out, arch, fmt, int4_group=int4_group, int4_symmetric=not int4_zero_point,
                           fp8_block=fp8_block)
    return out


def _write_sized(
    out: Path,
    arch: str,
    *,
    num_layers: int,
    hidden_size: int,
    num_experts: int,
    top_k: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: Optional[int],
    moe_intermediate_size: int,
    intermediate_size: Optional[int],
    vocab_size: int,
    max_position_embeddings: int,
    norm_topk_prob: Optional[bool],
    rope_theta: float,
    seed: int,
    init_std: Optional[float],
    dtype: str,
    max_shard_size: Optional[int],
    mlp_only_layers: Sequence[int],
    decoder_sparse_step: int,
    extra: Optional[Mapping],
) -> Path:
    """qwen3_moe and mixtral written here, deepseek_v3 / deepseek_v2 / glm4_moe by tiny_hf_model.py, in float."""
    if norm_topk_prob is None:
        norm_topk_prob = arch != "deepseek_v2"
    if arch == "mixtral":
        head_dim = hidden_size // num_heads
    elif head_dim is None:
        head_dim = 16
    if intermediate_size is None:
        intermediate_size = 2 * moe_intermediate_size
    if arch in HF_ARCHS:
        common = dict(
            vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=num_heads, num_key_value_heads=num_heads if arch in _MLA_ARCHS else num_kv_heads,
            max_position_embeddings=max_position_embeddings, intermediate_size=intermediate_size,
            moe_intermediate_size=moe_intermediate_size, n_routed_experts=num_experts, num_experts_per_tok=top_k,
            norm_topk_prob=bool(norm_topk_prob), rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
            **({} if arch in _MLA_ARCHS else {"head_dim": head_dim}),
        )
        if arch == "glm4_moe":  # rope_parameters given whole: GLM's partial rotary default goes in with it
            common["rope_parameters"]["partial_rotary_factor"] = 0.5
        build_hf_config(arch, common, extra)  # transformers' checks, before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tiny_tokenizer(vocab_size)
    tokenizer.save(str(out / "tokenizer.json"))
    special_ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    eos_id, im_end_id = special_ids[EOS_TOKEN], special_ids[IM_END]
    if arch in HF_ARCHS:
        common.update(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
        write_hf_model(out, arch, common, extra, seed=seed, init_std=init_std, dtype=DTYPES[dtype],
                       max_shard_size=max_shard_size)
        write_generation_config(out, [eos_id, im_end_id], eos_id)
        write_tokenizer_configs(out, tokenizer, max_position_embeddings)
        return out

    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
        hidden_act="silu", max_position_embeddings=max_position_embeddings,
        initializer_range=init_std if init_std is not None else 0.02, rms_norm_eps=1e-6,
        use_cache=True, tie_word_embeddings=False, rope_theta=float(rope_theta), rope_scaling=None,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        attention_dropout=0.0, num_experts_per_tok=top_k, output_router_logits=False,
        bos_token_id=eos_id, eos_token_id=eos_id, torch_dtype=dtype, dtype=dtype,
    )
    if arch == "qwen3_moe":
        config = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", **common,
                      intermediate_size=intermediate_size, moe_intermediate_size=moe_intermediate_size,
                      num_experts=num_experts, norm_topk_prob=bool(norm_topk_prob),
                      decoder_sparse_step=decoder_sparse_step, mlp_only_layers=list(mlp_only_layers),
                      attention_bias=False, use_sliding_window=False, sliding_window=None,
                      max_window_layers=num_layers, router_aux_loss_coef=0.001)
    else:
        config = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", **common,
                      intermediate_size=moe_intermediate_size, num_local_experts=num_experts,
                      sliding_window=None, router_aux_loss_coef=0.02, router_jitter_noise=0.0)
    _write_json(out / "config.json", config)
    # Chat turns end with <|im_end|>, plain text with <|endoftext|>: both stop.
    _write_json(out / "generation_config.json",
                {"bos_token_id": eos_id, "eos_token_id": [eos_id, im_end_id], "pad_token_id": eos_id})
    write_tokenizer_configs(out, tokenizer, max_position_embeddings)

    shapes = list(_weight_shapes(config, arch, mlp_only_layers, decoder_sparse_step))
    tensors = _random_weights(shapes, seed=seed, init_std=init_std, dtype=DTYPES[dtype])
    _save_weights(out, tensors, max_shard_size)
    return out


def _reshard(out: Path, max_shard_size: int) -> None:
    """save_pretrained's file(s) split into shards of at most `max_shard_size` bytes (this module's own layout)."""
    from safetensors.torch import load_file

    files = sorted(out.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    for f in files:
        f.unlink()
    _save_weights(out, tensors, max_shard_size)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _weight_shapes(cfg: dict, arch: str, mlp_only_layers, sparse_step) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) in a fixed order; kind picks the init (norm / linear / router / embed / head)."""
    V, D, L = cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"]
    H, K, Dh = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    yield "model.embed_tokens.weight", (V, D), "embed"
    for i in range(L):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", (D,), "norm"
        yield f"{p}.self_attn.q_proj.weight", (H * Dh, D), "linear"
        yield f"{p}.self_attn.k_proj.weight", (K * Dh, D), "linear"
        yield f"{p}.self_attn.v_proj.weight", (K * Dh, D), "linear"
        yield f"{p}.self_attn.o_proj.weight", (D, H * Dh), "linear"
        if arch == "qwen3_moe":
            yield f"{p}.self_attn.q_norm.weight", (Dh,), "norm"
            yield f"{p}.self_attn.k_norm.weight", (Dh,), "norm"
        yield f"{p}.post_attention_layernorm.weight", (D,), "norm"
        if arch == "mixtral":
            yield from _moe_shapes(f"{p}.block_sparse_moe", _MIXTRAL_MLP, cfg["num_local_experts"],
                                   cfg["intermediate_size"], D)
        elif is_moe_layer(i, mlp_only_layers, sparse_step):
            yield from _moe_shapes(f"{p}.mlp", _QWEN_MLP, cfg["num_experts"], cfg["moe_intermediate_size"], D)
        else:
            yield from _mlp_shapes(f"{p}.mlp", _QWEN_MLP, cfg["intermediate_size"], D)
    yield "model.norm.weight", (D,), "norm"
    yield "lm_head.weight", (V, D), "head"


# A gated MLP's projections in checkpoint order, each "in" (I, D: gate and up) or "out" (D, I: down).
_QWEN_MLP = (("gate_proj", "in"), ("up_proj", "in"), ("down_proj", "out"))
_MIXTRAL_MLP = (("w1", "in"), ("w2", "out"), ("w3", "in"))


def _mlp_shapes(prefix: str, projs, I: int, D: int) -> Iterator[tuple[str, tuple[int, ...], str]]:
    for name, io in projs:
        yield f"{prefix}.{name}.weight", (I, D) if io == "in" else (D, I), "linear"


def _moe_shapes(prefix: str, projs, E: int, I: int, D: int) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """The router (`gate`), then each expert's gated MLP (both architectures name them `experts.{j}`)."""
    yield f"{prefix}.gate.weight", (E, D), "router"
    for j in range(E):
        yield from _mlp_shapes(f"{prefix}.experts.{j}", projs, I, D)


def _random_weights(shapes, *, seed: int, init_std: Optional[float], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # One generator drawn in the fixed order of `shapes`: same seed, same bytes.
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape, kind in shapes:
        if kind == "norm":
            w = 1.0 + _NORM_NOISE * torch.randn(shape, generator=gen)
        else:
            fan_in = shape[-1]
            if kind == "embed":
                std = 1.0  # followed by RMSNorm, so only direction matters
            elif init_std is not None:
                std = init_std
            else:
                gain = {"router": _ROUTER_GAIN, "head": _LM_HEAD_GAIN}.get(kind, 1.0)
                std = gain / math.sqrt(fan_in)
            w = std * torch.randn(shape, generator=gen)
        tensors[name] = w.to(dtype).contiguous()
    return tensors


def _save_weights(out: Path, tensors: dict[str, torch.Tensor], max_shard_size: Optional[int]) -> None:
    # Stale shards from an earlier call would leave a mixed checkpoint behind.
    for old in list(out.glob("model*.safetensors")) + [out / "model.safetensors.index.json"]:
        if old.exists():
            old.unlink()
    metadata = {"format": "pt"}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_size is None or total <= max_shard_size:
        save_file(tensors, str(out / "model.safetensors"), metadata=metadata)
        umask_mode([out / "model.safetensors"])
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        # Greedy packing like transformers' save_pretrained; a tensor larger
        # than the limit gets a shard of its own.
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    n = len(shards)
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(out / fname), metadata=metadata)
        umask_mode([out / fname])
        weight_map.update({name: fname for name in shard})
    _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def register_cli(subparsers) -> None:
    """Add `make-tiny-model OUT ...` to an argparse subparsers object."""
    import argparse

    p = subparsers.add_parser("make-tiny-model", help="write a tiny random MoE checkpoint of any family moelink serves, "
                              "in any format it reads (for tests and demos; --list names them)",
                              description=make_tiny_model.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", help="output directory")
    p.add_argument("--list", action="store_true", help="print every arch and format (which arch takes which) and exit")
    p.add_argument("--arch", choices=ARCHS, default="qwen3_moe", metavar="ARCH",
                   help=f"one of {', '.join(ARCHS)} (default: %(default)s)")
    p.add_argument("--format", choices=FORMATS, default=None, metavar="FORMAT",
                   help=f"one of {', '.join(FORMATS)} (default: the arch's first in --list: float; int4 for kimi_k2 "
                        "and kimi_k25)")
    size = "default %s; qwen3_moe, mixtral, deepseek_v3, deepseek_v2, glm4_moe, kimi_k2, kimi_k25 (others: --set)"
    p.add_argument("--num-layers", type=int, default=None, help=size % SIZE_DEFAULTS["num_layers"])
    p.add_argument("--hidden-size", type=int, default=None, help=size % SIZE_DEFAULTS["hidden_size"])
    p.add_argument("--num-experts", type=int, default=None, help=size % SIZE_DEFAULTS["num_experts"])
    p.add_argument("--top-k", type=int, default=None, help=size % SIZE_DEFAULTS["top_k"])
    p.add_argument("--num-heads", type=int, default=None, help=size % SIZE_DEFAULTS["num_heads"])
    p.add_argument("--num-kv-heads", type=int, default=None, help=size % SIZE_DEFAULTS["num_kv_heads"])
    p.add_argument("--head-dim", type=int, default=None, help="qwen3_moe and glm4_moe (default 16)")
    p.add_argument("--moe-intermediate-size", type=int, default=None,
                   help="width of each expert; " + size % SIZE_DEFAULTS["moe_intermediate_size"])
    p.add_argument("--intermediate-size", type=int, default=None, help="dense-layer MLP width")
    p.add_argument("--mlp-only-layers", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                   help="qwen3_moe: comma-separated dense layer indices")
    p.add_argument("--decoder-sparse-step", type=int, default=1)
    p.add_argument("--vocab-size", type=int, default=None, help="default 512 (the presets: 400)")
    p.add_argument("--max-position-embeddings", type=int, default=None, help="default 1024 (the presets: 512)")
    p.add_argument("--rope-theta", type=float, default=None, help=size % SIZE_DEFAULTS["rope_theta"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-std", type=float, default=None)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--max-shard-size", type=int, default=None, help="bytes per safetensors shard")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="FIELD=VALUE", type=_field_value,
                   help="a further config field as transformers names it, VALUE as JSON (e.g. --set "
                        "q_lora_rank=null --set n_group=4; for the preset archs any field, e.g. --set "
                        "num_experts=8); repeatable; not for qwen3_moe / mixtral")
    p.add_argument("--int4-group", type=int, default=32, help="int4 / gptq / awq: the group (32, 64 or 128)")
    p.add_argument("--int4-zero-point", action="store_true", help="int4 / gptq: asymmetric, with zero points")
    p.add_argument("--fp8-block", type=int, nargs=2, default=list(FP8_BLOCK), metavar=("BN", "BK"),
                   help="fp8: the block (default %(default)s at these sizes)")
    p.set_defaults(func=_run_cli)


def _field_value(text: str) -> tuple[str, object]:
    import argparse

    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--set {text!r} is invalid: expected FIELD=VALUE.")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value  # a bare word: a string


def _run_cli(args) -> None:
    if args.list:
        print(tiny_archs.listing())
        return
    if args.out is None:
        raise ValueError("make-tiny-model needs OUT, the output directory (or --list).")
    path = make_tiny_model(
        args.out, args.arch, format=args.format, num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_experts=args.num_experts, top_k=args.top_k, num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads, head_dim=args.head_dim,
        moe_intermediate_size=args.moe_intermediate_size, intermediate_size=args.intermediate_size,
        mlp_only_layers=args.mlp_only_layers, decoder_sparse_step=args.decoder_sparse_step,
        vocab_size=args.vocab_size, max_position_embeddings=args.max_position_embeddings,
        rope_theta=args.rope_theta, seed=args.seed, init_std=args.init_std, dtype=args.dtype,
        max_shard_size=args.max_shard_size, extra=dict(args.extra), int4_group=args.int4_group,
        int4_zero_point=args.int4_zero_point, fp8_block=tuple(args.fp8_block))
    print(path)
