"""Nemotron-H (NemotronHForCausalLM: NVIDIA Nemotron 3 Nano / Super) against transformers 5.24's own model: config
reading and its refusals, the pairing of its single-block layers into engine layers, greedy parity with
transformers' `generate` in float64, token for token (prompts of 1-150 tokens together under a small token budget,
so they run as several prefill chunks whose Mamba2 states carry chunk to chunk; under a KV pool small enough to
preempt; prefix-cache hits resuming from state checkpoints), prompt logprobs, with and without the latent MoE.
What the family adds: layers of one block each ("M" Mamba2, "*" GQA without rotary, "E" routed relu^2 experts with
no gate beside a relu^2 shared expert, "-" a relu^2 MLP), a mixer and the FFN layer after it paired into one prenorm
engine layer; the experts' latent projections (moe_latent_size); DeepSeek-V3's sigmoid router; `backbone.` names.
Checkpoint: the family's tiny model (engine/models/nemotron_h/tiny.py, drawn by save_drawn_preset), saved by
transformers."""
from __future__ import annotations

import pytest
import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.mamba2_config import Mamba2Config
from moelink.engine.models.nemotron_h.reader import layer_pairs
from moelink.engine.models.nemotron_h.tiny import NEMOTRON_H, NEMOTRON_H_NANO

from tests.helpers.config_dirs import config_dir, set_fields
from tests.helpers.drawn_presets import VOCAB, config_of, save_preset
from tests.helpers.parity import (assert_pool_free, assert_same, check_chunked_batched,
                                  check_preemption_then_prefix_hits, check_under_preemption, engine_greedy, hf_greedy,
                                  prompts)

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


@pytest.fixture(scope="module")
def latent_path(tmp_path_factory) -> str:
    return save_preset(tmp_path_factory.mktemp("nemotron_h"), NEMOTRON_H)


@pytest.fixture(scope="module")
def nano_path(tmp_path_factory) -> str:
    return save_preset(tmp_path_factory.mktemp("nemotron_h_nano"), NEMOTRON_H_NANO)


def _config_dir(tmp_path, edit=None, **overrides) -> str:
    return config_dir(tmp_path, config_of(NEMOTRON_H, **overrides), edit)


# -- config ---------------------------------------------------------------------------------------------------

def test_layer_pairs():
    M, A, E, D = "linear_attention", "full_attention", "moe", "mlp"
    assert layer_pairs([M, E, A, D, M, M, E]) == ((0, 1), (2, 3), (4, None), (5, 6))
    assert layer_pairs([M, A, M]) == ((0, None), (1, None), (2, None))
    # Nemotron 3 Nano's pattern: MEMEM*E...
    assert layer_pairs([M, E, M, E, M, A, E])[:4] == ((0, 1), (2, 3), (4, None), (5, 6))
    for bad in ([E, M], [M, E, E], [M, D, D]):
        with pytest.raises(ValueError, match=r"config.json layers_block_type=.* is not supported: allowed: each 'moe'"):
            layer_pairs(bad)


def test_config(tmp_path):
    """M E * - M M E: engine layers ME, *-, M, ME; Mamba2 4 heads of 32 in 2 groups (dt clamped below at
    time_step_min, as transformers' mixer does), GQA 4 / 2 without rotary, scale head_dim ** -0.5; the routed layers
    engine 0 and 3, sigmoid noaux_tc in float32 (2 groups, top-1 group, top-2, x2.5), relu^2 experts 16 wide, the
    shared expert 24 wide."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path))
    assert cfg.num_layers == 4 and cfg.state_layers == (0, 2, 3) and cfg.sparse_layers == (0, 3)
    m = cfg.attention_for(0)
    assert isinstance(m, Mamba2Config)
    assert (m.num_heads, m.head_dim, m.n_groups, m.state_size, m.conv_kernel, m.conv_bias) == (4, 32, 2, 16, 4, True)
    assert (m.dt_min, m.dt_max, m.norm_eps) == (0.001, float("inf"), 1e-5)
    a = cfg.attention_for(1)
    assert (a.kind, a.num_heads, a.num_kv_heads, a.head_dim, a.rotates(1)) == ("gqa", 4, 2, 16, False)
    r = cfg.moe.router
    assert (r.scoring_func, r.topk_method, r.n_group, r.topk_group, r.top_k, r.routed_scaling_factor,
            r.float32_logits) == ("sigmoid", "noaux_tc", 2, 1, 2, 2.5, True)
    assert (cfg.moe.activation, cfg.moe_intermediate_size, cfg.moe.shared_expert_intermediate_size,
            cfg.intermediate_size, cfg.rms_norm_eps) == ("relu2", 16, 24, 32, 1e-5)
    # hybrid_override_pattern, the published spelling, reads the same
    pattern = ModelConfig.from_pretrained(config_dir(
        tmp_path / "pattern", config_of(NEMOTRON_H),
        lambda raw: (raw.pop("layers_block_type"), raw.update(hybrid_override_pattern="MEM*E"))))
    assert (pattern.num_layers, pattern.sparse_layers, pattern.state_layers) == (3, (0, 2), (0, 1))  # ME, M, *E


@pytest.mark.parametrize("edit,match", [
    (set_fields(layers_block_type=["moe", "linear_attention", "full_attention"]),
     r"config.json layers_block_type=.* is not supported: allowed: each 'moe' / 'mlp' layer right after"),
    (set_fields(layers_block_type=["linear_attention", "moe"]),
     r"config.json layers_block_type=.* is not supported: allowed: at least one 'full_attention'"),
    (set_fields(layers_block_type=["linear_attention", "mlp", "full_attention"]),
     r"config.json layers_block_type=.* is not supported: allowed: at least one 'moe' layer"),
    (set_fields(mlp_hidden_act="silu"), r"config.json mlp_hidden_act='silu' is not supported for NemotronHForCausalLM"),
    (set_fields(mamba_hidden_act="gelu"), r"config.json mamba_hidden_act='gelu' is not supported"),
    (set_fields(mamba_proj_bias=True), r"config.json mamba_proj_bias=True is not supported"),
    (set_fields(mlp_bias=True), r"config.json mlp_bias=True is not supported"),
    (set_fields(n_groups=3), r"config.json n_groups=3 is not supported: allowed: a divisor of mamba_num_heads=4"),
    (set_fields(ssm_state_size=0), r"config.json ssm_state_size=0 is not supported"),
    (set_fields(moe_latent_size=0), r"config.json moe_latent_size=0 is not supported"),
    (set_fields(sliding_window=8), r"config.json sliding_window=8 is not supported"),
])
def test_config_refusals(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(_config_dir(tmp_path, edit=edit))


def test_tensor_parallel_is_refused(latent_path):
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 .* is not supported for NemotronHForCausalLM:"
                                         r" its Mamba2 layers are not sharded yet"):
        LLM(latent_path, dtype="float64", tensor_parallel_size=2)


def test_lora_is_refused(latent_path):
    with pytest.raises(ValueError, match=r"enable_lora is not supported for NemotronHForCausalLM yet"):
        LLM(latent_path, dtype="float64", enable_lora=True)


def test_relu2_activation():
    from moelink.kernels.moe import MoEActivation, reference_fused_moe

    up = torch.tensor([[-1.0, 0.5, 2.0]], dtype=torch.float64)
    assert torch.equal(MoEActivation("relu2")(torch.full_like(up, 9.0), up), torch.tensor([[0.0, 0.25, 4.0]],
                                                                                          dtype=torch.float64))
    # the fused reference: an expert's gate rows are never read
    g = torch.Generator().manual_seed(0)
    x, w_up, w_down = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((5, 8), (3, 4, 8), (3, 8, 4)))
    w13 = torch.cat([torch.randn(3, 4, 8, generator=g, dtype=torch.float64), w_up], dim=1)
    ids = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0]])
    wts = torch.rand(5, 2, generator=g, dtype=torch.float64)
    got = reference_fused_moe(x, w13, w_down, wts, ids, activation=MoEActivation("relu2"))
    want = sum(wts[:, k, None] * torch.stack([w_down[e] @ torch.relu(w_up[e] @ x[t]).square()
                                              for t, e in enumerate(ids[:, k].tolist())]) for k in range(2))
    torch.testing.assert_close(got, want)


def test_prompt_logprobs_equal_transformers(latent_path):
    """A 40-token prompt in two prefill chunks: its logprobs equal transformers' log-softmax (1e-5: transformers'
    chunked scan runs in float32)."""
    prompt = prompts(VOCAB, seed=5, n=2, lo=40, hi=40)[0]
    llm = LLM(latent_path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=24, num_kv_blocks=32,
              block_size=8)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(latent_path, dtype=torch.float64, experts_implementation="eager").eval()
    with torch.no_grad():
        want_LV = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, :-1], dim=-1)
    for p in range(1, len(prompt)):
        assert out.prompt_logprobs[p][prompt[p]].logprob == pytest.approx(want_LV[p - 1, prompt[p]].item(), abs=1e-5)


# -- greedy parity with transformers ------------------------------------------------------------------------------

def _prompts() -> list[list[int]]:
    return prompts(VOCAB, seed=61, n=12, lo=1, hi=150)


@pytest.mark.parametrize("which", ["latent", "nano"])
def test_greedy_parity_short(request, which):
    """Three prompts (5-40 tokens) under a 16-token budget: chunked prefills and decode steps of a batch; with the
    latent MoE (Nemotron 3 Super's) and without (Nano's)."""
    path = request.getfixturevalue(f"{which}_path")
    ps = prompts(VOCAB, seed=3, n=3, lo=5, hi=40)
    llm = LLM(path, dtype="float64", max_num_seqs=3, max_num_batched_tokens=16, num_kv_blocks=64, block_size=4)
    assert_same(engine_greedy(llm, ps, max_new=8), hf_greedy(path, ps, max_new=8), ps)
    assert_pool_free(llm)


@pytest.mark.slow  # transformers' generate beside the engine, in float64
def test_greedy_parity_chunked_batched(latent_path):
    check_chunked_batched(latent_path, _prompts())


@pytest.mark.slow
def test_greedy_parity_under_preemption(latent_path):
    check_under_preemption(latent_path, _prompts())


@pytest.mark.slow
def test_preemption_then_prefix_hits(latent_path):
    """Preempted sequences recompute their states; the same prompts again resume from state checkpoints."""
    check_preemption_then_prefix_hits(latent_path, _prompts())


def test_transformers_default_config_reads(tmp_path):
    """transformers' default NemotronHConfig (M E * -) reads: engine layers ME, *-."""
    import transformers

    cfg = getattr(transformers, "NemotronHConfig")()
    cfg.architectures = ["NemotronHForCausalLM"]
    got = ModelConfig.from_pretrained(config_dir(tmp_path, cfg))
    assert (got.num_layers, got.sparse_layers, got.state_layers) == (2, (0,), (0,))


def test_transformers5_names_parity(tmp_path):
    """Saved in transformers 5's own names (model.embeddings, model.norm_f, the experts fused as mixer.experts.up_proj
    [E, I, L] / down_proj [E, L, I]): read into the same layers, the same greedy tokens as transformers."""
    from safetensors import safe_open

    path = save_preset(tmp_path, NEMOTRON_H, fused=True)
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        assert {"model.embeddings.weight", "model.layers.1.mixer.experts.up_proj"} <= set(f.keys())
    ps = prompts(VOCAB, seed=11, n=3, lo=5, hi=40)
    llm = LLM(path, dtype="float64", max_num_seqs=3, max_num_batched_tokens=16, num_kv_blocks=64, block_size=4)
    assert_same(engine_greedy(llm, ps, max_new=6), hf_greedy(path, ps, max_new=6), ps)


@pytest.mark.slow
def test_tie_word_embeddings_unties_as_transformers(tmp_path):
    """transformers 5.24 never ties Nemotron-H's LM head (its _tied_weights_keys is empty: save_pretrained writes
    lm_head.weight beside the embeddings whatever tie_word_embeddings says); the engine reads it the same way."""
    path = save_preset(tmp_path, NEMOTRON_H_NANO, tie_word_embeddings=True)
    ps = prompts(VOCAB, seed=29, n=4, lo=2, hi=60)
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=8)
    assert not llm.engine.config.model.tie_word_embeddings
    assert_same(engine_greedy(llm, ps), hf_greedy(path, ps), ps)


def test_mtp_layers_are_left_unread(tmp_path, nano_path):
    """Nemotron 3 Super's MTP layers (num_nextn_predict_layers, tensors under mtp.*): the main model reads and runs
    as without them; speculative method "mtp" is refused naming why."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    path = tmp_path / "with_mtp"
    shutil.copytree(nano_path, path)
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(raw, num_nextn_predict_layers=1)))
    tensors = load_file(str(path / "model.safetensors"))
    tensors["mtp.layers.0.norm.weight"] = torch.ones(64, dtype=torch.float64)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    ps = prompts(VOCAB, seed=3, n=2, lo=5, hi=30)
    engine = dict(dtype="float64", max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=64, block_size=4)
    assert engine_greedy(LLM(str(path), **engine), ps, max_new=6) == engine_greedy(LLM(nano_path, **engine), ps,
                                                                                     max_new=6)
    with pytest.raises(ValueError, match=r"speculative_config.method='mtp' is not supported for NemotronHForCausalLM: "
                                         r"its MTP layers"):
        LLM(str(path), speculative_config={"method": "mtp", "num_speculative_tokens": 1}, **engine)


# NVIDIA-Nemotron-3-Nano-30B-A3B's config.json as published (transformers 4.55's spelling: hybrid_override_pattern).
_NANO_30B = {
    "architectures": ["NemotronHForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
    "chunk_size": 128, "conv_kernel": 4, "eos_token_id": 2, "expand": 2, "head_dim": 128, "hidden_dropout": 0.0,
    "hidden_size": 2688, "hybrid_override_pattern": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
    "initializer_range": 0.02, "intermediate_size": 1856, "layer_norm_epsilon": 1e-05, "mamba_head_dim": 64,
    "mamba_hidden_act": "silu", "mamba_num_heads": 64, "mamba_proj_bias": False, "mamba_ssm_cache_dtype": "float32",
    "max_position_embeddings": 262144, "mlp_bias": False, "mlp_hidden_act": "relu2", "model_type": "nemotron_h",
    "moe_intermediate_size": 1856, "moe_shared_expert_intermediate_size": 3712, "n_group": 1, "n_groups": 8,
    "n_routed_experts": 128, "n_shared_experts": 1, "norm_eps": 1e-05, "norm_topk_prob": True,
    "num_attention_heads": 32, "num_experts_per_tok": 6, "num_hidden_layers": 52, "num_key_value_heads": 2,
    "num_logits_to_keep": 1, "pad_token_id": 0, "partial_rotary_factor": 1.0, "rescale_prenorm_residual": True,
    "residual_in_fp32": False, "rope_theta": 10000, "routed_scaling_factor": 2.5, "sliding_window": None,
    "ssm_state_size": 128, "tie_word_embeddings": False, "time_step_floor": 0.0001, "time_step_max": 0.1,
    "time_step_min": 0.001, "topk_group": 1, "torch_dtype": "bfloat16", "transformers_version": "4.55.4",
    "use_bias": False, "use_cache": True, "use_conv_bias": True, "use_mamba_kernels": True, "vocab_size": 131072}


def test_published_nano_config_reads(tmp_path):
    """Nemotron 3 Nano 30B-A3B's published config: 52 single-block layers (23 M, 23 E, 6 *) read as 29 engine
    layers, every E after a mixer (23 routed engine layers, 23 Mamba2 ones), top-6 of 128 scaled by 2.5, Mamba2's
    intermediate mamba_num_heads x mamba_head_dim = 4096 (not expand x hidden)."""
    import json

    (tmp_path / "config.json").write_text(json.dumps(_NANO_30B))
    cfg = ModelConfig.from_pretrained(str(tmp_path))
    assert (cfg.num_layers, len(cfg.sparse_layers), len(cfg.state_layers)) == (29, 23, 23)
    m = cfg.state_layers[0]
    assert cfg.attention_for(m).intermediate == 4096 and cfg.attention_for(m).in_proj_dim == 4096 + 6144 + 64
    assert (cfg.num_experts, cfg.top_k, cfg.moe.router.routed_scaling_factor) == (128, 6, 2.5)
    assert cfg.moe.shared_expert_intermediate_size == 3712 and not cfg.tie_word_embeddings


def test_greedy_parity_attention_without_ffn(tmp_path):
    """Attention layers followed by a mixer (engine layers without an FFN, "*" then "M" / "*"), an "E" after a
    Mamba2 layer, a "-" after an attention layer, the model ending on a mixer: * M E * * - M."""
    kinds = ["full_attention", "linear_attention", "moe", "full_attention", "full_attention", "mlp",
             "linear_attention"]
    path = save_preset(tmp_path, NEMOTRON_H_NANO, layers_block_type=kinds)
    cfg = ModelConfig.from_pretrained(path)
    assert (cfg.num_layers, cfg.sparse_layers, cfg.state_layers) == (5, (1,), (1, 4))
    ps = prompts(VOCAB, seed=17, n=3, lo=5, hi=40)
    llm = LLM(path, dtype="float64", max_num_seqs=3, max_num_batched_tokens=16, num_kv_blocks=64, block_size=4)
    assert_same(engine_greedy(llm, ps, max_new=8), hf_greedy(path, ps, max_new=8), ps)
    assert_pool_free(llm)


@pytest.mark.slow
@pytest.mark.parametrize("p_right", [0.7, 0.0])
def test_speculative_decoding_replays_mamba_states(latent_path, p_right):
    """Drafts right with probability 0.7, and always wrong: the verifying sequences' Mamba2 states take only their
    accepted tokens, so greedy outputs equal transformers'."""
    import functools

    from moelink.benchmarks.spec_decode import OracleDrafter

    ps = _prompts()[:6]
    want = hf_greedy(latent_path, ps)
    spec = {"method": "ngram", "num_speculative_tokens": 3,
            "drafter_factory": functools.partial(OracleDrafter, {tuple(p): w for p, w in zip(ps, want)}, p_right,
                                                 vocab=VOCAB, seed=4)}
    llm = LLM(latent_path, speculative_config=spec, dtype="float64", max_num_seqs=4, max_num_batched_tokens=48,
              num_kv_blocks=48, block_size=8, num_state_checkpoints=8)
    assert_same(engine_greedy(llm, ps), want, ps)
    sd = llm.engine.stats().spec_decode
    assert sd is not None and sd.num_draft_tokens > 0
    assert (sd.num_accepted_tokens > 0) == (p_right > 0)
    assert_pool_free(llm)


_TRITON_RUN = """
import collections, json, sys
import moelink.kernels.triton_moe as tm
from moelink.engine import LLM, SamplingParams
calls = collections.Counter()
fn = tm.triton_fused_moe
def counted(*a, **k):
    calls.update([k["activation"].kind])
    return fn(*a, **k)
tm.triton_fused_moe = counted
import moelink.kernels.ops_moe as om
om.triton_fused_moe = counted
llm = LLM(sys.argv[1], kernels="triton", skip_warmup=True, **json.loads(sys.argv[3]))
ps = json.loads(sys.argv[2])
outs = llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
print("CALLS", json.dumps(calls))
print("TOKENS", json.dumps([o.outputs[0].token_ids for o in outs]))
"""


@pytest.mark.slow  # a fresh process, and the interpreter runs every kernel of each step
def test_triton_kernels_equal_reference_kernels_greedy(tmp_path):
    """Float32 on the Triton kernels (the fused MoE's relu2 epilogue, Mamba2's scan, the rest of TritonKernels; the
    interpreter on a CPU) gives the reference kernels' greedy tokens: chunked prompts, two sequences per step."""
    import json
    import os
    import sys

    from tests.helpers import zygote
    from tests.helpers.fast_interpreter import interpreter_env

    path = save_preset(tmp_path, NEMOTRON_H)
    ps = prompts(VOCAB, seed=7, n=2, lo=11, hi=21)
    engine = dict(dtype="float32", max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=24, block_size=8)
    env = interpreter_env() if not torch.cuda.is_available() else dict(os.environ)
    proc = zygote.run([sys.executable, "-c", _TRITON_RUN, path, json.dumps(ps), json.dumps(engine)], env=env,
                      capture_output=True, text=True, timeout=600, cwd=os.getcwd(), fork_code=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.split("TOKENS", 1)[1])
    calls = json.loads(proc.stdout.split("CALLS", 1)[1].split("TOKENS")[0])
    assert calls.get("relu2", 0) > 0, calls
    llm = LLM(path, kernels="reference", **engine)
    assert_same(got, engine_greedy(llm, ps, max_new=4), ps)
