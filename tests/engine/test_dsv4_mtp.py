"""DeepSeek-V4's MTP layer (engine/models/deepseek_v4/mtp.py) against a float64 oracle composed from transformers' V4 classes,
its published formats, and which speculative methods V4 takes (the drafter itself: test_dsv4_mtp_drafter.py).

Oracle (tests/helpers/dsv4_mtp_checkpoint.mtp_oracle): DeepSeek's MTPBlock forward written around transformers' own
DeepseekV4DecoderLayer at index L (sliding attention, top-k MoE; loaded with from_pretrained, so its norms and
hyper-connections are float32 where transformers keeps them so), DeepseekV4RMSNorm for enorm / hnorm / norm and
DeepseekV4HyperHead for the MTP's hyper-head, over each whole sequence with transformers' sliding causal mask:
    x = e_proj(enorm(emb(tok_{t+1})))[..., None, :] + h_proj(hnorm(h_t));  y = layer(x);  logits = head(norm(hc_head(y)))
The MTP layer runs the same sequences as three steps (a prefix, the rest at positions > 0 past the 6-token window,
then one decode token each), reading its paged window through block tables of 4-token blocks: its streams and logits
equal the oracle's rows (float32 parts inside: tolerance 1e-6)."""
from __future__ import annotations

import itertools

import pytest
import torch

from moelink.engine import LLM
from moelink.engine.models.deepseek_v4.reader import read_dsv4_quantization
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.registry import arch_spec
from moelink.engine.models.deepseek_v4.mtp import DSV4MTPLayer
from moelink.engine.models.layers import ForwardContext
from moelink.engine.rank.loader import SafetensorsCheckpoint, load_model, load_plan
from moelink.kernels.attention import AttentionMetadata
from moelink.kernels.fp8 import block_dequantize
from moelink.engine.tools.eagle3_checkpoint import write_eagle3_checkpoint
from moelink.kernels.ops import ReferenceKernels

from tests.helpers.dsv4_checkpoint import DSV4_TINY, VOCAB, save_dsv4_checkpoint
from tests.helpers.dsv4_mtp_checkpoint import mtp_oracle, save_dsv4_with_mtp

CPU = torch.device("cpu")
L = DSV4_TINY["num_hidden_layers"]
# tokens of each step per sequence: the second step crosses the 6-token window, the third is a pure decode step
SEQS = ((5, 4, 1), (7, 1, 1))
BLOCK = 4


@pytest.fixture(scope="module")
def mtp_ckpt(tmp_path_factory):
    # experts 32 wide: FP4 needs a multiple of 32 (test_published_fp4_mtp_layer_loads_its_formats)
    return save_dsv4_with_mtp(tmp_path_factory.mktemp("dsv4_mtp") / "ckpt", moe_intermediate_size=32)


def _mtp_layer(path: str, quant_path: str | None = None):
    cfg = ModelConfig.from_pretrained(quant_path or path, dtype="float64")
    main = load_model(cfg, ReferenceKernels(), CPU)  # the mtp.* tensors stay unread by the main model
    mtp = DSV4MTPLayer(cfg, arch_spec(cfg.architecture), 0, main.embed_tokens, main.lm_head, ReferenceKernels(), CPU,
                       quant=read_dsv4_quantization(cfg.architecture, cfg.hf_config, cfg.quantization))
    ckpt = SafetensorsCheckpoint(quant_path or path)
    load_plan(ckpt, mtp.weight_plan(frozenset(ckpt.keys())), CPU)
    return cfg, main, mtp


def _ctx(cfg, kv_BLH, q_lens, seq_lens):
    """Sequence s owns blocks s * 4 .. s * 4 + 3 of the paged window."""
    tables_SM = torch.arange(len(q_lens) * 4, dtype=torch.int32).view(len(q_lens), 4)
    slots = [int(tables_SM[s, p // BLOCK]) * BLOCK + p % BLOCK
             for s, (q, n) in enumerate(zip(q_lens, seq_lens)) for p in range(n - q, n)]
    qsl = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32)
    attn = AttentionMetadata(qsl, torch.tensor(seq_lens, dtype=torch.int32), tables_SM, torch.tensor(slots),
                             list(q_lens), list(seq_lens), max(q_lens), max(seq_lens), kv_BLH.shape[0] - 1)
    return ForwardContext(attn, {L: (kv_BLH,)})


def test_config_reads_the_mtp_layer(mtp_ckpt):
    cfg = ModelConfig.from_pretrained(mtp_ckpt[0], dtype="float64")
    assert cfg.num_nextn_predict_layers == 1 and cfg.num_layers == L
    from moelink.engine.models.deepseek_v4.reader import mtp_attention

    a = mtp_attention(cfg.layer_attention, cfg.hf_config)
    assert (a.layer_kind, a.compress_rate, a.rope.layer_type, a.rope.theta) == ("sliding", 0, "main", 10000.0)


def test_mtp_layer_equals_transformers_float64(mtp_ckpt):
    path, full, own = mtp_ckpt
    cfg, _, mtp = _mtp_layer(path)
    oracle = mtp_oracle(full, own)
    g = torch.Generator().manual_seed(3)
    n, D, W, H = cfg.hyper_connections.hc_mult, cfg.hidden_size, cfg.layer_attention[0].sliding_window, \
        cfg.layer_attention[0].head_dim
    seqs = [(torch.randn(sum(q), n, D, generator=g, dtype=torch.float64),
             torch.randint(0, VOCAB, (sum(q),), generator=g)) for q in SEQS]
    want = [oracle(h, ids) for h, ids in seqs]
    kv_BLH = torch.zeros(len(SEQS) * 4 + 1, BLOCK, H, dtype=torch.float64)  # the null block last
    assert W == 6 and max(map(sum, SEQS)) > W
    done = [0] * len(SEQS)
    for step in range(3):
        q_lens = [SEQS[s][step] for s in range(len(SEQS))]
        rows = [slice(done[s], done[s] + q) for s, q in enumerate(q_lens)]
        h = torch.cat([seqs[s][0][r] for s, r in enumerate(rows)])
        ids = torch.cat([seqs[s][1][r] for s, r in enumerate(rows)])
        pos = torch.cat([torch.arange(r.start, r.stop) for r in rows])
        done = [d + q for d, q in zip(done, q_lens)]
        y = mtp(pos, h, ids, _ctx(cfg, kv_BLH, q_lens, done))
        logits = mtp.compute_logits(y)
        t0 = 0
        for s, r in enumerate(rows):
            q = r.stop - r.start
            torch.testing.assert_close(y[t0:t0 + q], want[s][0][r], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(logits[t0:t0 + q], want[s][1][r], rtol=1e-6, atol=1e-6)
            t0 += q
    assert int(mtp.moe_stats.counts_LG.sum()) == sum(map(sum, SEQS)) * cfg.top_k  # its own counts


def test_published_fp4_mtp_layer_loads_its_formats(mtp_ckpt, tmp_path):
    """mtp.0's e_proj / h_proj and attention FP8 (held as the file's bytes with its scales, which dequantize to the
    oracle's values), its routed experts FP4 (packed, the file's bytes)."""
    from safetensors.torch import load_file

    from tests.helpers.dsv4_published import write_published_dsv4

    pub, oracle = write_published_dsv4(mtp_ckpt[0], tmp_path / "pub", tmp_path / "oracle")
    _, _, mtp = _mtp_layer(mtp_ckpt[0], pub)
    file, want = load_file(f"{pub}/model.safetensors"), load_file(f"{oracle}/model.safetensors")
    assert file["mtp.0.e_proj.weight"].dtype == torch.float8_e4m3fn
    for name, linear in (("e_proj", mtp.e_proj), ("h_proj", mtp.h_proj), ("attn.wq_a", mtp.block.attn.wq_a)):
        # held FP8 as published (W8A8), the ue8m0 scales as float32 block scales
        assert linear.weight.dtype == torch.float8_e4m3fn
        assert torch.equal(linear.weight.view(torch.uint8), file[f"mtp.0.{name}.weight"].view(torch.uint8))
        dequant = block_dequantize(linear.weight, linear.weight_scale_inv, mtp.quant.block, torch.float64)
        assert torch.equal(dequant, want[f"mtp.0.{name}.weight"])
    inter = mtp.block.moe.w2_blocks_EDSQ.shape[2] * 32
    assert torch.equal(mtp.block.moe.w13_blocks_EFSQ[2, inter:].reshape(inter, -1),
                       file["mtp.0.ffn.experts.2.w3.weight"].view(torch.uint8))


def test_speculative_refusals_name_the_reason(mtp_ckpt, tmp_path):
    """EAGLE-3 (one residual stream; V4 has several), more drafts than the smallest ring can roll back, and 'mtp' on
    a V4 checkpoint without MTP layers: each refused in one line naming the field."""
    kw = dict(dtype="float64", max_num_seqs=2, num_kv_blocks=16, block_size=8)
    head = tmp_path / "head"
    write_eagle3_checkpoint(head, vocab_size=VOCAB, draft_vocab_size=None, target_hidden_size=DSV4_TINY["hidden_size"])
    with pytest.raises(ValueError, match="method='eagle3' is not supported for DeepseekV4ForCausalLM: an EAGLE-3 head "
                                         "reads one residual stream.*use method 'mtp'"):
        LLM(mtp_ckpt[0], speculative_config={"method": "eagle3", "model": str(head), "num_speculative_tokens": 1}, **kw)
    with pytest.raises(ValueError, match="num_speculative_tokens=4 is invalid for DeepseekV4ForCausalLM: at most 3"):
        LLM(mtp_ckpt[0], speculative_config={"method": "mtp", "num_speculative_tokens": 4}, **kw)
    plain = save_dsv4_checkpoint(tmp_path / "plain")
    with pytest.raises(ValueError, match="method='mtp'.*num_nextn_predict_layers=0"):
        LLM(plain, speculative_config={"method": "mtp", "num_speculative_tokens": 1}, **kw)
