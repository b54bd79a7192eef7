"""gpt-oss with MXFP4 experts, as OpenAI publishes it: a tiny float gpt-oss saved by transformers, turned into the
published layout by `moelink quantize-mxfp4`, runs token for token as transformers runs the same file (its MXFP4
loader dequantizes on CPU: `Mxfp4Config(dequantize=True)`), in float64, with prompts past the 6-token sliding
window. Also: the config (experts only, other architectures refused), the loaded bytes (gate/up rows of blocks,
scales and bias de-interleaved), a rank's experts under EP, the weight-memory report, and the Triton MXFP4 MoE
in an engine run under the interpreter.

The tiny model's hidden (32) and expert intermediate (32) sizes are multiples of MXFP4's 32-value group.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from moelink.comm.backends import make_all_to_all
from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig
from moelink.engine.rank.loader import load_model
from moelink.kernels.mxfp4 import deinterleave_gate_up
from moelink.kernels.ops import ReferenceKernels
from moelink.moe.layer import ExpertParallel
from moelink.moe.placement import ExpertPlacement

from tests.helpers.gpt_oss_checkpoints import VOCAB, WINDOW, save_gpt_oss
from tests.helpers.parity import assert_pool_free, assert_same, engine_greedy, prompts
from tests.helpers.fast_interpreter import interpreter_env
from tests.helpers import zygote

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)

CPU = torch.device("cpu")
D, I, E, L = 32, 32, 5, 3  # hidden, expert intermediate, experts, layers (gpt_oss_config's, I raised to 32)
_MXFP4_PARAMS = ("w13_blocks_EFSQ", "w13_scales_EFS", "w2_blocks_EDSQ", "w2_scales_EDS", "b13_EF", "b2_ED")


@pytest.fixture(scope="module")
def mxfp4_path(tmp_path_factory):
    from moelink.engine.tools.mxfp4_checkpoint import quantize_mxfp4_checkpoint

    root = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    src = save_gpt_oss(root / "float", intermediate_size=I)
    return str(quantize_mxfp4_checkpoint(src, root / "mxfp4"))


def _checkpoint(path) -> dict[str, torch.Tensor]:
    from pathlib import Path

    from safetensors.torch import load_file

    out = {}
    for f in Path(path).glob("*.safetensors"):
        out.update(load_file(str(f)))
    return out


_HF: dict = {}


def _hf_model(path):
    """transformers' own GptOssForCausalLM of the MXFP4 file, dequantized (exactly, in float64) on CPU."""
    import transformers

    if path not in _HF:
        _HF.clear()
        _HF[path] = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float64, experts_implementation="eager",
            quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()
    return _HF[path]


def _hf_greedy(path, ps, max_new):
    model, outs = _hf_model(path), []
    with torch.no_grad():
        for p in ps:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                                 min_new_tokens=max_new, eos_token_id=None, pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
    return outs


def test_config_reads_mxfp4_experts_only(mxfp4_path):
    q = ModelConfig.from_pretrained(mxfp4_path).quantization
    assert q.method == "mxfp4" and "model.layers.*.self_attn" in q.modules_to_not_convert
    assert all(q.is_quantized(f"model.layers.{i}.mlp.experts") for i in range(L))
    # everything but the experts stays float, whatever the list says (linears never take MXFP4)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.router", "lm_head", "model.embed_tokens"):
        assert not q.is_quantized(name)
    from moelink.engine.config.quantization import Mxfp4Config

    skip = Mxfp4Config(("model.layers.*.mlp.experts",))
    assert not skip.is_quantized("model.layers.7.mlp.experts")
    assert Mxfp4Config(("layers.1",)).is_quantized("model.layers.11.mlp.experts")  # whole components only
    with pytest.raises(ValueError, match=r"quantization=.fp8. is invalid for this checkpoint: it is already "
                                         r"quantized with 'mxfp4'"):
        ModelConfig.from_pretrained(mxfp4_path, quantization="fp8")


def test_mxfp4_is_refused_for_other_architectures(tmp_path):
    import transformers

    cfg = transformers.Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      num_experts=4, num_experts_per_tok=2)
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    cfg.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"^config.json quantization_config.quant_method='mxfp4' is not supported for "
                                         r"Qwen3MoeForCausalLM: MXFP4 experts run for GptOssForCausalLM, KimiK3ForCausalLM, KimiK3LinearForCausalLM only"):
        ModelConfig.from_pretrained(str(tmp_path))


def test_loaded_experts_and_moe_block_match_transformers(mxfp4_path):
    """The loaded bytes are the checkpoint's with gate/up rows de-interleaved (blocks, scales and bias alike),
    and each loaded MoE block equals transformers' GptOssMLP of the dequantized file in float64."""
    cfg = ModelConfig.from_pretrained(mxfp4_path, dtype="float64")
    ours = load_model(cfg, ReferenceKernels(), CPU)
    ck = _checkpoint(mxfp4_path)
    hf = _hf_model(mxfp4_path)
    x = torch.randn(13, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 3
    for i in range(L):
        moe, p = ours.layers[i].moe, f"model.layers.{i}.mlp.experts."
        assert moe.expert_format.name == "mxfp4" and not hasattr(moe, "w13_EFD")
        assert moe.w13_blocks_EFSQ.shape == (E, 2 * I, D // 32, 16) and moe.w13_blocks_EFSQ.dtype == torch.uint8
        assert torch.equal(moe.w13_blocks_EFSQ, deinterleave_gate_up(ck[p + "gate_up_proj_blocks"]))
        assert torch.equal(moe.w13_scales_EFS, deinterleave_gate_up(ck[p + "gate_up_proj_scales"]))
        assert torch.equal(moe.b13_EF, deinterleave_gate_up(ck[p + "gate_up_proj_bias"]))
        assert torch.equal(moe.w2_blocks_EDSQ, ck[p + "down_proj_blocks"])
        assert torch.equal(moe.w2_scales_EDS, ck[p + "down_proj_scales"])
        assert torch.equal(moe.b2_ED, ck[p + "down_proj_bias"])
        want, _ = hf.model.layers[i].mlp(x[None])
        torch.testing.assert_close(ours.layers[i].mlp(x), want[0], rtol=1e-12, atol=1e-12)


def test_greedy_parity_past_the_window(mxfp4_path):
    """Prompts of 1-20 tokens (window 6) in 8-token chunks over 4-token blocks, with decodes: the engine's
    greedy tokens equal transformers' on the dequantized weights, token for token."""
    ps = prompts(VOCAB, seed=7, n=4, lo=1, hi=20)
    assert max(map(len, ps)) > 2 * WINDOW
    llm = LLM(mxfp4_path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=8, num_kv_blocks=64, block_size=4)
    got = engine_greedy(llm, ps, max_new=6)
    assert len({t for out in got for t in out}) > 8, "degenerate model: greedy outputs barely vary"
    assert_same(got, _hf_greedy(mxfp4_path, ps, max_new=6), ps)
    assert_pool_free(llm)


def _ep(placement: ExpertPlacement, rank: int) -> ExpertParallel:
    return ExpertParallel(rank, placement.ep_size, placement, make_all_to_all("none", None, 0, 1, "cpu"),
                          placement.to_tensors("cpu"))


@pytest.mark.parametrize("replicas", [[0, 4], []])
def test_rank_reads_its_experts_blocks_scales_and_biases(mxfp4_path, replicas):
    """Under EP each rank holds exactly the single-rank rows of its experts (redundant replicas included), in
    its local slot order; a rank whose experts are contiguous reads only their rows from the file (its plan's
    checkpoint index starts with a slice, the loader reads that slice alone)."""
    cfg = ModelConfig.from_pretrained(mxfp4_path, dtype="float32")
    whole = load_model(cfg, ReferenceKernels(), CPU)
    # replicas [0, 4]: rank 0 holds 0, 1, 2, 4 and rank 1 holds 3, 4, 0 (neither contiguous);
    # none: rank 0 holds 0, 1, 2 and rank 1 holds 3, 4 (contiguous: sliced reads).
    placement = ExpertPlacement(num_experts=E, ep_size=2, replicas=replicas)
    seen = set()
    for rank in range(2):
        local = placement.experts_on_rank(rank)
        seen.update(local)
        model = load_model(cfg, ReferenceKernels(), CPU, _ep(placement, rank))
        plan = model.weight_plan(None)
        assert not any(".experts.0." in n or n.endswith("gate_up_proj") for n in plan)
        contiguous = local == list(range(local[0], local[0] + len(local)))
        for n in ("gate_up_proj_blocks", "down_proj_scales", "gate_up_proj_bias"):
            src_idx = plan[f"model.layers.1.mlp.experts.{n}"][2]
            assert isinstance(src_idx[0], slice) == contiguous, (rank, n, src_idx)
        for i in range(L):
            mine, full = model.layers[i].moe, whole.layers[i].moe
            assert mine.w13_blocks_EFSQ.shape[0] == len(local)
            for name in _MXFP4_PARAMS:
                assert torch.equal(getattr(mine, name), getattr(full, name)[local]), (rank, i, name)
    assert seen == set(range(E))
    # an EP rank that receives no tokens still runs its experts (forward_moe_only's empty batch): 0 rows in, 0 out
    moe = whole.layers[0].moe
    y = moe.expert_format.run(moe.kernels, moe, torch.zeros(0, D), torch.zeros(0, 2),
                              torch.zeros(0, 2, dtype=torch.long))
    assert y.shape == (0, D)


def test_weight_memory_reports_mxfp4(mxfp4_path):
    """The start-up report counts the experts as mxfp4 (half a byte a weight + one scale byte per 32) and the
    rest as float; the total is what the tensors really take."""
    from moelink.engine.rank.weight_memory import describe_memory, weight_bytes_by_format
    from moelink.planner.weight_bytes import weight_bytes

    model = load_model(ModelConfig.from_pretrained(mxfp4_path, dtype="bfloat16"), ReferenceKernels(), CPU)
    by_format = weight_bytes_by_format(model)
    real = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    assert sum(by_format.values()) == real and set(by_format) == {"mxfp4", "float"}
    per_expert = (2 * I * D // 2 + 2 * I * D // 32) + (D * I // 2 + D * I // 32)  # w13 [2I, D] + w2 [D, I]
    assert by_format["mxfp4"] == L * E * per_expert
    assert weight_bytes("mxfp4", 2880, 2880) == 2880 * 1440 + 2880 * 90  # gpt-oss-20b's down_proj, per expert
    assert "mxfp4 " in describe_memory(by_format, 10, 16, 1 << 20)


_TRITON_RUN = """
import json, sys
import moelink.kernels.triton_moe_mxfp4 as mx
from moelink.engine import LLM, SamplingParams

calls, kernel = [], mx.triton_fused_moe_mxfp4


def counted(*a, pair_order=False, **k):  # TritonKernels reads it; its pair_order keyword as the kernel's
    calls.append((a[0].dtype, pair_order))
    return kernel(*a, pair_order=pair_order, **k)


mx.triton_fused_moe_mxfp4 = counted
llm = LLM(sys.argv[1], dtype="float32", kernels="triton", max_num_seqs=2, max_num_batched_tokens=16,
          num_kv_blocks=16, block_size=4, skip_warmup=True)  # warm-up: tests/kernels/test_triton_warmup.py
ps = json.loads(sys.argv[2])
outs = llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), use_tqdm=False)
print("CALLS", len(calls), set(str(d) for d, _ in calls), "pairs" if all(p for _, p in calls) else "published")
print("TOKENS", json.dumps([o.outputs[0].token_ids for o in outs]))
"""


@pytest.mark.slow  # a fresh process, and the interpreter runs every kernel of each step: 15-20 s on CPU
def test_triton_engine_run_matches_reference(mxfp4_path):
    """One short engine run with kernels="triton" (the MXFP4 Triton MoE, in the interpreter here: a fresh
    process, since Triton reads TRITON_INTERPRET when a kernel is defined) gives the reference kernels' greedy
    tokens in float32; its blocks are held in the decode's pair order (permuted after load, moe/layer.py) and every
    call reads them so: load -> pair order -> kernels, the reference's tokens on the published layout."""
    ps = [prompts(VOCAB, seed=11, n=2, lo=3, hi=9)[1]]
    env = interpreter_env() if not torch.cuda.is_available() else dict(os.environ)
    # Forked by the test zygote (torch, transformers imported once), TRITON_INTERPRET and the fast interpreter's
    # sitecustomize taking effect as at an exec'd start (tests/helpers/zygote.py).
    proc = zygote.run([sys.executable, "-c", _TRITON_RUN, mxfp4_path, json.dumps(ps)], env=env,
                      capture_output=True, text=True, timeout=600, cwd=os.getcwd(), fork_code=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.split("TOKENS", 1)[1])
    calls = proc.stdout.split("CALLS", 1)[1].split("TOKENS")[0]
    assert int(calls.split()[0]) >= 3 * L and "torch.float32" in calls, calls  # every layer, every step, Triton
    assert calls.split()[-1] == "pairs", calls
    ref = LLM(mxfp4_path, dtype="float32", kernels="reference", max_num_seqs=2, max_num_batched_tokens=16,
              num_kv_blocks=16, block_size=4)
    assert_same(got, engine_greedy(ref, ps, max_new=3), ps)


def test_mxfp4_experts_need_whole_scale_groups():
    from moelink.moe.expert_weights import Mxfp4Experts

    with pytest.raises(ValueError, match=r"^config.json intermediate_size=24 is not supported with MXFP4 experts: it "
                                         r"must be a multiple of 32"):
        Mxfp4Experts().create(torch.nn.Module(), 4, 64, 24, torch.float32, CPU)
    with pytest.raises(ValueError, match=r"hidden_size=48 .*multiple of 32"):
        Mxfp4Experts().create(torch.nn.Module(), 4, 48, 32, torch.float32, CPU)


def test_bf16_checkpoint_as_published(tmp_path):
    """Biases and the float weights in bf16, as OpenAI publishes gpt-oss: the model runs in bf16 by default
    (the MXFP4 weights dequantize exactly to bf16), and in float64 it still matches transformers on the file."""
    from moelink.engine.tools.mxfp4_checkpoint import quantize_mxfp4_checkpoint

    path = str(quantize_mxfp4_checkpoint(save_gpt_oss(tmp_path / "float", torch.bfloat16, intermediate_size=I),
                                         tmp_path / "mxfp4"))
    cfg = ModelConfig.from_pretrained(path)
    assert cfg.dtype == torch.bfloat16 and cfg.quantization.method == "mxfp4"
    ps = [prompts(VOCAB, seed=5, n=2, lo=2, hi=14)[1]]
    llm = LLM(path, max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=16, block_size=4)
    assert all(len(o) == 4 and all(0 <= t < VOCAB for t in o) for o in engine_greedy(llm, ps, max_new=4))
    llm64 = LLM(path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=16, block_size=4)
    assert_same(engine_greedy(llm64, ps, max_new=4), _hf_greedy(path, ps, max_new=4), ps)
