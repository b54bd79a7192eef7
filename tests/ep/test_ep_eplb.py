"""Online EPLB on Ray (CPU ranks, gloo): a router bias sends half of all (token, expert) pairs to experts 4 and 5
(both on rank 2); the engine re-places experts while serving, moves the weights between ranks a layer per step
boundary, and switches together. Greedy float64 outputs equal one rank's; the measured max/mean load per rank
falls to what EPLB predicted; the longest inter-step move chunk is printed and bounded."""
from __future__ import annotations

import random

import pytest

from moelink.engine import LLM, SamplingParams

pytestmark = pytest.mark.slow

HOT = [4, 5]  # both on rank 2; the default redundant slots copy experts 0..3, not these
ENGINE_KW = dict(dtype="float64", max_num_seqs=8, max_num_batched_tokens=48, num_kv_blocks=128, block_size=16)
MOVE_CHUNK_BOUND_S = 5.0  # one layer's changed experts between two steps (tiny model, CPU, gloo)


@pytest.fixture(scope="module")
def skewed_model(tmp_path_factory):
    """A tiny DeepSeek-V3 (2 MoE layers, 8 experts, top-4) whose router bias always selects experts 4 and 5."""
    from safetensors.torch import load_file, save_file

    from moelink.engine.tiny_model import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("dsv3_skew"), "deepseek_v3", num_layers=3, num_experts=8,
                           top_k=4, max_position_embeddings=512, extra=dict(n_group=1, topk_group=1))
    f = path / "model.safetensors"
    sd = load_file(f)
    biases = [k for k in sd if k.endswith("e_score_correction_bias")]
    assert len(biases) == 2
    for k in biases:
        sd[k] = sd[k].clone()
        sd[k][HOT] += 100.0  # selection only: the routed weights still come from the gate scores
    save_file(sd, f, metadata={"format": "pt"})
    return str(path)


def _greedy(llm, prompts):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


# EP 2 without redundant slots (EPLB can only repack: 4 and 5 to different ranks); EP 4 with 4 (copies of 4, 5).
@pytest.mark.parametrize("ep,redundant", [(2, 0), (4, 4)])
def test_online_eplb_balances_skewed_load_outputs_unchanged(local_ray, skewed_model, ep, redundant):
    rng = random.Random(ep)
    prompts = [[rng.randrange(500) for _ in range(rng.randint(4, 40))] for _ in range(16)]
    want = _greedy(LLM(skewed_model, **ENGINE_KW), prompts)
    llm = LLM(skewed_model, expert_parallel_size=ep, num_redundant_experts=redundant, eplb_interval=4, **ENGINE_KW)
    try:
        got = _greedy(llm, prompts)
        load = llm.engine.expert_load()
    finally:
        llm.engine.shutdown()
    assert got == want  # token-identical across the rebalance
    m = load.eplb
    print(f"\nEPLB EP {ep}: {m}")
    total = sum(map(sum, load.tokens_per_expert_LG))
    assert sum(sum(row[e] for e in HOT) for row in load.tokens_per_expert_LG) == total // 2  # the skew
    assert m["rebalances"] >= 1 and m["bytes_moved"] > 0
    first = m["history"][0]  # the move away from the default placement
    assert first["bytes_moved"] > 0
    assert first["predicted_imbalance_before"] > 1.3 and first["predicted_imbalance_after"] < 1.1
    # Measured (pairs each rank's experts computed) agrees with the prediction, before and after the move.
    assert first["measured_imbalance_before"] == pytest.approx(first["predicted_imbalance_before"], abs=0.1)
    assert first["measured_imbalance_after"] == pytest.approx(first["predicted_imbalance_after"], abs=0.15)
    assert first["measured_imbalance_after"] < first["measured_imbalance_before"] - 0.25
    print(f"longest inter-step move chunk: {m['longest_move_chunk_s'] * 1e3:.1f} ms, "
          f"commit {m['commit_s'] * 1e3:.1f} ms")
    assert m["longest_move_chunk_s"] < MOVE_CHUNK_BOUND_S
    # The report shows the current placement: the hot experts hold copies on several ranks now.
    for layer in load.experts_on_ranks_per_layer:
        if redundant:
            assert all(sum(e in held for held in layer) >= 2 for e in HOT)
        else:
            assert not any(HOT[0] in held and HOT[1] in held for held in layer)
