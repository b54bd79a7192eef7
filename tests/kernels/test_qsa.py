"""QSA's kernels (kernels/qsa.py): the reference selection against transformers' Qwen4ExpTextQSAIndexer formula per
query, the reference sparse GQA equal to dense causal attention when every position is selected, and the Triton
sparse GQA against the reference (in the interpreter on CPU) with -1 padding anywhere in a row.

Shapes are small and ragged (tests/helpers/dsa_cases.py): a decode token, a chunk over a cached prefix, a fresh
prompt, contexts not multiples of the block, blocks scattered, unwritten cache rows NaN."""
from __future__ import annotations

import math

import pytest
import torch

from moelink.kernels.qsa import reference_qsa_select, reference_sparse_gqa_attention

from tests.helpers.dsa_cases import CTX_Q, L, cache_of, meta_of, meta_to, positions


@pytest.fixture(scope="module")
def qwen4_exp_path(tmp_path_factory) -> str:
    """The tiny Qwen3.8-Flash-Next checkpoint (seed 0), built once for the module's two engine tests (transformers
    builds and saves it: about half of an engine test here); each test only reads it."""
    from tests.helpers.qwen4_exp_checkpoints import save_qwen4_exp_checkpoint

    return save_qwen4_exp_checkpoint(tmp_path_factory.mktemp("qwen4_exp"))


def test_reference_selection_is_transformers_indexer_formula(gen):
    """Per query: the top block_topk complete blocks by sum_h relu(q . key) / sqrt(Di), their positions, then the
    incomplete block's (transformers' loop, written out)."""
    meta = meta_of(gen, CTX_Q, "cpu")
    c, topk, H, Di = 4, 2, 3, 8
    T = sum(meta.query_lens)
    B = meta.max_seq_len // c
    q = torch.randn(T, H, Di, generator=gen, dtype=torch.float64)
    keys = torch.randn(meta.num_seqs, B, Di, generator=gen, dtype=torch.float64)
    got = reference_qsa_select(q, keys, meta, topk, c)
    assert got.shape == (T, topk * c + c - 1)
    for t, (s, p) in enumerate(positions(meta, "cpu")):
        n = p + 1
        nc = n // c
        want = []
        if nc:
            scores = torch.relu(q[t].float() @ keys[s, :nc].float().T).sum(0) / math.sqrt(Di)
            for b in scores.topk(min(topk, nc)).indices.tolist():
                want += list(range(b * c, b * c + c))
        want += list(range(nc * c, n))
        assert sorted(x for x in got[t].tolist() if x >= 0) == sorted(want), t


@pytest.mark.slow  # ~1.5 s in the interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_selection_equals_reference(gen, kdev, dtype):
    """The selection on the Triton backend (DSA's Triton scores and top-k over the pooled blocks): the reference's
    positions, as sets per token (DSA's kernel may order them otherwise)."""
    from moelink.kernels.ops_qsa import _triton_qsa_select

    meta = meta_of(gen, CTX_Q, kdev)
    c, topk, H, Di = 4, 2, 3, 16
    T = sum(meta.query_lens)
    q = torch.randn(T, H, Di, generator=gen).to(dtype)
    keys = torch.randn(meta.num_seqs, meta.max_seq_len // c, Di, generator=gen).to(dtype)
    want = reference_qsa_select(q.double(), keys.double(), meta_to(meta, "cpu"), topk, c)
    got = _triton_qsa_select(q.to(kdev), keys.to(kdev), meta, topk, c).cpu()
    for t in range(T):
        assert sorted(x for x in got[t].tolist() if x >= 0) == sorted(x for x in want[t].tolist() if x >= 0), t


@pytest.mark.slow  # ~1.5 s: a dense softmax per token and head
def test_reference_sparse_gqa_equals_dense_when_every_position_is_selected(gen):
    meta = meta_of(gen, CTX_Q, "cpu")
    N, K, H = 4, 2, 8
    kc, vc = (cache_of(gen, meta, K * H, torch.float64, "cpu").view(-1, L, K, H) for _ in range(2))
    T = sum(meta.query_lens)
    q = torch.randn(T, N, H, generator=gen, dtype=torch.float64)
    X = max(meta.seq_lens)
    pos = torch.tensor([list(range(p + 1)) + [-1] * (X - p - 1) for _, p in positions(meta, "cpu")])
    got = reference_sparse_gqa_attention(q, kc, vc, meta, pos, 0.3)
    for t, (s, p) in enumerate(positions(meta, "cpu")):
        rows = [int(meta.block_tables_SM[s, j // L]) * L + j % L for j in range(p + 1)]
        k, v = kc.reshape(-1, K, H)[rows], vc.reshape(-1, K, H)[rows]
        for n in range(N):
            w = torch.softmax(k[:, n // (N // K)] @ q[t, n] * 0.3, dim=0)
            torch.testing.assert_close(got[t, n], w @ v[:, n // (N // K)])


@pytest.mark.slow  # ~1.5 s each in the interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_sparse_gqa_equals_reference(gen, kdev, dtype):
    """Random selections of up to 37 positions in random order with -1 between them; 4 query heads over 2 kv heads
    of 24 (not a power of two)."""
    from moelink.kernels.triton_qsa import triton_sparse_gqa_attention

    meta = meta_of(gen, CTX_Q, kdev)
    N, K, H, X = 4, 2, 24, 37
    kc, vc = (cache_of(gen, meta, K * H, dtype, kdev).view(-1, L, K, H) for _ in range(2))
    T = sum(meta.query_lens)
    q = torch.randn(T, N, H, generator=gen).to(dtype).to(kdev)
    rows = []
    for _, p in positions(meta, "cpu"):
        picked = torch.randperm(p + 1, generator=gen)[:X - 5].tolist()
        row = picked + [-1] * (X - len(picked))
        rows.append([row[i] for i in torch.randperm(X, generator=gen).tolist()])  # -1 anywhere
    pos = torch.tensor(rows)
    want = reference_sparse_gqa_attention(q.double().cpu(), kc.double().cpu(), vc.double().cpu(),
                                          meta_to(meta, "cpu"), pos, 0.2)
    got = triton_sparse_gqa_attention(q, kc, vc, meta, pos.to(kdev), 0.2)
    err = (got.double().cpu() - want).norm() / want.norm()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), err


@pytest.mark.slow
def test_engine_with_triton_kernels_matches_reference(qwen4_exp_path, kdev):
    """Qwen3.8-Flash-Next's tiny model on CPU with every kernel forced to Triton (interpreter; float32): the QSA
    attention kernel, the hyper-connections' residual step (an identity stream mixing), gated DeltaNet's kernels
    beside the PLE: the reference kernels' tokens and logprobs."""
    import random

    from moelink.engine import LLM, SamplingParams

    if kdev.type != "cpu":
        pytest.skip("CPU interpreter smoke; with a GPU the engine tests run on Triton")
    path = qwen4_exp_path
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 400) for _ in range(n)] for n in (1, 21, 9)]  # 21: QSA selects (budget 8)

    def run(kernels):
        llm = LLM(path, dtype="float32", device="cpu", kernels=kernels, max_num_seqs=4, max_num_batched_tokens=16,
                  num_kv_blocks=32, block_size=16, skip_warmup=True)
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, logprobs=5)
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, params, use_tqdm=False)]

    for (tok_w, lps_w), (tok_g, lps_g) in zip(run("reference"), run("triton")):
        assert tok_g == tok_w
        for lw, lg in zip(lps_w, lps_g):
            assert lw.keys() == lg.keys()
            assert max(abs(lw[t].logprob - lg[t].logprob) for t in lw) < 1e-4


@pytest.mark.slow  # Triton in the interpreter, eager and replayed
def test_graph_decode_matches_eager(qwen4_exp_path, kdev):
    """Decode graphs (engine/rank/cuda_graph.py, `Replay` on CPU) of Qwen3.8-Flash-Next: QSA decode steps pool
    max_model_len // c blocks (no host length read), the PLE's states per static slot; a replayed decode equals the
    eager engine on the same Triton kernels, the null state slot stays zero (padded rows write zeros) and every
    block comes back."""
    from moelink.engine import LLM, SamplingParams
    from tests.helpers.graph_replays import Replay, count_replays

    if kdev.type != "cpu":
        pytest.skip("CPU stand-in for the capture; with a GPU, real graphs are captured by the engine itself")
    path = qwen4_exp_path
    prompts = [[5, 9, 13, 7, 22, 31, 4, 2, 8, 8, 11, 17, 3, 30, 21, 6, 9], [3, 3, 40]]

    def llm():
        return LLM(path, dtype="float32", device="cpu", kernels="triton", max_num_seqs=3, max_num_batched_tokens=32,
                   num_kv_blocks=40, block_size=4, enable_prefix_caching=False, skip_warmup=True, max_model_len=64)

    def generate(engine):
        params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (4, 3)]
        return [o.outputs[0].token_ids for o in engine.generate(prompts, params, use_tqdm=False)]

    want = generate(llm())
    engine = llm()
    runner = engine.engine.executor.worker.runner
    runner.graph_sizes, runner.graph_backend = (1, 2), Replay()  # one forward per size: the warm-up's
    runner._capture_graphs()
    assert runner.graphs is not None and set(runner.graphs.steps) == {1, 2}
    replays = count_replays(runner.graphs)
    got = generate(engine)
    assert sum(replays.values()) > 0, f"no step replayed a graph: {replays}"
    assert got == want
    null = runner.state_caches.null_slot
    assert all(not t[null].any() for pair in runner.state_caches.layers if pair is not None for t in pair)
    stats = engine.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_batch_invariant_forms_equal_the_references(gen):
    """Batch-invariant mode's QSA (kernels/batch_invariant_qsa.py): the reference's positions (as sets per token)
    through the invariant DSA top-k, and the reference's attention over random selections with -1 anywhere, in
    float64."""
    from moelink.kernels.batch_invariant_qsa import invariant_qsa_select, invariant_sparse_gqa_attention

    meta = meta_of(gen, CTX_Q, "cpu")
    c, topk, Hi, Di = 4, 2, 3, 16
    T = sum(meta.query_lens)
    q = torch.randn(T, Hi, Di, generator=gen, dtype=torch.float64)
    keys = torch.randn(meta.num_seqs, meta.max_seq_len // c, Di, generator=gen, dtype=torch.float64)
    want = reference_qsa_select(q, keys, meta, topk, c)
    got = invariant_qsa_select(q, keys, meta, topk, c)
    assert got.shape == want.shape
    for t in range(T):
        assert sorted(x for x in got[t].tolist() if x >= 0) == sorted(x for x in want[t].tolist() if x >= 0), t
    N, K, H, X = 4, 2, 8, 21
    kc, vc = (cache_of(gen, meta, K * H, torch.float64, "cpu").view(-1, L, K, H) for _ in range(2))
    qa = torch.randn(T, N, H, generator=gen, dtype=torch.float64)
    rows = []
    for _, p in positions(meta, "cpu"):
        picked = torch.randperm(p + 1, generator=gen)[:X - 5].tolist()
        row = picked + [-1] * (X - len(picked))
        rows.append([row[i] for i in torch.randperm(X, generator=gen).tolist()])
    pos = torch.tensor(rows)
    torch.testing.assert_close(invariant_sparse_gqa_attention(qa, kc, vc, meta, pos, 0.2),
                               reference_sparse_gqa_attention(qa, kc, vc, meta, pos, 0.2))
