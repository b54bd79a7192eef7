"""make_tiny_model: checkpoints that transformers loads exactly, deterministic, non-degenerate."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from moelink.engine.tools.tiny_model import make_tiny_model, register_cli
from moelink.engine.core.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

ARCHS = ["qwen3_moe", "mixtral"]
PROMPTS = ["Hello, my name is", "The capital of France is", "def fibonacci(n):", "中文 😀 emoji"]
STRINGS = PROMPTS + ["", " two  spaces", "Zürich naïve “x” …", "👨‍👩‍👧🇫🇷", "<|im_start|>user\nhi<|im_end|>"]


def _load(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
    return model.eval(), info


def _assert_clean(info):
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert not info["error_msgs"], info


def _dir_digest(path):
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    arch = request.param
    path = make_tiny_model(tmp_path_factory.mktemp(arch) / "m", arch)
    model, info = _load(path)
    return arch, path, model, info


def test_transformers_loads_every_weight(tiny):
    arch, path, model, info = tiny
    _assert_clean(info)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == [{"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}[arch]]
    assert cfg["model_type"] == arch and cfg["tie_word_embeddings"] is False and cfg["rms_norm_eps"] == 1e-6
    assert cfg["num_experts_per_tok"] == 2
    assert cfg["head_dim"] == 16
    names = load_file(str(path / "model.safetensors")).keys()
    if arch == "qwen3_moe":
        assert cfg["num_experts"] == 8 and cfg["moe_intermediate_size"] == 32 and cfg["norm_topk_prob"] is True
        assert {"model.layers.1.mlp.gate.weight", "model.layers.1.mlp.experts.7.down_proj.weight",
                "model.layers.0.self_attn.q_norm.weight"} <= set(names)
    else:
        assert cfg["num_local_experts"] == 8 and cfg["intermediate_size"] == 32
        assert {"model.layers.1.block_sparse_moe.gate.weight",
                "model.layers.1.block_sparse_moe.experts.7.w2.weight"} <= set(names)
        assert not any("q_norm" in n for n in names)
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [0, 2]


def test_greedy_generation_is_varied_and_routing_differs(tiny):
    arch, path, model, _ = tiny
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path))
    outputs = []
    for prompt in PROMPTS:
        ids = torch.tensor([hf_tok.encode(prompt)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
        new = out[0, ids.shape[1]:].tolist()
        assert len(set(new)) >= 8, f"degenerate greedy output for {prompt!r}: {new}"
        outputs.append(tuple(new))
    assert len(set(outputs)) == len(PROMPTS)
    ids = torch.tensor([hf_tok.encode("The quick brown fox jumps over the lazy dog. " * 2)])
    with torch.no_grad():
        router_logits = model(ids, output_router_logits=True).router_logits
    for logits in router_logits:
        chosen = {tuple(sorted(row)) for row in torch.topk(logits, 2, dim=-1).indices.tolist()}
        assert len(chosen) >= 5, "router sends every token to the same experts"


def test_our_tokenizer_matches_autotokenizer(tiny):
    _, path, _, _ = tiny
    ours, ref = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(str(path))
    for s in STRINGS:
        assert ours.encode(s) == ref.encode(s), s
    assert ours.vocab_size == len(ref) <= json.loads((path / "config.json").read_text())["vocab_size"]
    msgs = [{"role": "user", "content": "Hi 😀"}]
    text = ours.apply_chat_template(msgs)
    assert text == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi 😀<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("arch", ARCHS)
def test_sharded_checkpoint_loads_and_matches(arch, tmp_path):
    kwargs = dict(num_layers=3, vocab_size=320)
    if arch == "qwen3_moe":
        kwargs["mlp_only_layers"] = (0,)  # a dense layer: .mlp.gate_proj/up_proj/down_proj
    whole = make_tiny_model(tmp_path / "whole", arch, **kwargs)
    sharded = make_tiny_model(tmp_path / "sharded", arch, max_shard_size=60_000, **kwargs)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (sharded / "model.safetensors").exists()
    ref = load_file(str(whole / "model.safetensors"))
    assert set(index["weight_map"]) == set(ref)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ref.values())
    m_whole, _ = _load(whole)
    m_sharded, info = _load(sharded)
    _assert_clean(info)
    ids = torch.tensor([[5, 17, 200, 33, 8]])
    with torch.no_grad():
        assert torch.equal(m_whole(ids).logits, m_sharded(ids).logits)


def test_bfloat16_dtype(tmp_path):
    path = make_tiny_model(tmp_path / "bf16", "qwen3_moe", dtype="bfloat16", num_layers=1)
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(path / "model.safetensors")).values())
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
    _, info = _load(path)
    _assert_clean(info)


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_deterministic(tmp_path):
    a = make_tiny_model(tmp_path / "a", "mixtral", seed=3)
    b = make_tiny_model(tmp_path / "b", "mixtral", seed=3)
    c = make_tiny_model(tmp_path / "c", "mixtral", seed=4)
    assert _dir_digest(a) == _dir_digest(b)
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    # Another process (fresh hash seeds, fresh tokenizers thread pool) writes the same bytes.
    code = ("import sys; from moelink.engine.tools.tiny_model import make_tiny_model; "
            "make_tiny_model(sys.argv[1], 'mixtral', seed=3)")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "d")], check=True,
                   env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert _dir_digest(tmp_path / "d") == _dir_digest(a)


@pytest.mark.parametrize("kwargs, field", [
    (dict(arch="gpt2"), "arch"),
    (dict(top_k=9), "top_k"),
    (dict(num_heads=6, num_kv_heads=4), "num_heads"),
    (dict(vocab_size=299), "vocab_size"),
    (dict(dtype="int8"), "dtype"),
    (dict(num_layers=0), "num_layers"),
    (dict(mlp_only_layers=(5,)), "mlp_only_layers"),
    (dict(max_shard_size=0), "max_shard_size"),
    (dict(arch="mixtral", head_dim=32), "head_dim"),
    (dict(arch="mixtral", intermediate_size=64), "intermediate_size"),
    (dict(arch="mixtral", norm_topk_prob=False), "norm_topk_prob"),
    (dict(decoder_sparse_step=0), "decoder_sparse_step"),
    (dict(arch="deepseek_v3", head_dim=16), "head_dim"),
    (dict(arch="deepseek_v2", norm_topk_prob=True), "norm_topk_prob"),
    (dict(arch="glm4_moe", mlp_only_layers=(0,)), "mlp_only_layers"),
    (dict(extra={"n_group": 2}), "extra"),
])
def test_invalid_arguments_name_the_field(tmp_path, kwargs, field):
    arch = kwargs.pop("arch", "qwen3_moe")
    with pytest.raises(ValueError, match=rf"\b{field}="):
        make_tiny_model(tmp_path / "x", arch, **kwargs)
    assert not (tmp_path / "x").exists(), "nothing is written when the arguments are wrong"


def test_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="moelink")
    register_cli(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli"
    args = parser.parse_args(["make-tiny-model", str(out), "--arch", "mixtral", "--num-layers", "1",
                              "--num-experts", "4", "--top-k", "1", "--vocab-size", "400",
                              "--max-shard-size", "50000", "--seed", "7"])
    args.func(args)
    assert capsys.readouterr().out.strip() == str(out)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["vocab_size"]) == (1, 4, 1, 400)
    assert (out / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("arch,shard", [("qwen3_moe", None), ("mixtral", 50_000), ("deepseek_v3", None)])
def test_weights_get_the_mode_of_every_other_file(tmp_path, arch, shard):
    """safetensors writes weights 0600 whatever the umask (issue 27, item 11): they must read like config.json,
    0666 minus the umask, whether moelink (one file or shards) or transformers (save_pretrained) wrote them."""
    for umask, want in ((0o022, 0o644), (0o027, 0o640)):
        old = os.umask(umask)
        try:
            out = make_tiny_model(tmp_path / f"{arch}-{umask:o}", arch, num_layers=1, num_experts=4, top_k=1,
                                  vocab_size=400, max_shard_size=shard)
        finally:
            os.umask(old)
        modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()}
        assert any(name.endswith(".safetensors") for name in modes)
        assert modes == dict.fromkeys(modes, want), modes


# -- DeepSeek-V3, DeepSeek-V2, GLM-4-MoE: built and saved by transformers (engine/tools/tiny_hf_model.py) -------------
FAMILIES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
            "glm4_moe": "Glm4MoeForCausalLM"}


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_family_checkpoints_load_clean_and_run_like_transformers(arch, tmp_path):
    from moelink.engine import LLM

    from tests.helpers.parity import assert_same, engine_greedy, hf_greedy, prompts

    path = make_tiny_model(tmp_path / arch, arch, num_layers=3, num_experts=6, vocab_size=400)
    _, info = _load(path)
    _assert_clean(info)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == [FAMILIES[arch]] and cfg["n_routed_experts"] == 6
    assert (cfg["first_k_dense_replace"], cfg["n_shared_experts"]) == (1, 1)
    ps = prompts(400, seed=2, n=4, hi=40)
    llm = LLM(str(path), dtype="float64", num_kv_blocks=64)
    got = engine_greedy(llm, ps)
    assert len({t for out in got for t in out}) > 10, "degenerate model: greedy outputs barely vary"
    assert_same(got, hf_greedy(str(path), ps), ps)


def test_family_cli_extra_fields_and_determinism(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="moelink")
    register_cli(parser.add_subparsers(dest="command"))
    argv = ["--arch", "deepseek_v3", "--num-layers", "2", "--num-experts", "6", "--vocab-size", "400",
            "--set", "q_lora_rank=null", "--set", "n_group=3", "--set", "topk_group=2", "--seed", "3"]
    for name in ("a", "b"):
        args = parser.parse_args(["make-tiny-model", str(tmp_path / name), *argv])
        args.func(args)
    assert capsys.readouterr().out.split() == [str(tmp_path / "a"), str(tmp_path / "b")]
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["q_lora_rank"] is None and (cfg["n_group"], cfg["topk_group"]) == (3, 2)
    assert _dir_digest(tmp_path / "a") == _dir_digest(tmp_path / "b")
    with pytest.raises(SystemExit):
        parser.parse_args(["make-tiny-model", str(tmp_path / "c"), "--set", "no-equals-sign"])
