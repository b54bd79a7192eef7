"""DeepSeek-V4.1 (issue 81) against transformers' main-branch modeling code, whose greedy tokens for a tiny
checkpoint it wrote itself are recorded in tests/fixtures/deepseek_v41/ (make_fixtures.py made them; the locked
transformers has no V4.1, so the oracle ran in a scratch environment and the fixture is what the tests read): float64,
token for token, plain, chunked and batched, under preemption and from prefix-cache hits; its config read by moelink's
own config class, its roles per layer, and its refusals naming the field."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig
from tests.helpers.parity import assert_pool_free, assert_same, engine_greedy

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "deepseek_v41"
TINY = str(FIXTURES / "tiny")
REF = json.loads((FIXTURES / "reference.json").read_text())
PROMPTS = [c["prompt"] for c in REF["cases"]]
WANT = [c["greedy"] for c in REF["cases"]]
N = REF["new_tokens"]


def test_fixture_checkpoint_is_the_one_the_reference_was_made_from():
    import hashlib

    assert hashlib.sha256((FIXTURES / "tiny" / "model.safetensors").read_bytes()).hexdigest() == REF["weights_sha256"]


def test_config_is_read_by_moelinks_own_class_with_each_layers_role():
    cfg = ModelConfig.from_pretrained(TINY, "float64")
    roles = [(a.compress_rate, a.source, a.index, a.candidates, a.engram_context) for a in cfg.layer_attention]
    assert roles == [(0, -1, "none", "none", 0), (2, 1, "keys", "none", 2), (2, 1, "reuse", "none", 0),
                     (2, 1, "reuse", "none", 0), (1, 4, "keys", "publish", 0), (1, 4, "reuse", "none", 2),
                     (1, 4, "reindex", "use", 0), (1, 4, "reuse", "none", 0)]
    assert type(cfg).__name__ == "ModelConfig" and cfg.hf_config["model_type"] == "deepseek_v41_text"
    # only the KV sources hold pages: entries and index keys per compress_rate tokens
    assert [a.kv_values_per_token() for a in cfg.layer_attention] == [0, 48, 0, 0, 96, 0, 0, 0]


def test_the_released_composite_config_is_read_flat(tmp_path):
    raw = json.loads((FIXTURES / "tiny" / "config.json").read_text())
    text = {k: v for k, v in raw.items() if k not in ("architectures",)}
    composite = {"architectures": ["DeepseekV41ForCausalLM"], "model_type": "deepseek_v41", "text_config": text,
                 "vision_config": {"num_hidden_layers": 2}}
    (tmp_path / "config.json").write_text(json.dumps(composite))
    cfg = ModelConfig.from_pretrained(str(tmp_path), "float64")
    assert cfg.num_layers == 8 and cfg.hidden_size == 32 and cfg.hyper_connections.hc_mult == 3


@pytest.mark.parametrize("field,value,match", [
    ("gate_temp", 2.0, "gate_temp=2.0"),
    ("index_source_layer_ids", [4, 6], "index_source_layer_ids"),
    ("scoring_func", "softmax", "scoring_func='softmax'"),
    ("compress_ratios", [0, 2, 1, 2, 1, 1, 1, 1], r"compress_ratios\[2\]=1"),
])
def test_an_unsupported_field_is_refused_naming_it(tmp_path, field, value, match):
    shutil.copytree(TINY, tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    raw[field] = value
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(str(tmp_path / "m"), "float64")


def test_greedy_parity_one_at_a_time():
    llm = LLM(TINY, dtype="float64", max_num_seqs=1, num_kv_blocks=64, block_size=8)
    assert_same(engine_greedy(llm, PROMPTS, N), WANT, PROMPTS)
    assert_pool_free(llm)


def test_greedy_parity_chunked_batched():
    """Seven prompts at once in chunks of 13 tokens: chunks start mid-group (rate 2) and mid-window."""
    llm = LLM(TINY, dtype="float64", max_num_seqs=7, max_num_batched_tokens=13, num_kv_blocks=96, block_size=8)
    assert_same(engine_greedy(llm, PROMPTS, N), WANT, PROMPTS)
    assert_pool_free(llm)


@pytest.mark.slow
def test_greedy_parity_under_preemption_then_prefix_hits():
    """A pool small enough to preempt, then the same prompts again from state checkpoints at block boundaries and
    the KV sources' pages before them (hits asserted)."""
    llm = LLM(TINY, dtype="float64", max_num_seqs=4, max_num_batched_tokens=32, num_kv_blocks=20, block_size=8,
              num_state_checkpoints=16)
    assert_same(engine_greedy(llm, PROMPTS, N), WANT, PROMPTS)
    assert llm.engine.stats().num_preemptions_total > 0
    hits = llm.engine.stats().prefix_cache_hits
    assert_same(engine_greedy(llm, PROMPTS, N), WANT, PROMPTS)
    assert llm.engine.stats().prefix_cache_hits > hits
    assert_pool_free(llm)


def test_fake_quantization_points_round_as_published():
    """FP8 with a power-of-two scale per 32, FP4 with an e4m3 scale per 16 (ties to the even e2m1 code)."""
    from moelink.engine.models.deepseek_v41.fake_quant import fp4_block, fp8_block, pow2_ceil

    assert pow2_ceil(torch.tensor([1.0, 1.5, 0.3, 2.0**-126])).tolist() == [1.0, 2.0, 0.5, 2.0**-126]
    ties = torch.tensor([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 2], dtype=torch.float64)
    # amax 6: e4m3 scale 1, so the values are their own codes
    assert fp4_block(ties, 16, e4m3_scales=True).tolist() == [[0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0] * 2]
    x = torch.linspace(-3, 3, 64, dtype=torch.float64)[None]
    y = fp8_block(x, 32)
    # amax 3: scale 2^-7, so e4m3 steps of 0.25 near 3 (half a step at most off)
    assert y.dtype == torch.float64 and not torch.equal(x, y) and (x - y).abs().max() <= 0.125
    assert torch.equal(fp8_block(x[:, :30], 32), x[:, :30])  # not a whole block: unquantized


def test_make_tiny_model_writes_what_transformers_writes(tmp_path):
    """`moelink make-tiny-model --arch deepseek_v41`: the tensors (names, shapes) of the checkpoint transformers'
    main-branch classes wrote for the same config; it loads and generates."""
    from safetensors import safe_open

    from moelink.engine.tools.tiny_model import make_tiny_model

    path = make_tiny_model(tmp_path / "v41", "deepseek_v41")
    shapes = {}
    for d in (path, FIXTURES / "tiny"):
        with safe_open(str(Path(d) / "model.safetensors"), framework="pt") as st:
            shapes[str(d)] = {n: tuple(st.get_slice(n).get_shape()) for n in st.keys()}
    assert shapes[str(path)] == shapes[str(FIXTURES / "tiny")]
    llm = LLM(str(path), dtype="float32", max_num_seqs=2, num_kv_blocks=32, block_size=8)
    assert len(engine_greedy(llm, PROMPTS[:2], 4)[1]) == 4


def test_load_format_dummy_from_config_json_alone(tmp_path):
    """--load-format dummy: the tensors DummyCheckpoint makes are the real checkpoint's, and an engine runs from
    config.json alone (no tokenizer: the Engram hashes ids by remainder, said in the log)."""
    from safetensors import safe_open

    from moelink.engine.rank.dummy_weights import DummyCheckpoint

    with safe_open(str(FIXTURES / "tiny" / "model.safetensors"), framework="pt") as st:
        real = {n: tuple(st.get_slice(n).get_shape()) for n in st.keys()}
    dummy = DummyCheckpoint.for_model(ModelConfig.from_pretrained(TINY, "float32"), torch.device("cpu")).specs
    assert set(dummy) <= set(real)  # the float tables' per-row scales and the gates' image bias are not read
    assert set(real) - set(dummy) == {n for n in real if n.endswith(("engram.embed.scale", "gate.bias_vl"))}
    assert all(dummy[n].shape == real[n] for n in dummy)
    shutil.copy(FIXTURES / "tiny" / "config.json", tmp_path / "config.json")
    llm = LLM(str(tmp_path), dtype="float32", load_format="dummy", max_num_seqs=2, num_kv_blocks=32, block_size=8)
    from moelink.engine import SamplingParams

    out = llm.generate(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=4, detokenize=False, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_what_v41_does_not_run_yet_is_turned_off():
    """Decode CUDA graphs (its attention reads host lengths) are turned off. (Speculative decoding runs:
    tests/engine/test_deepseek_v41_spec.py.)"""
    from moelink.engine.rank.graph_policy import graph_sizes_to_capture
    from moelink.kernels.ops import ReferenceKernels

    cfg = ModelConfig.from_pretrained(TINY, "float32")

    class Triton(ReferenceKernels):
        name = "triton"

    assert graph_sizes_to_capture((1, 2), Triton(), None, False, None, torch.device("cuda"), False, cfg=cfg) == ()


def test_the_published_shape_is_read_at_full_size(tmp_path):
    """DeepSeek-V4.1-Flash's shape (the defaults of the config class: 40 layers, sources 2 / 8 / 14 / 20, index
    sources every 4th of the rate-1 layers, the candidate source 20, Engram at 1 and 14), from a composite config.json
    as released: only the four KV sources hold pages (entry 512 + index key 128 per rate tokens)."""
    from moelink.engine.config import kv_sizing

    text = {"engram_layer_ids": [1, 14], "engram_num_embeddings": [384006168, 384016682],
            "rope_scaling": {"rope_type": "yarn", "factor": 16, "beta_fast": 32, "beta_slow": 1,
                             "original_max_position_embeddings": 65536}, "num_nextn_predict_layers": 3}
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["DeepseekV41ForCausalLM"],
                                                      "model_type": "deepseek_v41", "text_config": text,
                                                      "vision_config": {}}))
    cfg = ModelConfig.from_pretrained(str(tmp_path), "bfloat16", max_model_len=65536)
    layers = cfg.layer_attention
    assert [a.layer_idx for a in layers if a.is_source] == [2, 8, 14, 20]
    assert [a.layer_idx for a in layers if a.index == "reindex"] == [24, 28, 32, 36]
    assert [a.layer_idx for a in layers if a.candidates == "use"] == [24, 28, 32, 36]
    assert [a.layer_idx for a in layers if a.engram_context] == [1, 14] and layers[1].engram_context == 3
    assert layers[20].candidates == "publish" and layers[20].compress_rate == 1
    # bf16 bytes of paged KV per token of context: three rate-2 sources (640 / 2 values) and one rate-1 source (640)
    assert kv_sizing.kv_cache_bytes_per_token(cfg) == (3 * 320 + 640) * 2


def test_what_a_dspark_drafter_reads():
    """The released shape's DSpark facts (three draft layers of sliding attention, blocks of 5, conditioned on layers
    37-39), and the streams the decoder keeps for a drafter (after n layers: [T, hc_mult * D])."""
    from moelink.engine.models.deepseek_v41.reader import draft_attention, read_config, read_dspark

    hf = read_config({"model_type": "deepseek_v41", "text_config": {}}, False, "").to_dict()
    d = read_dspark(hf)
    assert d is not None and (d.num_layers, d.block_size, d.target_layers, d.top_k) == (3, 5, (37, 38, 39), 3)
    cfg = ModelConfig.from_pretrained(TINY, "float64")
    assert read_dspark(cfg.hf_config) is None  # the tiny checkpoint has none
    a = draft_attention(cfg.layer_attention, cfg.num_layers)
    assert a.compress_rate == 0 and a.rope.layer_type == "main" and a.cache_shapes(4, 8) == ()


@pytest.mark.parametrize("expert_dtype", ["fp8", "fp4"])
def test_published_format_equals_transformers_on_its_dequantized_twin(tmp_path, expert_dtype):
    """DeepSeek's FP8 files (tests/helpers/dsv41_published.py: DeepSeek's names, the composite config.json with
    quantization_config at the top, FP8 linears and experts in ue8m0 blocks of 16 x 16, FP8 Engram tables with a scale
    per row per 32; the routed experts FP8, or FP4 as V4.1-Flash ships them): every FP8 weight dequantized as it loads
    (the shared expert held FP8 and run W8A8 by V4's MoE block), the FP4 experts held packed (W4A16), tokens equal transformers' main-branch V4.1 on the dequantized twin with that W8A8 rounding
    (reference_published.json), and differ from the float model's."""
    from tests.helpers.dsv41_published import write_published

    ref = json.loads((FIXTURES / "reference_published.json").read_text())
    cases = ref["expert_dtype"][expert_dtype]
    ps, want = [c["prompt"] for c in cases], [c["greedy"] for c in cases]
    write_published(FIXTURES / "tiny", tmp_path / "published", tmp_path / "twin", expert_dtype=expert_dtype)
    cfg = ModelConfig.from_pretrained(str(tmp_path / "published"), "float64")
    assert cfg.quantization is not None and cfg.quantization.method == "fp8"
    llm = LLM(str(tmp_path / "published"), dtype="float64", max_num_seqs=4, max_num_batched_tokens=16,
              num_kv_blocks=64, block_size=8)
    got = engine_greedy(llm, ps, N)
    assert_same(got, want, ps)
    assert got != WANT[:len(ps)]
    assert_pool_free(llm)


@pytest.mark.parametrize("expert_dtype,match", [("int4", "expert_dtype='int4'")])
def test_a_published_format_not_read_yet_is_refused_naming_it(tmp_path, expert_dtype, match):
    from tests.helpers.dsv41_published import write_published

    write_published(FIXTURES / "tiny", tmp_path / "published", tmp_path / "twin")
    raw = json.loads((tmp_path / "published" / "config.json").read_text())
    raw["quantization_config"]["expert_dtype"] = expert_dtype
    (tmp_path / "published" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(str(tmp_path / "published"), "float64")


def test_load_format_dummy_from_a_published_config(tmp_path):
    """--load-format dummy from the published composite config.json alone (FP8 block scales, FP4 experts): the FP8
    tensors made dequantize as real ones do, and tokens come out."""
    from tests.helpers.dsv41_published import write_published

    write_published(FIXTURES / "tiny", tmp_path / "published", tmp_path / "twin", expert_dtype="fp4")
    only = tmp_path / "config_only"
    only.mkdir()
    shutil.copy(tmp_path / "published" / "config.json", only / "config.json")
    llm = LLM(str(only), dtype="float32", load_format="dummy", max_num_seqs=2, num_kv_blocks=32, block_size=8)
    from moelink.engine import SamplingParams

    out = llm.generate(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=4, detokenize=False, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
