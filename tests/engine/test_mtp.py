"""The MTP drafter layer (engine/spec/heads/mtp.py) against an independent float64 oracle, and MTP checkpoints in the
main engine.

Oracle: the published forward (DeepSeek-V3 report sec. 2.2) in plain torch around transformers' own decoder
layer (DeepseekV3DecoderLayer: MLA; Glm4MoeDecoderLayer: GQA with partial rotary, q/k norm, qkv bias) at index
num_hidden_layers, holding the checkpoint's MTP tensors, run over each whole sequence with a causal mask:
    x = eh_proj([enorm(emb(tok_{t+1})) | hnorm(h_t)]);  y = layer(x);  logits = head(shared_head.norm(y))
The MTPLayer runs the same sequences as a step over their first tokens (its KV cache filled), then a step
over the rest at positions > 0 (a 3-token chunk and a decode token) reading that cache; both steps' outputs
and logits must equal the oracle's rows to ~1e-10. The checkpoints are tests.helpers.hf_checkpoints' (saved by
transformers) with random MTP layers appended by engine/tools/tiny_hf_model.add_mtp_layers, with the MTP's own
embedding and head copies (as DeepSeek-V3 publishes) or without (shared with the main model).
"""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.registry import arch_spec
from moelink.engine.spec.heads import MTPLayer, mtp_checkpoint_names
from moelink.engine.models.layers import ForwardContext
from moelink.engine.rank.loader import SafetensorsCheckpoint, load_plan
from moelink.engine.tools.tiny_hf_model import add_mtp_layers
from moelink.engine.tools.tiny_model import make_tiny_model
from moelink.kernels.ops import ReferenceKernels

from tests.helpers.hf_checkpoints import VOCAB, hf_config
from tests.helpers.parity import engine_greedy, prompts
from tests.helpers.paged_meta import paged_meta

CPU = torch.device("cpu")
BLOCK = 4
# (prefix tokens cached by the first step, tokens of the second step) per sequence.
SEQS = ((5, 3), (7, 1))

# checkpoint -> whether its MTP layer has its own embed_tokens / shared_head.head
CASES = {"dsv3_lora": True, "dsv3_yarn": False, "glm_bias": False, "glm_yarn": True}


@pytest.fixture(scope="module")
def mtp_checkpoint(hf_tiny_model, tmp_path_factory):
    built = {}

    def get(name: str) -> str:
        if name not in built:
            out = tmp_path_factory.mktemp(f"{name}_mtp") / "ckpt"
            shutil.copytree(hf_tiny_model(name), out)
            add_mtp_layers(out, 1, seed=5, embeddings=CASES[name])
            _one_product_gate(out)
            built[name] = str(out)
        return built[name]

    return get


def _one_product_gate(out) -> None:
    """Both sides run the router gate in float32 (transformers does; so does moelink), and a float32 matmul's
    rounding depends on its BLAS path, which depends on the row count: the oracle's rows (one sequence) and the
    layer's (one step) differ, so logits would differ in their last float32 bit and outputs by ~1e-7. Each
    expert's gate row gets one nonzero (random value, random column), so every logit is one product, rounded
    the same on every path; routing still depends on each token."""
    from safetensors.torch import load_file, save_file

    f = out / "mtp.safetensors"
    tensors = load_file(f)
    (name,) = [n for n in tensors if n.endswith("mlp.gate.weight")]
    w = tensors[name]
    g = torch.Generator().manual_seed(11)
    cols = torch.randperm(w.shape[1], generator=g)[: w.shape[0]]
    one = torch.zeros_like(w)
    one[torch.arange(w.shape[0]), cols] = (2.0 * torch.randn(w.shape[0], generator=g)).to(w.dtype)
    tensors[name] = one
    save_file(tensors, f, metadata={"format": "pt"})


def _sigmoid_from_float64(monkeypatch) -> None:
    """Both sides' routers (transformers' DeepseekV3/Glm4Moe TopkRouter, moelink's SigmoidGroupLimitedRouter) take
    sigmoid(float32 logits) in float32. On CPU torch computes a float32 sigmoid over the flat tensor in blocks of
    two vector widths (Sleef's exp) and the remainder element by element (std::exp); the two round differently
    (1 ulp in a few % of inputs), so a token's routing weight depends on its flat index in the [T, G] scores,
    that is on the batch around it. The oracle routes a whole sequence (8 rows), the layer one step (12 rows,
    then 4): with 6 experts (dsv3_yarn, glm_yarn) 4 * 6 = 24 = 16 + 8 and with 10 (glm_bias) 4 * 10 = 32 + 8 put
    the decode row in the remainder while 8 * G = 48 or 80 has none, so that row's weights could differ by 1 ulp
    and its output by ~1e-7. Here that one step is therefore computed in float64 and rounded to float32, on both
    sides: the same bits for a token wherever it sits. The float32 sigmoid itself is pinned bitwise against
    transformers' router, over one shared tensor, in tests/moe/test_router_strategies.py."""
    fn = torch.sigmoid

    def sigmoid(x):
        return fn(x.to(torch.float64)).to(torch.float32) if x.dtype == torch.float32 else fn(x)

    monkeypatch.setattr(torch, "sigmoid", sigmoid)  # moelink's router
    monkeypatch.setattr(torch.Tensor, "sigmoid", sigmoid)  # transformers' (router_logits.sigmoid())


def _tensors(path: str) -> dict[str, torch.Tensor]:
    ckpt = SafetensorsCheckpoint(path)
    out = {}
    for st, names in ckpt.open(list(ckpt.keys())):
        out.update({n: st.get_tensor(n).to(torch.float64) for n in names})
    return out


def _rms(x, w, eps):
    """RMSNorm as the family's models run it (transformers' DeepseekV3RMSNorm / Glm4MoeRMSNorm): normalised in
    float32 whatever the dtype, then scaled in it."""
    x32 = x.to(torch.float32)
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _hf_layer(name: str, t: dict, L: int):
    """transformers' own decoder layer at index L, float64, holding the checkpoint's layer-L tensors (per-expert
    tensors stacked into the fused experts it holds: gate rows, then up rows)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RotaryEmbedding
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeDecoderLayer, Glm4MoeRotaryEmbedding

    cfg = hf_config(name)
    # sdpa keeps float64 scores and softmax (eager takes its softmax in float32), as moelink's attention does.
    cfg._attn_implementation = "sdpa"
    if cfg.model_type == "deepseek_v3":  # MLA: one key and value per head (the config's default is 128)
        cfg.num_key_value_heads = cfg.num_attention_heads
    layer_cls, rope_cls = ((DeepseekV3DecoderLayer, DeepseekV3RotaryEmbedding) if cfg.model_type == "deepseek_v3"
                           else (Glm4MoeDecoderLayer, Glm4MoeRotaryEmbedding))
    layer = layer_cls(cfg, L).to(torch.float64)
    p, E = f"model.layers.{L}.", cfg.n_routed_experts
    state = {}
    for key in layer.state_dict():
        if key == "mlp.experts.gate_up_proj":
            state[key] = torch.stack([torch.cat([t[f"{p}mlp.experts.{e}.gate_proj.weight"],
                                                 t[f"{p}mlp.experts.{e}.up_proj.weight"]]) for e in range(E)])
        elif key == "mlp.experts.down_proj":
            state[key] = torch.stack([t[f"{p}mlp.experts.{e}.down_proj.weight"] for e in range(E)])
        else:
            state[key] = t[p + key]
    layer.load_state_dict(state, strict=True)  # every tensor of transformers' layer from the checkpoint
    return layer.eval(), rope_cls(cfg).to(torch.float64), cfg


def _reference(name: str, path: str, ids, hidden, L: int):
    """Per sequence: the oracle's output rows y [n, D] and logits [n, V] (module docstring)."""
    t = _tensors(path)
    layer, rope, cfg = _hf_layer(name, t, L)
    p, eps = f"model.layers.{L}.", cfg.rms_norm_eps
    embed = t.get(p + "embed_tokens.weight", t["model.embed_tokens.weight"])
    head = t.get(p + "shared_head.head.weight", t.get("lm_head.weight", t["model.embed_tokens.weight"]))
    ys, logits = [], []
    for ids_n, h_nD in zip(ids, hidden):
        x = F.linear(torch.cat([_rms(embed[ids_n], t[p + "enorm.weight"], eps), _rms(h_nD, t[p + "hnorm.weight"], eps)],
                               dim=-1), t[p + "eh_proj.weight"])[None]
        n = x.shape[1]
        pos = torch.arange(n)[None]
        mask = torch.full((n, n), torch.finfo(torch.float64).min, dtype=torch.float64).triu(1)[None, None]
        with torch.no_grad():
            out = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=rope(x, pos))
        y = (out[0] if isinstance(out, tuple) else out)[0]
        ys.append(y)
        logits.append(F.linear(_rms(y, t[p + "shared_head.norm.weight"], eps), head))
    return ys, logits


def _meta(starts, lens, tables, num_blocks):
    return paged_meta(starts, lens, tables, num_blocks, BLOCK)


@pytest.mark.parametrize("name", list(CASES))
def test_mtp_layer_matches_published_forward_in_float64(mtp_checkpoint, name, monkeypatch):
    path = mtp_checkpoint(name)
    _sigmoid_from_float64(monkeypatch)  # the routers' float32 sigmoid, batch-independent (see there)
    cfg = ModelConfig.from_pretrained(path, "float64")
    assert cfg.num_nextn_predict_layers == 1
    L = cfg.num_layers
    ckpt = SafetensorsCheckpoint(path)
    names = frozenset(ckpt.keys())
    t = _tensors(path)
    main_embed = torch.nn.Parameter(t["model.embed_tokens.weight"], requires_grad=False)
    main_head = torch.nn.Parameter(t.get("lm_head.weight", t["model.embed_tokens.weight"]), requires_grad=False)
    mtp = MTPLayer(cfg, arch_spec(cfg.architecture), 0, ReferenceKernels(), CPU, None, names,
                   embed_tokens=main_embed, lm_head=main_head)
    assert (mtp.own_embed, mtp.own_head) == (CASES[name], CASES[name])
    plan = mtp.weight_plan(names)
    assert set(plan) == set(mtp_checkpoint_names(cfg, names)), "the MTP plan reads exactly the MTP tensors"
    load_plan(ckpt, plan, CPU)
    mtp.process_weights_after_loading()
    mtp.eval()

    g = torch.Generator().manual_seed(len(name))
    ids = [torch.randint(0, VOCAB, (a + n,), generator=g) for a, n in SEQS]
    hidden = [torch.randn(a + n, cfg.hidden_size, generator=g, dtype=torch.float64) for a, n in SEQS]
    want_y, want_logits = _reference(name, path, ids, hidden, L)

    tables, num_blocks = [[0, 5, 2], [4, 1]], 6  # out of order: slots come from the tables
    caches = [() for _ in range(L)] + [tuple(torch.zeros(s, dtype=torch.float64)
                                             for s in cfg.attention.cache_shapes(num_blocks, BLOCK))]
    for first in (True, False):  # the prefixes (positions from 0), then the rest over the cached prefixes
        starts = [0 if first else a for a, _ in SEQS]
        lens = [a if first else n for a, n in SEQS]
        rows = [slice(s, s + n) for s, n in zip(starts, lens)]
        ctx = ForwardContext(_meta(starts, lens, tables, num_blocks), caches)
        positions = torch.cat([torch.arange(r.start, r.stop) for r in rows])
        with torch.no_grad():
            y = mtp(positions, torch.cat([i[r] for i, r in zip(ids, rows)]),
                    torch.cat([h[r] for h, r in zip(hidden, rows)]), ctx)
            logits = mtp.compute_logits(y)
        torch.testing.assert_close(y, torch.cat([w[r] for w, r in zip(want_y, rows)]), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(logits, torch.cat([w[r] for w, r in zip(want_logits, rows)]),
                                   rtol=1e-10, atol=1e-10)
    assert mtp.moe_stats.counts_LG.sum() == sum(a + n for a, n in SEQS) * cfg.top_k  # its own counters


def test_num_nextn_predict_layers_is_read_and_checked(mtp_checkpoint, tmp_path):
    import json

    path = mtp_checkpoint("glm_bias")
    assert ModelConfig.from_pretrained(path).num_nextn_predict_layers == 1
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    config = json.loads((bad / "config.json").read_text())
    config["num_nextn_predict_layers"] = -1
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"num_nextn_predict_layers=-1 is invalid"):
        ModelConfig.from_pretrained(str(bad))
    del config["num_nextn_predict_layers"]  # transformers' config class would say 1: the file says none
    (bad / "config.json").write_text(json.dumps(config))
    assert ModelConfig.from_pretrained(str(bad)).num_nextn_predict_layers == 0
    cfg = ModelConfig.from_pretrained(path)
    with pytest.raises(ValueError, match=r"MTP layer 1 does not exist"):
        MTPLayer(cfg, arch_spec(cfg.architecture), 1, ReferenceKernels(), CPU)
    with pytest.raises(ValueError, match=r"pass it \(embed_tokens=...\)"):  # glm_bias's MTP shares the embedding
        MTPLayer(cfg, arch_spec(cfg.architecture), 0, ReferenceKernels(), CPU, None,
                 SafetensorsCheckpoint(path).keys())


@pytest.mark.slow
def test_engine_ignores_mtp_layers(tmp_path):
    """A DeepSeek-V3 checkpoint with an MTP layer (make_tiny_model's num_nextn_predict_layers) generates the same
    greedy tokens as the same checkpoint without it: the main engine leaves the MTP tensors unread."""
    kw = dict(num_layers=2, num_experts=6, vocab_size=400, max_position_embeddings=256)
    plain = make_tiny_model(tmp_path / "plain", "deepseek_v3", **kw)
    with_mtp = make_tiny_model(tmp_path / "mtp", "deepseek_v3", **kw, extra={"num_nextn_predict_layers": 1})
    names = set(SafetensorsCheckpoint(with_mtp).keys())
    assert names - set(SafetensorsCheckpoint(plain).keys()) == set(
        mtp_checkpoint_names(ModelConfig.from_pretrained(str(with_mtp)), names)) != set()
    ps = prompts(400, seed=3, n=6, lo=1, hi=40)
    kw = dict(dtype="float64", max_num_seqs=4, max_num_batched_tokens=64, num_kv_blocks=64, block_size=16)
    got = [engine_greedy(LLM(str(p), **kw), ps, max_new=8) for p in (plain, with_mtp)]
    assert got[0] == got[1] and len({tok for out in got[0] for tok in out}) > 3


def _run(path: str, **cfg_kw) -> tuple[MTPLayer, torch.Tensor]:
    """The MTP layer of `path` (its own embedding and head) over one prefill step of two sequences: output rows."""
    cfg = ModelConfig.from_pretrained(path, "float64", **cfg_kw)
    ckpt = SafetensorsCheckpoint(path)
    names = frozenset(ckpt.keys())
    mtp = MTPLayer(cfg, arch_spec(cfg.architecture), 0, ReferenceKernels(), CPU, None, names)
    load_plan(ckpt, mtp.weight_plan(names), CPU)
    mtp.process_weights_after_loading()
    g = torch.Generator().manual_seed(2)
    lens, tables = [6, 3], [[0, 1], [2]]
    caches = [() for _ in range(cfg.num_layers)] + [tuple(torch.zeros(s, dtype=torch.float64)
                                                          for s in cfg.attention.cache_shapes(3, BLOCK))]
    ctx = ForwardContext(_meta([0, 0], lens, tables, 3), caches)
    with torch.no_grad():
        y = mtp(torch.cat([torch.arange(n) for n in lens]), torch.randint(0, cfg.vocab_size, (9,), generator=g),
                torch.randn(9, cfg.hidden_size, generator=g, dtype=torch.float64), ctx)
    return mtp, mtp.compute_logits(y)


def test_fp8_mtp_layer_as_published_and_as_online_quantization(tmp_path):
    """`moelink quantize-fp8` on a checkpoint with an MTP layer quantizes its decoder layer as a main layer's and
    keeps eh_proj (as DeepSeek's FP8 release), embeddings, head and norms float; the MTP layer loaded from it
    computes exactly what the float checkpoint quantized at load (`quantization="fp8"`) computes."""
    from safetensors import safe_open

    from moelink.engine.rank.loader import checkpoint_index, load_model
    from moelink.engine.tools.quantize_fp8 import quantize_checkpoint
    from moelink.kernels.fp8 import FP8_DTYPE

    from tests.helpers.fp8_checkpoints import BLOCK as FP8_BLOCK, save_fp8_tiny

    src = save_fp8_tiny(tmp_path / "float", "dsv3_fp8")
    add_mtp_layers(src, 1, seed=3)
    dst = str(quantize_checkpoint(src, tmp_path / "fp8", FP8_BLOCK))
    index = checkpoint_index(dst)
    p = "model.layers.2."
    with safe_open(str(index[p + "eh_proj.weight"]), "pt") as st:
        for name in ("self_attn.q_a_proj", "self_attn.kv_b_proj", "mlp.experts.3.gate_proj",
                     "mlp.shared_experts.down_proj"):
            assert st.get_tensor(f"{p}{name}.weight").dtype == FP8_DTYPE and f"{p}{name}.weight_scale_inv" in index
        for name in ("eh_proj", "enorm", "hnorm", "shared_head.norm", "shared_head.head", "embed_tokens"):
            assert st.get_tensor(f"{p}{name}.weight").dtype == torch.float64
            assert f"{p}{name}.weight_scale_inv" not in index
    tool, got = _run(dst)
    assert tool.layer.self_attn.o_proj.method.name == "fp8" and tool.layer.moe.expert_format.name == "fp8"
    assert tool.eh_proj.method.name == "float"
    _, want = _run(src, quantization="fp8", fp8_block_size=FP8_BLOCK)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    load_model(ModelConfig.from_pretrained(dst, "float32"), ReferenceKernels(), CPU)  # the main model ignores it
