"""The hashed n-gram table block (engine/models/ngram_embedding.py: Qwen3.8-Flash-Next's PLE tables, the shape
DeepSeek-V4.1's Engram uses) against transformers' Qwen4ExpTextNGramEmbedding on whole sequences, run by the engine
in chunks over a flat batch of two sequences with their token context in a state pool: the rows equal, eos tokens
restarting the n-grams; and `causal_rows`, the window of earlier rows a sequence reads from its state."""
from __future__ import annotations

import pytest
import torch

from moelink.engine.models.ngram_embedding_config import NGramEmbeddingConfig
from moelink.engine.models.layers import ForwardContext
from moelink.engine.models.ngram_embedding import NGramEmbedding, causal_rows
from moelink.engine.state.step import StateStep

from tests.helpers.qwen4_exp_checkpoints import EOS, VOCAB, qwen4_exp_config


def _ctx(lens: list[int], slots: list[int], has: list[bool]) -> ForwardContext:
    qsl = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    step = StateStep(torch.tensor(slots, dtype=torch.int32), torch.tensor(has), qsl, max(lens) == 1)
    return ForwardContext(None, [], state=step)  # type: ignore[arg-type]  # the block reads the state step only


def test_causal_rows_reads_the_state_then_the_step_and_keeps_the_last_rows():
    pool = torch.zeros(4, 3, 1)
    pool[2, :, 0] = torch.tensor([7.0, 8.0, 9.0])  # slot 2's last three rows, oldest first
    x = torch.arange(1.0, 6.0)[:, None]  # sequence A (slot 2, continuing): 1, 2; sequence B (slot 1, fresh): 3, 4, 5
    rows = causal_rows(x, pool, _ctx([2, 3], [2, 1], [True, False]))[..., 0]
    assert rows.tolist() == [[7, 8, 9], [8, 9, 1], [0, 0, 0], [0, 0, 3], [0, 3, 4]]
    assert pool[2, :, 0].tolist() == [9, 1, 2] and pool[1, :, 0].tolist() == [3, 4, 5]


@pytest.mark.slow  # transformers' qwen4_exp modeling module imports in ~5 s
def test_ngram_rows_equal_transformers_in_chunks():
    from transformers.models.qwen4_exp.modeling_qwen4_exp import Qwen4ExpTextNGramEmbedding

    text = qwen4_exp_config(ngram_size=4, heads_per_ngram=2, ple_embed_dim=12).text_config
    hf = Qwen4ExpTextNGramEmbedding(text, 12, layer_idx=0, ple_layer_index=1).double()
    torch.nn.init.normal_(hf.ngram_embedding.weight, generator=torch.Generator().manual_seed(0))
    cfg = NGramEmbeddingConfig(VOCAB, 4, 2, 12, 61, 8, 1234, EOS, 1)
    ours = NGramEmbedding(cfg, torch.float64)
    with torch.no_grad():
        ours.table_VH.copy_(hf.ngram_embedding.weight)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 12, (n,), generator=g) for n in (13, 9)]  # a small range: eos (2) and repeats often
    seqs[0][5] = seqs[1][0] = EOS
    want = [hf(s[None], None)[0] for s in seqs]
    pool = torch.zeros(3, cfg.context_len, dtype=torch.long)
    got: list[list[torch.Tensor]] = [[], []]
    for chunk in [(0, 5, 0, 1), (5, 6, 1, 3), (6, 13, 3, 9)]:  # A: 5, 1, 7 tokens; B: 1, 2, 6
        a0, a1, b0, b1 = chunk
        ids = torch.cat([seqs[0][a0:a1], seqs[1][b0:b1]])
        out = ours(ids, pool, _ctx([a1 - a0, b1 - b0], [0, 1], [a0 > 0, b0 > 0]))
        got[0].append(out[:a1 - a0])
        got[1].append(out[a1 - a0:])
    for w, parts in zip(want, got):
        torch.testing.assert_close(torch.cat(parts), w, rtol=0, atol=0)


def test_host_placement_keeps_the_table_in_host_memory_with_the_same_rows():
    """placement "host" (the seam for tables larger than a device: engine/models/ngram_embedding_config.py): the table is a
    host tensor whatever the model's device, looked up there; the rows equal the device placement's."""
    import dataclasses

    cfg = NGramEmbeddingConfig(VOCAB, 3, 2, 8, 61, 8, 1234, EOS, 0)
    on_device, on_host = NGramEmbedding(cfg, torch.float64), NGramEmbedding(
        dataclasses.replace(cfg, placement="host"), torch.float64)
    assert on_host.table_VH.device.type == "cpu"
    with torch.no_grad():
        on_device.table_VH.copy_(torch.randn(on_device.table_VH.shape, generator=torch.Generator().manual_seed(0),
                                             dtype=torch.float64))
        on_host.table_VH.copy_(on_device.table_VH)
    ids = torch.tensor([5, EOS, 7, 7, 9])
    pools = [torch.zeros(2, 2, dtype=torch.long) for _ in range(2)]
    a = on_device(ids, pools[0], _ctx([5], [0], [False]))
    b = on_host(ids, pools[1], _ctx([5], [0], [False]))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
