"""DeepSeek-V4's MTP layer (engine/models/dsv4_mtp.py) against a float64 oracle composed from transformers' V4 classes,
and method 'mtp', which V4 refuses until the runner hands the drafter the hyper-connection streams.

Oracle (tests/helpers/dsv4_mtp_checkpoint.py): DeepSeek's MTPBlock forward written around transformers' own
DeepseekV4DecoderLayer at index L (sliding attention, top-k MoE; loaded with from_pretrained, so its norms and
hyper-connections are float32 where transformers keeps them so), DeepseekV4RMSNorm for enorm / hnorm / norm and
DeepseekV4HyperHead for the MTP's hyper-head, over each whole sequence with transformers' sliding causal mask:
    x = e_proj(enorm(emb(tok_{t+1})))[..., None, :] + h_proj(hnorm(h_t));  y = layer(x);  logits = head(norm(hc_head(y)))
The MTP layer runs the same sequences as two steps (a prefix, then the rest at positions > 0 past the 6-token window,
reading its window ring): its streams and logits equal the oracle's rows (float32 parts inside: tolerance 1e-6)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig
from moelink.engine.models import arch_spec
from moelink.engine.models.dsv4_mtp import DSV4MTPLayer
from moelink.engine.rank.loader import SafetensorsCheckpoint, load_model, load_plan
from moelink.kernels.ops import ReferenceKernels

from tests.helpers.dsv4_checkpoint import DSV4_TINY, VOCAB
from tests.helpers.dsv4_mtp_checkpoint import save_dsv4_with_mtp

CPU = torch.device("cpu")
L = DSV4_TINY["num_hidden_layers"]
# (tokens of the first step, tokens of the second) per sequence: the second crosses the 6-token window
SEQS = ((5, 4), (7, 1))


@pytest.fixture(scope="module")
def mtp_ckpt(tmp_path_factory):
    # experts 32 wide: FP4 needs a multiple of 32 (test_published_fp4_mtp_layer_loads_its_formats)
    return save_dsv4_with_mtp(tmp_path_factory.mktemp("dsv4_mtp") / "ckpt", moe_intermediate_size=32)


def _mtp_layer(path: str, quant_path: str | None = None):
    cfg = ModelConfig.from_pretrained(quant_path or path, dtype="float64")
    main = load_model(cfg, ReferenceKernels(), CPU)  # the mtp.* tensors stay unread by the main model
    mtp = DSV4MTPLayer(cfg, arch_spec(cfg.architecture), 0, main.embed_tokens, main.lm_head, ReferenceKernels(), CPU,
                       quant=main.quant)
    ckpt = SafetensorsCheckpoint(quant_path or path)
    load_plan(ckpt, mtp.weight_plan(frozenset(ckpt.keys())), CPU)
    return cfg, main, mtp


def _oracle(full_path: str, own: dict):
    from transformers import AutoModelForCausalLM
    from transformers.masking_utils import create_sliding_window_causal_mask
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperHead, DeepseekV4RMSNorm

    hf = AutoModelForCausalLM.from_pretrained(full_path, dtype=torch.float64, experts_implementation="eager").eval()
    c = hf.config
    enorm, hnorm, norm = (DeepseekV4RMSNorm(c.hidden_size, c.rms_norm_eps).float() for _ in range(3))
    head = DeepseekV4HyperHead(c).float()
    with torch.no_grad():
        for m, k in ((enorm, "enorm.weight"), (hnorm, "hnorm.weight"), (norm, "norm.weight")):
            m.weight.copy_(own[k])
        head.hc_fn.copy_(own["hc_head_fn"]), head.hc_base.copy_(own["hc_head_base"])
        head.hc_scale.copy_(own["hc_head_scale"])
    e_proj, h_proj = own["e_proj.weight"], own["h_proj.weight"]

    @torch.no_grad()
    def run(h_SnD: torch.Tensor, next_ids_S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(len(next_ids_S))[None]
        emb = hf.model.embed_tokens(next_ids_S[None])
        x = (enorm(emb) @ e_proj.T)[:, :, None, :] + hnorm(h_SnD[None]) @ h_proj.T
        rope = hf.model.rotary_emb(emb, position_ids=pos, layer_type="main")
        mask = create_sliding_window_causal_mask(config=c, inputs_embeds=emb, attention_mask=None, cache=None,
                                                 position_ids=pos)
        y = hf.model.layers[L](x, position_embeddings={"main": rope, "compress": rope}, position_ids=pos,
                               attention_mask=mask, input_ids=next_ids_S[None], cache=None)
        return y[0], hf.lm_head(norm(head(y)))[0]

    return run


def _ctx(cfg, window_PWH, q_lens, seq_lens):
    return SimpleNamespace(kv_caches={L: (window_PWH,)},
                           attn=SimpleNamespace(query_lens=list(q_lens), seq_lens=list(seq_lens), max_query_len=max(q_lens),
                                                block_tables_SM=torch.zeros(len(q_lens), 1, dtype=torch.int32)),
                           state=SimpleNamespace(slots_S=torch.arange(len(q_lens), dtype=torch.int32)))


def test_config_reads_the_mtp_layer(mtp_ckpt):
    cfg = ModelConfig.from_pretrained(mtp_ckpt[0], dtype="float64")
    assert cfg.num_nextn_predict_layers == 1 and cfg.num_layers == L
    from moelink.engine.config.dsv4 import mtp_attention

    a = mtp_attention(cfg.layer_attention, cfg.hf_config)
    assert (a.layer_kind, a.compress_rate, a.rope.layer_type, a.rope.theta) == ("sliding", 0, "main", 10000.0)


def test_mtp_layer_equals_transformers_float64(mtp_ckpt):
    path, full, own = mtp_ckpt
    cfg, _, mtp = _mtp_layer(path)
    oracle = _oracle(full, own)
    g = torch.Generator().manual_seed(3)
    n, D, W, H = cfg.hyper_connections.hc_mult, cfg.hidden_size, cfg.layer_attention[0].sliding_window, \
        cfg.layer_attention[0].head_dim
    seqs = [(torch.randn(a + b, n, D, generator=g, dtype=torch.float64),
             torch.randint(0, VOCAB, (a + b,), generator=g)) for a, b in SEQS]
    want = [oracle(h, ids) for h, ids in seqs]
    window_PWH = torch.zeros(len(SEQS) + 1, W, H, dtype=torch.float64)
    done = [0] * len(SEQS)
    for step in range(2):
        q_lens = [SEQS[s][step] for s in range(len(SEQS))]
        rows = [slice(done[s], done[s] + q) for s, q in enumerate(q_lens)]
        h = torch.cat([seqs[s][0][r] for s, r in enumerate(rows)])
        ids = torch.cat([seqs[s][1][r] for s, r in enumerate(rows)])
        pos = torch.cat([torch.arange(r.start, r.stop) for r in rows])
        done = [d + q for d, q in zip(done, q_lens)]
        y = mtp(pos, h, ids, _ctx(cfg, window_PWH, q_lens, done))
        logits = mtp.compute_logits(y)
        t0 = 0
        for s, r in enumerate(rows):
            q = r.stop - r.start
            torch.testing.assert_close(y[t0:t0 + q], want[s][0][r], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(logits[t0:t0 + q], want[s][1][r], rtol=1e-6, atol=1e-6)
            t0 += q
    assert int(mtp.moe_stats.counts_LG.sum()) == sum(a + b for a, b in SEQS) * cfg.top_k  # its own counts


def test_published_fp4_mtp_layer_loads_its_formats(mtp_ckpt, tmp_path):
    """mtp.0's e_proj / h_proj and attention FP8 (dequantized at load, equal to the oracle's values), its routed
    experts FP4 (packed, the file's bytes)."""
    from safetensors.torch import load_file

    from tests.helpers.dsv4_published import write_published_dsv4

    pub, oracle = write_published_dsv4(mtp_ckpt[0], tmp_path / "pub", tmp_path / "oracle")
    _, _, mtp = _mtp_layer(mtp_ckpt[0], pub)
    file, want = load_file(f"{pub}/model.safetensors"), load_file(f"{oracle}/model.safetensors")
    assert file["mtp.0.e_proj.weight"].dtype == torch.float8_e4m3fn
    assert torch.equal(mtp.e_proj_DD, want["mtp.0.e_proj.weight"])
    assert torch.equal(mtp.block.attn.wq_a_QD, want["mtp.0.attn.wq_a.weight"])
    inter = mtp.block.moe.w2_blocks_EDSQ.shape[2] * 32
    assert torch.equal(mtp.block.moe.w13_blocks_EFSQ[2, inter:].reshape(inter, -1),
                       file["mtp.0.ffn.experts.2.w3.weight"].view(torch.uint8))


def test_method_mtp_is_refused_with_the_reason(mtp_ckpt):
    spec = {"method": "mtp", "num_speculative_tokens": 1}
    with pytest.raises(ValueError, match="method='mtp' is not supported for DeepseekV4ForCausalLM yet: its MTP layer "
                                         ".*hyper-connection streams.*use method 'ngram'"):
        LLM(mtp_ckpt[0], dtype="float64", max_num_seqs=2, num_kv_blocks=16, block_size=8, speculative_config=spec)
