"""Gated DeltaNet linear attention (Qwen3-Next, Qwen3.5-MoE: three layers in four) over packed variable-length
batches whose recurrent states live in a state pool: plain-torch references (the contract, the float64 oracle and
the CPU path). kernels/triton_gated_delta.py is the GPU path (kernels/fla_gated_delta.py hands long prefills to
fla's chunked kernels where fla-core is installed); kernels/causal_conv1d.py is the short convolution before it.

Legend: T tokens (packed, sequence after sequence), S sequences, P state-pool slots, G q/k heads, N value heads (a
multiple of G: value head n reads q/k head n // (N / G), transformers' repeat_interleave), K q/k head dim, V value
head dim, Q intermediate states kept per sequence (speculative decoding).

Math (transformers' torch_recurrent_gated_delta_rule with use_qk_l2norm_in_kernel=True, what both models call), per
value head, in float32 (float64 when the inputs are):
    q <- l2norm(q) * scale (scale = K^-0.5 unless given), k <- l2norm(k), l2norm(x) = x * rsqrt(sum(x^2) + 1e-6)
    S <- exp(g_t) S;  S <- S + k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T q_t          (S: [K, V])
g is the decay in log space (<= 0; `reference_gdn_gating` makes it from the model's a, A_log, dt_bias), beta the
write strength (sigmoid(b)). o has q's dtype. Kimi Delta Attention (KDA, Kimi Linear) is the same rule with a decay
per key channel: g [T, N, K], S <- diag(exp(g_t)) S (each row k of S by its own factor); every function here takes
either shape (a per-channel decay runs the per-token recurrence: the chunked form below is the per-head one).

The state pool, state_pool_PNKV: float32 [P, N, K, V] (transformers' [num_v_heads, head_k_dim, head_v_dim] per
slot), one slot per running sequence, for one layer. slot_ids_S[s] is sequence s's slot: its state is read before
its first token and written back after its last; slot -1 is a padding row (read as zeros, written nowhere).
has_initial_state_S (bool [S], None = all True) says whether to read the slot or start from zeros: False for a
sequence's first prefill chunk, True for later chunks and decodes, so a chunked prefill continues from its state.

Speculative decoding (`reference_gated_delta_rule_decode` with intermediate_states_SQNKV): the verify step runs
the last accepted token and the drafts of each sequence; the state after its j-th token goes to
intermediate_states_SQNKV[s, j] (j < Q) and the pool is left as it was. Once the sampler knows how many of them
were accepted, `reference_commit_states` copies state number num_accepted_S[s] - 1 into the slot (0 keeps the
slot). The conv state (kernels/causal_conv1d.py) follows the same protocol with its own buffer.
The buffers cost Q states per sequence per layer (Qwen3-Next, one rank: 2 MB a state, x 36 layers). The other way,
no buffer: run the verify step through `reference_gated_delta_rule_decode` with intermediate_states_SQNKV given but
of Q = 0 ([S, 0, N, K, V]: the pool is not written), keep the layer's k, v, g, beta until the sampler has decided, and
`reference_replay_gated_delta_state` re-runs each sequence's accepted tokens from its slot's (untouched) state into
the slot: one state read and one written per sequence, against Q written and one copied
(causal_conv1d.reference_replay_conv_state for the conv state).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .batch_invariant import fixed_bmm

L2NORM_EPS = 1e-6  # transformers' l2norm (and fla's kernels)
CHUNK = 64  # the chunked form's block (transformers' and fla's chunk_size)
# Sequences up to this long run the per-token recurrence, batched across sequences (decodes, drafts, short
# prompts); longer ones the chunked form, one sequence at a time.
RECURRENT_MAX_LEN = 16
# The chunked form works on this many tokens at a time (its [N, chunks, 64, 64] tensors stay ~100 MB at
# Qwen3-Next's 32 heads on a 32k prompt).
SEGMENT = 64 * CHUNK


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """x * rsqrt(sum(x^2) + eps) over the last dim (transformers' l2norm)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def reference_gdn_gating(a_TN: torch.Tensor, b_TN: torch.Tensor, A_log_N: torch.Tensor,
                         dt_bias_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The models' gates from their in_proj_ba outputs: g = -exp(A_log) * softplus(a + dt_bias) (float32, as
    transformers computes it: `a.float()`), beta = sigmoid(b) (b's dtype). Returns (g_TN, beta_TN)."""
    g_TN = -A_log_N.float().exp() * F.softplus(a_TN.float() + dt_bias_N)
    return g_TN, b_TN.sigmoid()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_batch_args(query_start_loc_S1, slot_ids_S, has_initial_state_S=None) -> int:
    """The per-sequence arguments of this protocol (gated DeltaNet's and the causal conv1d's alike): returns S."""
    if query_start_loc_S1.dim() != 1 or query_start_loc_S1.numel() < 1:
        raise ValueError(f"query_start_loc_S1 {tuple(query_start_loc_S1.shape)} must be [S + 1].")
    S = query_start_loc_S1.numel() - 1
    if tuple(slot_ids_S.shape) != (S,):
        raise ValueError(f"slot_ids_S {tuple(slot_ids_S.shape)} must be [S={S}] (query_start_loc_S1 has S + 1 entries).")
    if has_initial_state_S is not None and tuple(has_initial_state_S.shape) != (S,):
        raise ValueError(f"has_initial_state_S {tuple(has_initial_state_S.shape)} must be [S={S}] or None.")
    return S


def check_gdn_args(q_TGK, k_TGK, v_TNV, g_TN, beta_TN, state_pool_PNKV, query_start_loc_S1, slot_ids_S,
                   has_initial_state_S=None, intermediate_states_SQNKV=None) -> tuple[int, int, int, int, int, int]:
    """Shape checks shared by every backend; returns (T, S, G, N, K, V)."""
    if q_TGK.dim() != 3 or k_TGK.shape != q_TGK.shape:
        raise ValueError(f"q_TGK {tuple(q_TGK.shape)} and k_TGK {tuple(k_TGK.shape)} must both be [T, G, K].")
    T, G, K = q_TGK.shape
    if v_TNV.dim() != 3 or v_TNV.shape[0] != T:
        raise ValueError(f"v_TNV {tuple(v_TNV.shape)} must be [T={T}, N, V].")
    N, V = v_TNV.shape[1:]
    if N % G:
        raise ValueError(f"v_TNV has N={N} value heads, not a multiple of the G={G} q/k heads.")
    if tuple(beta_TN.shape) != (T, N):
        raise ValueError(f"beta_TN {tuple(beta_TN.shape)} must be [T={T}, N={N}].")
    if tuple(g_TN.shape) not in ((T, N), (T, N, K)):
        raise ValueError(f"g_TN {tuple(g_TN.shape)} must be [T={T}, N={N}] (a decay per head) or [T, N, K={K}] (per "
                         "key channel: Kimi Delta Attention).")
    if state_pool_PNKV.dim() != 4 or tuple(state_pool_PNKV.shape[1:]) != (N, K, V):
        raise ValueError(f"state_pool_PNKV {tuple(state_pool_PNKV.shape)} must be [P, N={N}, K={K}, V={V}].")
    if state_pool_PNKV.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"state_pool_PNKV.dtype={state_pool_PNKV.dtype} is invalid: recurrent states are float32 "
                         "(float64 for the reference's oracle runs).")
    S = check_batch_args(query_start_loc_S1, slot_ids_S, has_initial_state_S)
    if intermediate_states_SQNKV is not None:
        x = intermediate_states_SQNKV
        if x.dim() != 5 or x.shape[0] != S or tuple(x.shape[2:]) != (N, K, V) or x.dtype != state_pool_PNKV.dtype:
            raise ValueError(f"intermediate_states_SQNKV {tuple(x.shape)} {x.dtype} must be [S={S}, Q, {N}, {K}, {V}] "
                             f"{state_pool_PNKV.dtype} (the pool's dtype).")
    return T, S, G, N, K, V


def _heads(q_TGK, k_TGK, v_TNV, g_TN, beta_TN, scale, cdt):
    """The compute-dtype inputs per value head: l2-normed, scaled q and l2-normed k repeated to N heads."""
    N, K = v_TNV.shape[1], q_TGK.shape[-1]
    rep = N // q_TGK.shape[1]
    scale = K ** -0.5 if scale is None else scale
    q = l2norm(q_TGK.to(cdt)) * scale
    k = l2norm(k_TGK.to(cdt))
    if rep > 1:
        q, k = q.repeat_interleave(rep, dim=1), k.repeat_interleave(rep, dim=1)
    return q, k, v_TNV.to(cdt), g_TN.to(cdt), beta_TN.to(cdt)


def _initial_states(state_pool_PNKV, slot_ids_S, has_initial_state_S, cdt) -> torch.Tensor:
    """[S, N, K, V]: each sequence's starting state (zeros for padding rows and new sequences)."""
    read_S = slot_ids_S >= 0
    if has_initial_state_S is not None:
        read_S = read_S & has_initial_state_S.to(torch.bool)
    init = state_pool_PNKV[slot_ids_S.clamp_min(0).long()].to(cdt)
    return init * read_S.to(cdt)[:, None, None, None]


def _row_products(a_SNK: torch.Tensor, h_SNKV: torch.Tensor) -> torch.Tensor:
    """h^T a per (sequence, head), [S, N, V]: one-row matrices in one batched product. The row count is 1 by
    construction (not the batch's), so batch-invariant mode's TILE_M-row tiles would only pad each product to 16
    rows (16 times the work): the products run as the mode runs a batched product's tile, fixed_bmm (the batch
    whole on CPU, fixed tiles of matrices on CUDA), on contiguous operands (a kernel may depend on strides).
    Not einsum: the mode refuses it."""
    S, N, K = a_SNK.shape
    with torch._C.DisableTorchFunction():
        a_X1K = a_SNK.contiguous().view(S * N, 1, K)
        return fixed_bmm(a_X1K, h_SNKV.contiguous().view(S * N, K, -1)).view(S, N, -1)


def recurrent_batch(q_SLNK, k_SLNK, v_SLNV, g_SLN, beta_SLN, lens_S, state_SNKV, keep_Q: int = 0):
    """The per-token recurrence over padded [S, L, ...] inputs, vectorized across sequences: rows past a
    sequence's length leave its state as it is. Returns (o_SLNV, final state_SNKV, states after each token
    [S, min(L, keep_Q), N, K, V] or None)."""
    S, L = q_SLNK.shape[:2]
    o = torch.zeros_like(v_SLNV)
    kept = [] if keep_Q else None
    for j in range(L):
        live = (j < lens_S)[:, None, None, None]
        decay = g_SLN[:, j].exp()  # [S, N], or [S, N, K] per key channel (KDA)
        h = state_SNKV * (decay[..., None, None] if decay.dim() == 2 else decay[..., None])
        kv_mem = _row_products(k_SLNK[:, j], h)
        delta = (v_SLNV[:, j] - kv_mem) * beta_SLN[:, j, :, None]
        h = h + k_SLNK[:, j, :, :, None] * delta[:, :, None, :]
        o[:, j] = _row_products(q_SLNK[:, j], h)
        state_SNKV = torch.where(live, h, state_SNKV)
        if kept is not None and j < keep_Q:
            kept.append(state_SNKV)
    return o, state_SNKV, (torch.stack(kept, dim=1) if kept else None)


def chunked_one(q_LNK, k_LNK, v_LNV, g_LN, beta_LN, state_NKV, chunk: int = CHUNK):
    """One sequence in the chunked (WY) form of transformers' torch_chunk_gated_delta_rule, SEGMENT tokens at a
    time. Inputs already normed, scaled and repeated per value head. Returns (o_LNV, final state_NKV)."""
    outs = []
    for s0 in range(0, q_LNK.shape[0], SEGMENT):
        seg = slice(s0, s0 + SEGMENT)
        o, state_NKV = _chunked_segment(q_LNK[seg], k_LNK[seg], v_LNV[seg], g_LN[seg], beta_LN[seg], state_NKV, chunk)
        outs.append(o)
    return torch.cat(outs), state_NKV


def _chunked_segment(q_LNK, k_LNK, v_LNV, g_LN, beta_LN, state_NKV, chunk):
    L = q_LNK.shape[0]
    pad = (-L) % chunk
    # Heads first, padded to whole chunks: padding rows have k = 0 and beta = 0, so they leave the state alone.
    q, k, v = (F.pad(x.transpose(0, 1), (0, 0, 0, pad)) for x in (q_LNK, k_LNK, v_LNV))
    g, beta = (F.pad(x.transpose(0, 1), (0, pad)) for x in (g_LN, beta_LN))
    N, Lp = g.shape
    C = Lp // chunk
    q, k, v = (x.reshape(N, C, chunk, -1) for x in (q, k, v))
    g, beta = g.reshape(N, C, chunk).cumsum(-1), beta.reshape(N, C, chunk)
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    decay = (g[..., :, None] - g[..., None, :]).masked_fill(upper, float("-inf")).exp()  # [N, C, i, j]
    # (I + strictly_lower(diag(beta) K K^T * decay)) [u | w] = [v_beta | k_beta * exp(g)]: the WY representation.
    system = (k_beta @ k.transpose(-1, -2)) * decay
    rhs = torch.cat([v_beta, k_beta * g.exp()[..., None]], dim=-1)
    u_w = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    u, w = u_w[..., : v.shape[-1]], u_w[..., v.shape[-1]:]
    attn = (q @ k.transpose(-1, -2)) * decay
    q_decayed = q * g.exp()[..., None]
    k_decayed = k * (g[..., -1:] - g).exp()[..., None]
    chunk_decay = g[..., -1].exp()[..., None, None]
    o = torch.empty_like(v)
    for i in range(C):
        v_new = u[:, i] - w[:, i] @ state_NKV
        o[:, i] = q_decayed[:, i] @ state_NKV + attn[:, i] @ v_new
        state_NKV = state_NKV * chunk_decay[:, i] + k_decayed[:, i].transpose(-1, -2) @ v_new
    return o.reshape(N, Lp, -1)[:, :L].transpose(0, 1), state_NKV


def _pad_by_sequence(x_T_, starts, lens, L):
    """[T, ...] -> [S, L, ...] zero-padded (the sequences' rows in order)."""
    out = x_T_.new_zeros((len(lens), L) + tuple(x_T_.shape[1:]))
    for s, (st, n) in enumerate(zip(starts, lens)):
        out[s, :n] = x_T_[st: st + n]
    return out


def _run(q_TGK, k_TGK, v_TNV, g_TN, beta_TN, state_pool_PNKV, query_start_loc_S1, slot_ids_S, has_initial_state_S,
         scale, keep_Q, chunked):
    cdt = compute_dtype(q_TGK)
    q, k, v, g, beta = _heads(q_TGK, k_TGK, v_TNV, g_TN, beta_TN, scale, cdt)
    init_SNKV = _initial_states(state_pool_PNKV, slot_ids_S, has_initial_state_S, cdt)
    qsl = query_start_loc_S1.tolist()  # device -> host sync (the reference's CPU path: already on the host)
    starts, lens = qsl[:-1], [b - a for a, b in zip(qsl[:-1], qsl[1:])]
    S = len(lens)
    o_TNV = torch.zeros(v.shape, dtype=cdt, device=v.device)
    final_SNKV = init_SNKV.clone()
    long_ = [s for s in range(S) if chunked and g.dim() == 2 and lens[s] > RECURRENT_MAX_LEN]
    short = [s for s in range(S) if s not in set(long_) and lens[s] > 0]
    kept = None
    for s in long_:
        rows = slice(starts[s], starts[s] + lens[s])
        o_TNV[rows], final_SNKV[s] = chunked_one(q[rows], k[rows], v[rows], g[rows], beta[rows], init_SNKV[s])
    if short:
        st, ln = [starts[s] for s in short], [lens[s] for s in short]
        L = max(ln)
        pq, pk, pv, pg, pbeta = (_pad_by_sequence(x, st, ln, L) for x in (q, k, v, g, beta))
        idx = torch.tensor(short, device=v.device)
        o_SLNV, fin, kept = recurrent_batch(pq, pk, pv, pg, pbeta, torch.tensor(ln, device=v.device), init_SNKV[idx],
                                            keep_Q)
        final_SNKV[idx] = fin
        for i, (a, n) in enumerate(zip(st, ln)):
            o_TNV[a: a + n] = o_SLNV[i, :n]
    return o_TNV.to(q_TGK.dtype), final_SNKV, short, lens, kept


def reference_gated_delta_rule(
    q_TGK: torch.Tensor, k_TGK: torch.Tensor, v_TNV: torch.Tensor, g_TN: torch.Tensor, beta_TN: torch.Tensor,
    state_pool_PNKV: torch.Tensor, query_start_loc_S1: torch.Tensor, slot_ids_S: torch.Tensor,
    has_initial_state_S: torch.Tensor | None = None, scale: float | None = None,
) -> torch.Tensor:
    """The gated delta rule over a packed batch of any lengths (prefill chunks, decodes, mixed): o_TNV of q's dtype.

    q_TGK, k_TGK: the convolved q/k (strided views of the conv output are fine), l2-normed here; v_TNV; g_TN decay
    (log space, float32); beta_TN. Each sequence starts from its slot's state (zeros where has_initial_state_S is
    False or the slot is -1) and its final state is written back to the slot (cast to the pool's dtype). Sequences
    longer than RECURRENT_MAX_LEN run the chunked form (chunks of 64, one sequence at a time), the rest the per-token
    recurrence batched across sequences: both are the same function (equal in float64)."""
    return gated_delta_rule_torch(q_TGK, k_TGK, v_TNV, g_TN, beta_TN, state_pool_PNKV, query_start_loc_S1,
                                  slot_ids_S, has_initial_state_S, scale, chunked=True)


def gated_delta_rule_torch(
    q_TGK: torch.Tensor, k_TGK: torch.Tensor, v_TNV: torch.Tensor, g_TN: torch.Tensor, beta_TN: torch.Tensor,
    state_pool_PNKV: torch.Tensor, query_start_loc_S1: torch.Tensor, slot_ids_S: torch.Tensor,
    has_initial_state_S: torch.Tensor | None = None, scale: float | None = None, *, chunked: bool = True,
) -> torch.Tensor:
    """`reference_gated_delta_rule`; chunked=False runs every sequence in the per-token recurrence, the decode
    step's form (batch-invariant mode: a prefilled token then computes what its decode would, bit for bit)."""
    check_gdn_args(q_TGK, k_TGK, v_TNV, g_TN, beta_TN, state_pool_PNKV, query_start_loc_S1, slot_ids_S,
                   has_initial_state_S)
    o, final_SNKV, _, _, _ = _run(q_TGK, k_TGK, v_TNV, g_TN, beta_TN, state_pool_PNKV, query_start_loc_S1,
                                  slot_ids_S, has_initial_state_S, scale, 0, chunked=chunked)
    write = (slot_ids_S >= 0).tolist()  # device -> host sync (reference only)
    for s, ok in enumerate(write):
        if ok:
            state_pool_PNKV[int(slot_ids_S[s])] = final_SNKV[s].to(state_pool_PNKV.dtype)
    return o


def reference_gated_delta_rule_decode(
    q_TGK: torch.Tensor, k_TGK: torch.Tensor, v_TNV: torch.Tensor, g_TN: torch.Tensor, beta_TN: torch.Tensor,
    state_pool_PNKV: torch.Tensor, query_start_loc_S1: torch.Tensor, slot_ids_S: torch.Tensor,
    intermediate_states_SQNKV: torch.Tensor | None = None, scale: float | None = None,
) -> torch.Tensor:
    """Decode and speculative verify: a few tokens per sequence, every sequence continuing from its slot's state
    (slot -1: a padding row, zeros in, nothing written). Returns o_TNV (q's dtype).

    Without intermediate_states_SQNKV the final states are written back to the slots. With it, the state after
    token j of sequence s goes to intermediate_states_SQNKV[s, j] for j < Q (rows past a sequence's length are left
    as they are) and the pool is not touched: `reference_commit_states` keeps the accepted one."""
    check_gdn_args(q_TGK, k_TGK, v_TNV, g_TN, beta_TN, state_pool_PNKV, query_start_loc_S1, slot_ids_S,
                   None, intermediate_states_SQNKV)
    keep_Q = intermediate_states_SQNKV.shape[1] if intermediate_states_SQNKV is not None else 0
    o, final_SNKV, short, lens, kept = _run(q_TGK, k_TGK, v_TNV, g_TN, beta_TN, state_pool_PNKV, query_start_loc_S1,
                                            slot_ids_S, None, scale, keep_Q, chunked=False)
    if intermediate_states_SQNKV is not None:
        for i, s in enumerate(short if keep_Q else []):
            n = min(lens[s], keep_Q)
            intermediate_states_SQNKV[s, :n] = kept[i, :n].to(intermediate_states_SQNKV.dtype)
        return o
    for s, slot in enumerate(slot_ids_S.tolist()):  # device -> host sync (reference only)
        if slot >= 0:
            state_pool_PNKV[slot] = final_SNKV[s].to(state_pool_PNKV.dtype)
    return o


def reference_replay_gated_delta_state(
    k_TGK: torch.Tensor, v_TNV: torch.Tensor, g_TN: torch.Tensor, beta_TN: torch.Tensor, state_pool_PNKV: torch.Tensor,
    query_start_loc_S1: torch.Tensor, slot_ids_S: torch.Tensor, num_accepted_S: torch.Tensor,
) -> None:
    """After a verify step that left the pool untouched: each slot (>= 0) advances over the first num_accepted_S[s]
    tokens of its sequence in the verify batch (k, v, g, beta as the verify step had them; 0 keeps the state)."""
    check_gdn_args(k_TGK, k_TGK, v_TNV, g_TN, beta_TN, state_pool_PNKV, query_start_loc_S1, slot_ids_S)
    if tuple(num_accepted_S.shape) != tuple(slot_ids_S.shape):
        raise ValueError(f"num_accepted_S {tuple(num_accepted_S.shape)} must be [S={slot_ids_S.shape[0]}].")
    qsl, acc = query_start_loc_S1.tolist(), num_accepted_S.tolist()  # device -> host sync (reference only)
    counts = [max(0, min(b - a, n)) for a, b, n in zip(qsl[:-1], qsl[1:], acc)]
    rows = torch.cat([torch.arange(a, a + n) for a, n in zip(qsl[:-1], counts)] + [torch.zeros(0, dtype=torch.long)])
    rows = rows.to(k_TGK.device)
    qsl_kept = torch.tensor([0] + counts, device=query_start_loc_S1.device).cumsum(0)
    k = k_TGK[rows]
    reference_gated_delta_rule_decode(k, k, v_TNV[rows], g_TN[rows], beta_TN[rows], state_pool_PNKV, qsl_kept,
                                      slot_ids_S)


def reference_commit_states(pool_PX: torch.Tensor, slot_ids_S: torch.Tensor, intermediate_states_SQX: torch.Tensor,
                            num_accepted_S: torch.Tensor) -> None:
    """After a verify step: pool[slot_ids_S[s]] = intermediate_states[s, num_accepted_S[s] - 1] for each sequence
    with a slot (>= 0) and num_accepted_S[s] >= 1 (0 leaves the slot as it was). X is any trailing shape: the
    recurrent states ([N, K, V]) and the conv states ([R, C], kernels/causal_conv1d.py) alike.
    num_accepted_S counts this step's tokens whose effect is kept: the last accepted token plus the accepted drafts."""
    if intermediate_states_SQX.shape[0] != slot_ids_S.shape[0] or intermediate_states_SQX.shape[2:] != pool_PX.shape[1:]:
        raise ValueError(f"intermediate_states_SQX {tuple(intermediate_states_SQX.shape)} must be [S={slot_ids_S.shape[0]}, "
                         f"Q, *{tuple(pool_PX.shape[1:])}] (the pool's trailing shape).")
    if tuple(num_accepted_S.shape) != tuple(slot_ids_S.shape):
        raise ValueError(f"num_accepted_S {tuple(num_accepted_S.shape)} must be [S={slot_ids_S.shape[0]}].")
    Q = intermediate_states_SQX.shape[1]
    for s, (slot, n) in enumerate(zip(slot_ids_S.tolist(), num_accepted_S.tolist())):  # host sync (reference only)
        if slot >= 0 and 1 <= n <= Q:
            pool_PX[slot] = intermediate_states_SQX[s, n - 1].to(pool_PX.dtype)
