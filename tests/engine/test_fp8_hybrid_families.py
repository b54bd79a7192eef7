"""FP8 block-scaled checkpoints of the 2026 hybrid MoE families (issue 57): GLM-5.3-Flash (NoPE MLA + KDA), Qwen3.8-Flash-Next
(gated DeltaNet + gated QSA attention) and Ling's hybrid (KDA + MLA with an output gate, in Ling's published names),
and Qwen3-Next / Qwen3.5-MoE (gated DeltaNet, fused or split, + gated attention), each family's tiny preset converted
by `moelink quantize-fp8` (16 x 16 blocks), loaded and served.

Oracle: transformers' own float64 model holding the dequantized weights (tests/helpers/fp8_checkpoints.
dequantized_copy), with the W8A8 activation rounding at the inputs of the linears and expert GEMMs the engine runs in
FP8 (fake_quant_hf_model); the linears whose load-time layout moves rows across FP8 blocks run float in moelink
(engine/rank/fp8_linears.py: GLM-5.3-Flash's NoPE MLA q_a / kv_a / q_b, gated attention's q/k/v stack, Qwen3-Next's
fused in_proj_qkvz, Ling's KDA full-rank output gate, which shares `attention.g_proj` with MLA's FP8 gate), so their
inputs are not rounded there. Prompts of 1-40 tokens together under a 16-token budget (chunked prefill, batches),
one engine per family. Each test also asserts which weights the engine holds FP8 (experts, the block-preserving
attention projections) and which float, so it cannot pass by dequantizing everything.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.tools.quantize_fp8 import quantize_checkpoint
from moelink.kernels.fp8 import FP8_DTYPE

from tests.helpers.fp8_checkpoints import BLOCK, dequantized_copy, fake_quant_hf_model
from tests.helpers.parity import prompts

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)

MAX_NEW = 5


def _glm(out: Path) -> str:
    from moelink.engine.models.glm5_next.tiny import write
    return write(out, seed=0, dtype=torch.float64, fmt="float", overrides={})


def _qwen(out: Path) -> str:
    from moelink.engine.models.qwen4_exp.tiny import save_tiny
    return save_tiny(out)


def _ling(out: Path) -> str:
    from moelink.engine.models.bailing_hybrid.tiny import write
    return write(out, seed=0, dtype=torch.float64, fmt="float", overrides={})


def _tiny(arch: str):
    def write(out: Path) -> str:
        from moelink.engine.tools.tiny_model import make_tiny_model
        return str(make_tiny_model(out, arch))
    return write


def _ling_published(name: str) -> str:
    """transformers' module name -> Ling's (`self_attn.o_proj` -> `attention.dense`: renamed as a tensor name)."""
    from moelink.engine.models.bailing_hybrid.kinds import published_name
    return published_name(name + ".weight")[: -len(".weight")]


def _layer(name: str) -> int:
    return int(re.search(r"layers\.(\d+)\.", name).group(1))


_GATED_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
# family -> (writer, transformers' linears the FP8 checkpoint holds but moelink runs float, transformers' name ->
# published, the engine's FP8 parameters, its float ones, the log-prob tolerance in nats: the test's docstring).
FAMILIES = {
    "glm5_next": (_glm, lambda n: n.endswith(("q_a_proj", "kv_a_proj_with_mqa", "q_b_proj")), lambda n: n,
                  ["layers.1.moe.w13_EFD", "layers.1.moe.w2_EDI", "layers.0.self_attn.qkv_proj.weight",
                   "layers.0.self_attn.out_proj.weight", "layers.1.self_attn.o_proj.weight",
                   "layers.1.self_attn.indexer.wq_b.weight", "layers.0.mlp.gate_up_proj.weight"],
                  ["layers.1.self_attn.fused_a_proj.weight", "layers.1.self_attn.q_b_proj.weight",
                   "layers.0.self_attn.f_a_proj.weight", "layers.1.self_attn.kv_b_proj.weight"], 0.15),
    "qwen4_exp": (_qwen, lambda n: ".self_attn." in n and n.endswith(("q_proj", "k_proj", "v_proj")), lambda n: n,
                  ["layers.0.moe.w13_EFD", "layers.0.linear_attn.in_proj_qkvz.weight",
                   "layers.0.linear_attn.out_proj.weight", "layers.2.self_attn.o_proj.weight",
                   "layers.0.mlp.shared.gate_up_proj.weight"],
                  ["layers.2.self_attn.qkv_proj.weight", "layers.0.linear_attn.in_proj_ba.weight"], 1e-5),
    "bailing_hybrid": (_ling, lambda n: n.endswith("self_attn.g_proj") and _layer(n) in (0, 2, 3), _ling_published,
                       ["layers.2.moe.w13_EFD", "layers.0.self_attn.qkv_proj.weight",
                        "layers.0.self_attn.out_proj.weight", "layers.1.self_attn.fused_a_proj.weight",
                        "layers.1.self_attn.q_b_proj.weight", "layers.1.self_attn.g_proj.weight",
                        "layers.1.self_attn.o_proj.weight", "layers.0.mlp.gate_up_proj.weight"],
                       ["layers.0.self_attn.g_proj.weight", "layers.0.self_attn.f_proj.weight"], 1e-5),
    # Qwen3-Next's fused in_proj_qkvz (rows regrouped at load) and both families' gated q/k/v run float.
    "qwen3_next": (_tiny("qwen3_next"), lambda n: n.endswith(_GATED_QKV + ("linear_attn.in_proj_qkvz",)), lambda n: n,
                   ["layers.0.moe.w13_EFD", "layers.0.linear_attn.out_proj.weight", "layers.2.self_attn.o_proj.weight",
                    "layers.0.mlp.shared.gate_up_proj.weight", "layers.4.mlp.gate_up_proj.weight"],
                   ["layers.0.linear_attn.in_proj_qkvz.weight", "layers.2.self_attn.qkv_proj.weight"], 0.05),
    "qwen3_5_moe": (_tiny("qwen3_5_moe"), lambda n: n.endswith(_GATED_QKV), lambda n: n,
                    ["layers.0.moe.w13_EFD", "layers.0.linear_attn.in_proj_qkvz.weight",
                     "layers.0.linear_attn.out_proj.weight", "layers.3.self_attn.o_proj.weight"],
                    ["layers.3.self_attn.qkv_proj.weight", "layers.0.linear_attn.in_proj_ba.weight"], 1e-5),
}


def _teacher_forced(model, prompt: list[int], out: list[int]) -> torch.Tensor:
    """transformers' log-probs [len(out), V] of each step of the engine's continuation `out`, one forward over
    prompt + out (causal, and without a cache: DeepSeek Sparse Attention's definition)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out[:-1]]), use_cache=False).logits[0, len(prompt) - 1:]
    return torch.log_softmax(logits, dim=-1)


@pytest.mark.slow  # over 1 s (a tiny model written, converted and served; transformers' oracle)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fp8_checkpoint_serves_transformers_greedy_tokens(tmp_path, family):
    """Every greedy step of the engine is transformers' argmax, and the engine's log-prob of its token equals
    transformers' (to the float32 log-probs the engine returns: 1e-5 nat), or, for GLM-5.3-Flash and Qwen3-Next, within
    the family's tolerance, a step a near-tie within it of the argmax, most steps (3 in 4) the exact argmax. Why those
    two apart: they run float32 steps in both implementations (GLM-5.3-Flash's hyper-connections' Sinkhorn, KDA's
    chunked rule and the pooled indexer; Qwen3-Next's gated norm and chunked rule), whose last-bit differences (1e-6
    relative: their float checkpoints' log-probs differ by that) flip an activation's e4m3 rounding downstream now
    and then, while each linear, expert and MLP alone equals transformers' to 1e-16. Measured on these prompts: 1e-5
    up to 11 tokens, up to 0.1 nat (GLM-5.3-Flash) and 0.02 (Qwen3-Next) at 24 and 40 tokens, where a misplaced block
    scale or a row in the wrong block is off by nats."""
    write, runs_float, published, fp8_params, float_params, tol = FAMILIES[family]
    src = write(tmp_path / "float")
    dst = str(quantize_checkpoint(src, tmp_path / "fp8", BLOCK))
    deq = dequantized_copy(dst, tmp_path / "dequantized")
    ps = prompts(400, seed=57, n=4, lo=1, hi=40)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=1)
    with LLM(dst, dtype="float64", max_num_seqs=4, max_num_batched_tokens=16, num_kv_blocks=64, block_size=8) as llm:
        held = dict(llm.engine.executor.worker.runner.model.named_parameters())
        assert [n for n in fp8_params if held[n].dtype != FP8_DTYPE] == []
        assert [n for n in float_params if held[n].dtype == FP8_DTYPE] == []
        outs = [o.outputs[0] for o in llm.generate(ps, params, use_tqdm=False)]
    assert len({t for o in outs for t in o.token_ids}) > 5, "degenerate model"
    model = fake_quant_hf_model(deq, BLOCK, published, runs_float)
    exact = 0
    for p, o in zip(ps, outs):
        lp_SV = _teacher_forced(model, p, list(o.token_ids))
        for step, tok in enumerate(o.token_ids):
            best = lp_SV[step].max().item()
            assert lp_SV[step, tok].item() >= best - tol, (family, p, step, tok, lp_SV[step].argmax().item())
            assert abs(o.logprobs[step][tok].logprob - lp_SV[step, tok].item()) < tol, (family, p, step)
            exact += int(lp_SV[step, tok].item() == best)
    assert exact >= 0.75 * len(ps) * MAX_NEW, exact


def test_quantize_fp8_writes_lings_published_names(tmp_path):
    """Ling's `attention.*` / `attention.dense` linears (MLA's and KDA's, the output gates included) get their scales
    beside them under the published names; KDA's other gates, the router and the norms stay float."""
    from safetensors import safe_open

    dst = quantize_checkpoint(_ling(tmp_path / "float"), tmp_path / "fp8", BLOCK)
    with safe_open(str(dst / "model.safetensors"), "pt") as st:
        names = set(st.keys())
        fp8 = {n for n in names if st.get_tensor(n).dtype == FP8_DTYPE}
    for n in ("model.layers.1.attention.q_a_proj.weight", "model.layers.1.attention.kv_a_proj_with_mqa.weight",
              "model.layers.1.attention.q_b_proj.weight", "model.layers.1.attention.kv_b_proj.weight",
              "model.layers.1.attention.g_proj.weight", "model.layers.1.attention.dense.weight",
              "model.layers.0.attention.q_proj.weight", "model.layers.0.attention.dense.weight"):
        assert n in fp8 and n.replace(".weight", ".weight_scale_inv") in names, n
    for n in ("model.layers.0.attention.f_proj.weight", "model.layers.0.attention.b_proj.weight",
              "model.layers.2.mlp.gate.weight", "model.layers.1.attention.q_a_layernorm.weight"):
        assert n not in fp8, n
    assert not any(".self_attn." in n for n in names)


@pytest.mark.slow  # over 1 s (two tiny models written, converted and loaded whole and as a TP rank)
def test_float_held_fp8_weights_load_sharded(tmp_path):
    """At TP 2 (loading only, one process; 8 x 8 blocks, so the tiny experts' and KDA's halves are whole blocks) a
    rank's float-held weights are its rows of the dequantized whole ones (GLM-5.3-Flash's NoPE q_b_proj by head, its
    whole q_a / kv_a stack; Ling's KDA output gate by head), and its KDA q/k/v and o_proj stay FP8."""
    from types import SimpleNamespace

    from moelink.engine.config.model import ModelConfig
    from moelink.engine.rank.loader import load_model
    from moelink.kernels.ops import ReferenceKernels

    def load(path, rank=None):
        cfg = ModelConfig.from_pretrained(path, "float64")
        tp = SimpleNamespace(rank=rank, size=2) if rank is not None else None
        return dict(load_model(cfg, ReferenceKernels(), torch.device("cpu"), tp=tp).named_parameters())

    glm = {"layers.1.self_attn.q_b_proj.weight": 0, "layers.1.self_attn.fused_a_proj.weight": None}
    for write, checks in ((_glm, glm), (_ling, {"layers.0.self_attn.g_proj.weight": 0})):
        path = str(quantize_checkpoint(write(tmp_path / write.__name__), tmp_path / f"{write.__name__}_fp8", (8, 8)))
        whole, rank1 = load(path), load(path, rank=1)
        for name, dim in checks.items():
            want = whole[name] if dim is None else whole[name].chunk(2, dim)[1]
            assert rank1[name].dtype == torch.float64 and torch.equal(rank1[name], want), name
        assert rank1["layers.0.self_attn.qkv_proj.weight"].dtype == rank1["layers.0.self_attn.out_proj.weight"].dtype \
            == FP8_DTYPE
