"""The fla prefill path (kernels/fla_gated_delta.py): its gather of starting states by slot and its scatter of final
states, with transformers' torch chunked rule standing in for fla's kernel (which does not run in the interpreter),
against the float64 reference; CPU tensors without a chunk function fall back to the recurrence."""
from __future__ import annotations

import torch
from transformers.models.qwen3_next import modeling_qwen3_next as hf

from moelink.kernels.fla_gated_delta import FlaGatedDeltaRule
from moelink.kernels.gated_delta import reference_commit_states, reference_gated_delta_rule, reference_gdn_gating

G, N, K, V, P = 2, 4, 16, 32, 8


def _fake_fla(calls):
    """fla's chunk_gated_delta_rule signature over transformers' torch form, sequence by sequence."""

    def chunk(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
              use_qk_l2norm_in_kernel=False, cu_seqlens=None):
        assert q.shape[0] == 1 and cu_seqlens.dtype == torch.int64 and scale is None and use_qk_l2norm_in_kernel
        assert initial_state.shape == (cu_seqlens.numel() - 1, N, K, V)
        calls.append(initial_state.clone())
        outs, finals = [], []
        for s, (a, b) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
            o, fin = hf.torch_chunk_gated_delta_rule(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b],
                                                     initial_state=initial_state[s: s + 1], output_final_state=True,
                                                     use_qk_l2norm_in_kernel=True)
            outs.append(o)
            finals.append(fin)
        return torch.cat(outs, dim=1), torch.cat(finals)

    return chunk


def test_fla_path_gathers_and_scatters_states_by_slot(gen, seed):
    lens = [5, 70, 1, 12]
    T = sum(lens)
    q, k = torch.randn(T, G, K, generator=gen), torch.randn(T, G, K, generator=gen)
    v = torch.randn(T, N, V, generator=gen)
    g, beta = reference_gdn_gating(torch.randn(T, N, generator=gen), torch.randn(T, N, generator=gen),
                                   torch.zeros(N), torch.zeros(N))
    pool = torch.randn(P, N, K, V, generator=gen)
    qsl = torch.tensor([0, 5, 75, 76, 88], dtype=torch.int32)
    slots = torch.tensor([3, 0, -1, 6], dtype=torch.int32)  # a padding row: zeros in, nothing written
    has_init = torch.tensor([True, False, True, True])
    calls = []
    rule = FlaGatedDeltaRule(fallback_fn=None, chunk_fn=_fake_fla(calls), commit_fn=reference_commit_states)
    got_pool = pool.clone()
    o = rule(q, k, v, g, beta, got_pool, qsl, slots, has_init)
    init = calls[0]
    assert torch.equal(init[0], pool[3]) and torch.equal(init[3], pool[6]), "continued sequences read their slots"
    assert not init[1].any() and not init[2].any(), "a new sequence and a padding row start from zeros"
    want_pool = pool.double()
    want = reference_gated_delta_rule(q.double(), k.double(), v.double(), g.double(), beta.double(), want_pool, qsl,
                                      slots, has_init)
    torch.testing.assert_close(o.double(), want, rtol=1e-4, atol=1e-4, msg=f"seed={seed}")
    torch.testing.assert_close(got_pool.double(), want_pool, rtol=1e-4, atol=1e-4, msg=f"seed={seed}")


def test_cpu_tensors_fall_back_to_the_recurrence():
    seen = []
    rule = FlaGatedDeltaRule(fallback_fn=lambda *args: seen.append(len(args)) or "recurrence")
    args = [torch.zeros(1, G, K), torch.zeros(1, G, K), torch.zeros(1, N, V), torch.zeros(1, N), torch.zeros(1, N),
            torch.zeros(P, N, K, V), torch.tensor([0, 1]), torch.tensor([0])]
    assert rule(*args) == "recurrence" and seen == [10]
