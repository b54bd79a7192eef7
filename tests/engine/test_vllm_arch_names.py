"""Other registry names of models moelink serves (issue 96: vLLM 0.33's and SGLang's names; ArchSpec's `alias_of`):
each one's checkpoint, written as that name publishes it by the family's `make-tiny-model --arch` entry (config.json's
`architectures` and model_type, a text model alone, q/k/v fused), loads and gives, token for token in float64, what
the model's own oracle gives on the same weights: transformers' `generate` on the family's canonical checkpoint, or,
for Kimi K3 (no transformers model), the float64 reference of tests/fixtures/kimi_k3/.

- ExaoneMoEForCausalLM: vLLM's spelling of ExaoneMoeForCausalLM (the same files).
- MiniMaxM3SparseForCausalLM: MiniMax-M3's text model alone (the release's published names under model.).
- MiMoV2ForCausalLM: MiMo-V2-Flash with each layer's q/k/v fused (self_attn.qkv_proj, split at load by the layer's
  own kv heads: the sliding layers have twice the full ones').
- BailingMoeV3ForCausalLM: Ling 3.0 = the Ling hybrid, its model_type (bailing_moe_v3) unknown to transformers.
- KimiK3LinearForCausalLM: Kimi K3's text model alone (SGLang's name)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moelink.engine import LLM
from moelink.engine.config.architectures import REGISTRY
from moelink.engine.config.model import ModelConfig
from moelink.engine.tools import tiny_archs

from tests.helpers.parity import assert_pool_free, assert_same, engine_greedy, hf_greedy, prompts

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)

# alias --arch -> (the family's canonical --arch, the registry names)
ALIASES = {
    "exaone_moe_vllm": ("exaone_moe", "ExaoneMoEForCausalLM", "ExaoneMoeForCausalLM"),
    "minimax_m3_text": ("minimax_m3", "MiniMaxM3SparseForCausalLM", "MiniMaxM3VLForCausalLM"),
    "mimo_v2": ("mimo_v2_flash", "MiMoV2ForCausalLM", "MiMoV2FlashForCausalLM"),
    "bailing_moe_v3": ("bailing_hybrid", "BailingMoeV3ForCausalLM", "BailingHybridForCausalLM"),
    "kimi_k3_text": ("kimi_k3", "KimiK3LinearForCausalLM", "KimiK3ForCausalLM"),
}
ENGINE_KW = dict(max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=160, block_size=8)


def _write(tmp_path: Path, arch: str) -> str:
    out = tmp_path / arch
    tiny_archs.ARCHS[arch].write(out, seed=0, dtype=torch.float64, fmt="float", overrides={})
    return str(out)


def _tensor_names(path: str) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for f in Path(path).glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            names |= set(st.keys())
    return names


def test_each_name_is_its_models():
    """An alias builds its model's blocks (MiMo-V2's checkpoint kind apart), is read by the same config class and
    reader, and has a make-tiny-model entry of its own."""
    from moelink.engine.config.hf_readers import READERS

    for arch, (_, name, canonical) in ALIASES.items():
        a, c = REGISTRY[name], REGISTRY[canonical]
        assert a.alias_of == canonical and not c.alias_of and a.model_type == c.model_type, name
        assert READERS[name] is READERS[canonical], name
        same = a.spec if name != "MiMoV2ForCausalLM" else type(a.spec)(**{**vars(a.spec), "checkpoint": "hf"})
        assert same == c.spec, name
        assert (a.mtp_layers, a.mtp_layout, a.hidden_acts, a.mxfp4_experts) == (
            c.mtp_layers, c.mtp_layout, c.hidden_acts, c.mxfp4_experts), name
        assert tiny_archs.ARCHS[arch].architecture == name
    assert {n for n, a in REGISTRY.items() if a.alias_of} >= {v[1] for v in ALIASES.values()}


@pytest.mark.parametrize("arch", sorted(ALIASES))
def test_the_alias_checkpoint_reads_as_its_models(tmp_path, arch):
    """The config read under the alias is the canonical checkpoint's, field for field (but the name)."""
    canonical, name, _ = ALIASES[arch]
    got = ModelConfig.from_pretrained(_write(tmp_path, arch))
    want = ModelConfig.from_pretrained(_write(tmp_path, canonical))
    assert got.architecture == name
    for field in ("attention", "layer_attention", "moe", "sparse_layers", "num_experts", "hidden_size",
                  "num_layers", "vocab_size", "tie_word_embeddings"):
        assert getattr(got, field, None) == getattr(want, field, None), (arch, field)


def test_mimo_v2_checkpoint_holds_fused_qkv(tmp_path):
    names = _tensor_names(_write(tmp_path, "mimo_v2"))
    assert "model.layers.1.self_attn.qkv_proj.weight" in names and "model.layers.1.self_attn.qkv_proj.bias" in names
    assert not any(".q_proj." in n or ".k_proj." in n or ".v_proj." in n for n in names)


def test_mimo_v2_fused_qkv_of_wrong_size_is_refused_naming_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _write(tmp_path, "mimo_v2")
    f = Path(path) / "model.safetensors"
    t = load_file(str(f))
    t["model.layers.1.self_attn.qkv_proj.weight"] = t["model.layers.1.self_attn.qkv_proj.weight"][:-1]
    save_file(t, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.self_attn\.qkv_proj\.weight' has \d+ rows, expected"):
        LLM(path, dtype="float64", **ENGINE_KW)


# -- token for token -------------------------------------------------------------------------------------------

@pytest.mark.slow  # the engine and transformers' generate in float64
@pytest.mark.parametrize("arch", ["exaone_moe_vllm", "minimax_m3_text", "mimo_v2", "bailing_moe_v3"])
def test_greedy_equals_transformers_on_the_canonical_checkpoint(tmp_path, arch):
    """1-100-token prompts together under a 24-token budget (chunked prefills across the 6-token windows and the
    sparse blocks), the alias's checkpoint served, transformers' model run on the family's own checkpoint of the
    same weights."""
    canonical = ALIASES[arch][0]
    ps = prompts(400, seed=len(arch), n=6, lo=1, hi=100)
    with LLM(_write(tmp_path, arch), dtype="float64", **ENGINE_KW) as llm:
        got = engine_greedy(llm, ps, 6)
        assert_pool_free(llm)
    assert_same(got, hf_greedy(_write(tmp_path, canonical), ps, 6), ps)
    assert len({t for g in got for t in g}) > 3, "degenerate model"


@pytest.mark.slow  # the engine in float64 on the reference's prompts
def test_kimi_k3_text_model_alone_equals_the_reference(tmp_path):
    """No transformers model: the float64 reference of tests/fixtures/kimi_k3/ (made on the same weights)."""
    reference = json.loads((Path(__file__).parents[1] / "fixtures" / "kimi_k3" / "reference.json").read_text())
    cases = reference["cases"][:6]
    ps = [c["prompt"] for c in cases]
    with LLM(_write(tmp_path, "kimi_k3_text"), dtype="float64", max_num_seqs=6, max_num_batched_tokens=24,
             num_kv_blocks=256, block_size=8) as llm:
        assert_same(engine_greedy(llm, ps, reference["max_new"]), [c["greedy"] for c in cases], ps)
