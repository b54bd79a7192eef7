"""The EAGLE-3 draft head (engine/spec/heads/eagle3.py, loaded by engine/spec/proposer/eagle3_loader.py) against an independent
float64 oracle, and bad head checkpoints refused.

Oracle: the published architecture in plain torch (vLLM's and SGLang's llama_eagle3.py; module docstring of
engine/spec/heads/eagle3.py), over each whole sequence with a causal mask, reading the checkpoint's tensors:
    g = fc([h_low | h_mid | h_high]);  e = rms(embed(tok), input_layernorm);  r = g (or rms(g, hidden_norm))
    a = o_proj(softmax(q k^T / sqrt(H) + causal) v) with q, k, v from [e | rms(g, hidden_norm)], roped at 0..n-1
    r = a + r;  y = down(silu(gate(x)) * up(x)) + r with x = rms(r, post_attention_layernorm)
    logits = rms(y, norm) @ lm_head^T (draft vocabulary);  target id = draft id + d2t[draft id]
RMSNorm normalises in float32 and rope's angles are float32, as Llama's transformers modules compute them.
The head runs the sequences as steps over a paged KV cache: their prefixes (positions from 0), then the rest at
positions > 0 (a 3-token chunk and a decode token) reading that cache, then one chained draft step whose
conditioning state is the head's own previous output; every step's rows must equal the oracle's to 1e-10.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from moelink.engine.config.eagle3 import eagle3_aux_layers, read_eagle3_config
from moelink.engine.spec.heads.eagle3 import Eagle3Head
from moelink.engine.models.layers import ForwardContext
from moelink.engine.spec.proposer.eagle3_loader import load_eagle3_head
from moelink.engine.tools.eagle3_checkpoint import write_eagle3_checkpoint
from moelink.kernels.ops import ReferenceKernels
from tests.helpers.paged_meta import paged_meta

CPU = torch.device("cpu")
BLOCK = 4
KV_INDEX = 3  # as if the target had 3 layers: the head's cache after theirs
SEQS = ((5, 3), (7, 1))  # (prefix tokens of the first step, tokens of the second step) per sequence

# name -> (write_eagle3_checkpoint arguments, whether the head shares the target's embedding / head)
CASES = {
    # Qwen3-like: own embedding and head, a draft vocabulary with d2t / t2d, rope theta 1e6.
    "own_tables": (dict(rope_theta=1e6, head_dim=16), False),
    # Full vocabulary, no embedding, head or d2t of its own (the target's; identity map), vLLM's
    # norm_before_residual, attention biases.
    "shared_tables": (dict(draft_vocab_size=None, embeddings=False, lm_head=False, vocab_map=False,
                           norm_before_residual=True, attention_bias=True), True),
    # A target wider than the head (target_hidden_size), N * H != D.
    "wide_target": (dict(target_hidden_size=48, head_dim=16, num_attention_heads=2, num_key_value_heads=1,
                         aux_layer_ids=[1, 2, 3]), False),
}


def _rms(x, w, eps):
    x32 = x.to(torch.float32)
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x_nXH, theta):
    """Llama's rotate-half rope at positions 0..n-1 (angles in float32, as transformers)."""
    n, H = x_nXH.shape[0], x_nXH.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, H, 2, dtype=torch.float32) / H))
    ang = torch.arange(n, dtype=torch.float32)[:, None] * inv[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(x_nXH.dtype)[:, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(x_nXH.dtype)[:, None, :]
    rot = torch.cat([-x_nXH[..., H // 2:], x_nXH[..., : H // 2]], -1)
    return x_nXH * cos + rot * sin


def _reference(t: dict, cfg: dict, ids, g):
    """One sequence: the oracle's output rows y [n, D] and draft logits [n, Vd] (module docstring)."""
    eps, D = cfg["rms_norm_eps"], cfg["hidden_size"]
    N, K = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    H = cfg.get("head_dim") or D // N
    p = "midlayer."

    def lin(x, name):
        return F.linear(x, t[f"{p}{name}.weight"], t.get(f"{p}{name}.bias"))

    n = len(ids)
    e = _rms(t["embed_tokens.weight"][ids], t[p + "input_layernorm.weight"], eps)
    gn = _rms(g, t[p + "hidden_norm.weight"], eps)
    r = gn if cfg.get("norm_before_residual") else g
    x = torch.cat([e, gn], -1)
    q = _rope(lin(x, "self_attn.q_proj").view(n, N, H), cfg["rope_theta"])
    k = _rope(lin(x, "self_attn.k_proj").view(n, K, H), cfg["rope_theta"]).repeat_interleave(N // K, dim=1)
    v = lin(x, "self_attn.v_proj").view(n, K, H).repeat_interleave(N // K, dim=1)
    s = torch.einsum("qnh,knh->nqk", q, k) * H**-0.5
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    a = lin(torch.einsum("nqk,knh->qnh", s.softmax(-1), v).reshape(n, N * H), "self_attn.o_proj")
    r = a + r
    xm = _rms(r, t[p + "post_attention_layernorm.weight"], eps)
    y = lin(F.silu(lin(xm, "mlp.gate_proj")) * lin(xm, "mlp.up_proj"), "mlp.down_proj") + r
    return y, F.linear(_rms(y, t["norm.weight"], eps), t["lm_head.weight"])


def _meta(starts, lens, tables, num_blocks):
    return paged_meta(starts, lens, tables, num_blocks, BLOCK)


def _target_tables(V: int, D: int):
    g = torch.Generator().manual_seed(99)
    return (torch.randn(V, D, generator=g, dtype=torch.float64) * 0.2,
            torch.randn(V, D, generator=g, dtype=torch.float64) * 0.2)


@pytest.mark.parametrize("name", list(CASES))
def test_head_matches_published_forward_in_float64(tmp_path, name):
    kw, shared = CASES[name]
    kw = dict(kw)
    embeddings, lm_head, vocab_map = (kw.pop(k, True) for k in ("embeddings", "lm_head", "vocab_map"))
    path = write_eagle3_checkpoint(tmp_path / name, seed=len(name), embeddings=embeddings, lm_head=lm_head,
                                   vocab_map=vocab_map, **kw)
    cfg = json.loads((path / "config.json").read_text())
    t = {k: (v.to(torch.float64) if v.is_floating_point() else v) for k, v in load_file(str(path / "model.safetensors")).items()}
    D, V = cfg["hidden_size"], cfg["vocab_size"]
    Vd, Dt = cfg.get("draft_vocab_size", V), cfg.get("target_hidden_size", D)
    target_embed, target_head = _target_tables(V, D)
    if shared:
        t["embed_tokens.weight"], t["lm_head.weight"] = target_embed, target_head
    head = load_eagle3_head(path, ReferenceKernels(), CPU, dtype=torch.float64, kv_cache_index=KV_INDEX,
                            embed_tokens=target_embed if shared else None, lm_head=target_head if shared else None)
    assert (head.own_embed, head.own_head, head.has_d2t) == (not shared, not shared, not shared)

    g = torch.Generator().manual_seed(7)
    ids = [torch.randint(0, V, (a + n + 1,), generator=g) for a, n in SEQS]
    aux = [[torch.randn(a + n, Dt, generator=g, dtype=torch.float64) for _ in range(3)] for a, n in SEQS]
    tables, num_blocks = [[0, 5, 2], [4, 1, 3]], 6  # out of order: slots come from the tables
    caches = [() for _ in range(KV_INDEX)] + [tuple(torch.zeros(s, dtype=torch.float64)
                                                    for s in head.cfg.attention.cache_shapes(num_blocks, BLOCK))]
    ys = [[] for _ in SEQS]
    with torch.no_grad():
        hidden = [head.combine_hidden(*h) for h in aux]  # the target's states at every position
        torch.testing.assert_close(hidden[0], torch.cat(aux[0], -1) @ t["fc.weight"].T, rtol=1e-12, atol=1e-12)
        # The prefixes, then the rest over the cached prefixes, then one chained step: position a + n, conditioned
        # on the head's own output at a + n - 1 (drafting past what the target has seen).
        for step in range(3):
            starts = [0, 0] if step == 0 else [a for a, _ in SEQS] if step == 1 else [a + n for a, n in SEQS]
            lens = [a for a, _ in SEQS] if step == 0 else [n for _, n in SEQS] if step == 1 else [1, 1]
            rows = [slice(s, s + n) for s, n in zip(starts, lens)]
            cond = ([h[r] for h, r in zip(hidden, rows)] if step < 2 else [y[-1][-1:] for y in ys])
            ctx = ForwardContext(_meta(starts, lens, tables, num_blocks), caches)
            y = head(torch.cat([torch.arange(r.start, r.stop) for r in rows]),
                     torch.cat([i[r] for i, r in zip(ids, rows)]), torch.cat(cond), ctx)
            logits = head.compute_logits(y)
            for s, part in enumerate(y.split(lens)):
                ys[s].append(part)
            want = [_reference(t, cfg, i[: r.stop], torch.cat([h[: min(r.stop, len(h))]] + ([c] if step == 2 else [])))
                    for i, r, h, c in zip(ids, rows, hidden, cond)]
            torch.testing.assert_close(y, torch.cat([w[0][r] for w, r in zip(want, rows)]), rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(logits, torch.cat([w[1][r] for w, r in zip(want, rows)]), rtol=1e-10,
                                       atol=1e-10)
        # Draft ids to target ids: through d2t (the sorted subset t2d marks), or the identity.
        draft = logits.argmax(-1)
        want_ids = (t["t2d"].nonzero().flatten()[draft] if "d2t" in t else draft)
        assert torch.equal(head.to_target_ids(draft), want_ids)
        full = head.target_logits(logits)
        assert full.shape == (2, V) and torch.equal(full.argmax(-1), want_ids)
        assert int(torch.isfinite(full).sum()) == 2 * Vd


def test_aux_layers_follow_vllm_sglang_default_and_the_trainers_ids(tmp_path):
    cfg = read_eagle3_config(write_eagle3_checkpoint(tmp_path / "default"))
    assert eagle3_aux_layers(cfg, 36) == (2, 18, 33)  # Qwen3-8B: the input of layers 2, 18, 33
    # SpecForge's ids for DeepSeek-V3 (61 layers) are layer outputs: the default's states.
    named = read_eagle3_config(write_eagle3_checkpoint(tmp_path / "named", aux_layer_ids=[1, 29, 57]))
    assert eagle3_aux_layers(named, 61) == eagle3_aux_layers(cfg, 61) == (2, 30, 58)
    with pytest.raises(ValueError, match=r"after layers \[2, 30, 58\] do not exist in a target of 40 layers"):
        eagle3_aux_layers(named, 40)


def _edit(path, change=None, config=None):
    """Rewrite the head checkpoint at `path`: `change(tensors)` edits its tensors, `config(cfg)` its config.json."""
    if change is not None:
        tensors = load_file(str(path / "model.safetensors"))
        change(tensors)
        save_file(tensors, str(path / "model.safetensors"))
    if config is not None:
        cfg = json.loads((path / "config.json").read_text())
        config(cfg)
        (path / "config.json").write_text(json.dumps(cfg))
    return path


def _load(path, **kw):
    return load_eagle3_head(path, ReferenceKernels(), CPU, dtype=torch.float32, kv_cache_index=0, **kw)


def _bad_d2t(t):
    t["d2t"][3] = 10_000


def _twin_d2t(t):
    t["d2t"][1] = t["d2t"][0] - 1  # draft id 1 onto draft id 0's target id


def _shift_t2d(t):
    t["t2d"] = t["t2d"].roll(1)


BAD_TENSORS = {
    "missing": (lambda t: t.pop("midlayer.mlp.up_proj.weight"), r"missing 'midlayer\.mlp\.up_proj\.weight'"),
    "extra": (lambda t: t.update({"layers.0.mlp.up_proj.bias": torch.zeros(48)}),
              r"unexpected 'layers\.0\.mlp\.up_proj\.bias' \(not a tensor of the EAGLE-3 format\)"),
    "shape": (lambda t: t.update({"fc.weight": torch.zeros(32, 64)}),
              r"'fc\.weight' has shape \(32, 64\), config\.json gives \(32, 96\)"),
    "dtype": (lambda t: t.update({"d2t": t["d2t"].float()}), r"'d2t' is F32, must be an integer tensor"),
    "out_of_range": (_bad_d2t, r"'d2t' maps draft id 3 to target id \d+, outside the target vocabulary \[0, 96\)"),
    "twin": (_twin_d2t, r"'d2t' maps two draft ids to the same target id"),
    "t2d": (_shift_t2d, r"'t2d' and 'd2t' disagree"),
    "no_d2t": (lambda t: t.pop("d2t"), r"has no d2t: its draft vocabulary \(draft_vocab_size=40\) needs"),
    "no_embed": (lambda t: t.pop("embed_tokens.weight"), r"has no embed_tokens\.weight: .* pass it \(embed_tokens=\.\.\.\)"),
    "no_head": (lambda t: t.pop("lm_head.weight"), r"has no lm_head\.weight: its draft vocabulary"),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_bad_checkpoint_tensors_are_refused_naming_them(tmp_path, case):
    change, message = BAD_TENSORS[case]
    path = _edit(write_eagle3_checkpoint(tmp_path / "head"), change)
    with pytest.raises(ValueError, match=message):
        _load(path)


def test_inventory_errors_come_together(tmp_path):
    def change(t):
        t.pop("norm.weight")
        t["midlayer.self_attn.o_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"missing 'norm\.weight'; 'midlayer\.self_attn\.o_proj\.weight' has shape"):
        _load(_edit(write_eagle3_checkpoint(tmp_path / "head"), change))


BAD_CONFIGS = {
    "arch": (lambda c: c.update(architectures=["LlamaForCausalLM"]),
             r"architectures=\['LlamaForCausalLM'\] is invalid: allowed: LlamaForCausalLMEagle3"),
    "layers": (lambda c: c.update(num_hidden_layers=2), r"num_hidden_layers=2 is invalid"),
    "rope": (lambda c: c.update(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
             r"rope_scaling\.rope_type='llama3' is invalid: allowed: default, yarn"),
    "hidden": (lambda c: c.pop("hidden_size"), r"has no hidden_size: it is required"),
    "vocab": (lambda c: c.update(draft_vocab_size=200), r"draft_vocab_size=200 is invalid: must be at most vocab_size=96"),
    "heads": (lambda c: c.update(num_key_value_heads=3), r"num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    "aux_ids": (lambda c: c.update(eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 2]}),
                r"eagle_aux_hidden_state_layer_ids=\[1, 2\] is invalid: must be three layer indices"),
    "no_aux": (lambda c: c.update(eagle_config={"use_aux_hidden_state": False}),
               r"eagle_config\.use_aux_hidden_state=False is invalid"),
    "act": (lambda c: c.update(hidden_act="gelu"), r"hidden_act='gelu' is invalid: must be 'silu'"),
    "bool": (lambda c: c.update(norm_before_residual="yes"), r"norm_before_residual='yes' is invalid: must be true or false"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_fields_are_refused_naming_them(tmp_path, case):
    change, message = BAD_CONFIGS[case]
    path = _edit(write_eagle3_checkpoint(tmp_path / "head"), config=change)
    with pytest.raises(ValueError, match=message):
        read_eagle3_config(path)


def test_shared_tables_are_checked(tmp_path):
    path = write_eagle3_checkpoint(tmp_path / "head", draft_vocab_size=None, embeddings=False, vocab_map=False)
    with pytest.raises(ValueError, match=r"the target's embed_tokens is \(96, 16\), the head needs \(96, 32\)"):
        _load(path, embed_tokens=torch.zeros(96, 16))
    head = _load(path, embed_tokens=torch.zeros(96, 32))
    assert head.own_head and not head.own_embed
    wide = write_eagle3_checkpoint(tmp_path / "wide", target_hidden_size=48, embeddings=False)
    with pytest.raises(ValueError, match=r"target's embedding is 48 wide, not the head's hidden_size=32"):
        _load(wide, embed_tokens=torch.zeros(96, 48))


def test_head_module_is_built_from_config_alone(tmp_path):
    """Eagle3Head without the loader (random weights, the integrator's dummy path): shapes follow config.json."""
    cfg = read_eagle3_config(write_eagle3_checkpoint(tmp_path / "head", target_hidden_size=48))
    names = {"embed_tokens.weight", "lm_head.weight", "d2t"}
    head = Eagle3Head(cfg, ReferenceKernels(), CPU, dtype=torch.float32, kv_cache_index=5, checkpoint_names=names,
                      max_positions=4096)
    assert head.self_attn.qkv_proj.weight.shape == (32 + 2 * 16, 64) and head.self_attn.layer_idx == 5
    assert head.fc.weight.shape == (32, 144) and head.self_attn.rope.table_PR.shape[0] == 4096
    assert set(head.weight_plan()) >= names
