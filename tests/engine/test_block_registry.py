"""The decoder's block registry (engine/models/blocks/): every kind an architecture names is registered once the
model package is imported (the families register their own), and a name nobody registered is one error naming the
kind and the names allowed."""
from __future__ import annotations

import pytest

from moelink.engine.config.architectures import REGISTRY
from moelink.engine.models.registry import ARCHITECTURES
from moelink.engine.models.blocks.attention import ATTENTION
from moelink.engine.models.blocks.checkpoint import CHECKPOINT
from moelink.engine.models.blocks.ffn import FFN
from moelink.engine.models.blocks.mtp import MTP_LAYOUTS
from moelink.engine.models.blocks.registry import Registry
from moelink.engine.models.blocks.stream import EMBEDDING, HEAD, RESIDUAL


def test_every_architecture_names_registered_kinds():
    for name, spec in ARCHITECTURES.items():
        ATTENTION.get(spec.attention)
        RESIDUAL.get(spec.residual)
        EMBEDDING.get(spec.embedding)
        HEAD.get(spec.head)
        CHECKPOINT.get(spec.checkpoint)
        if spec.ffn:
            FFN.get(spec.ffn)
    assert {"gqa", "mla", "block_sparse", "linear", "compressed"} <= set(ATTENTION.names())
    assert set(FFN.names()) == {"dense", "routed", "routed_shared", "token_routed", "latent_shared", "granite_moe",
                                 "dbrx", "llama4_moe", "gemma4_moe", "nemotron_h", "lfm2_moe"}
    assert set(RESIDUAL.names()) == {"prenorm", "hyper", "hc_prenorm", "shortcut_pair", "independent_hyper",
                                     "gated_hyper", "attn_res", "lagged_hyper", "dbrx", "phimoe", "gemma4",
                                     "nemotron_h", "parallel", "cohere2_moe", "afmoe",
                                     "flex_olmo"}
    assert REGISTRY["DeepseekV4ForCausalLM"].spec.residual == "hyper"
    # MTP layouts other than the draft heads' own (engine/spec/heads/: "nextn", "qwen") are a family's
    assert {a.mtp_layout for a in REGISTRY.values()} - {"nextn", "qwen"} == set(MTP_LAYOUTS.names()) == {
        "dsv4", "ling", "longcat", "hy_v4", "glm5_next"}


def test_unknown_name_is_one_error_naming_kind_and_choices():
    with pytest.raises(ValueError, match=r"^residual block 'bogus' is not registered: choose from 'afmoe', "
                                         r"'attn_res', 'cohere2_moe', 'dbrx', 'flex_olmo', 'gated_hyper', 'gemma4', "
                                         r"'hc_prenorm', 'hyper', 'independent_hyper', 'lagged_hyper', 'nemotron_h', "
                                         r"'parallel', 'phimoe', 'prenorm', 'shortcut_pair'\.$"):
        RESIDUAL.get("bogus")


def test_a_name_registered_twice_is_refused():
    reg: Registry[int] = Registry("ffn")
    reg.add("dense", 1)
    with pytest.raises(ValueError, match="ffn block 'dense' is registered twice"):
        reg.add("dense", 2)
    assert reg.get("dense") == 1


def test_an_mtp_layout_is_built_in_or_a_family_registers_it():
    """An Architecture names a draft-head layout ("nextn", "qwen") or a family's own; a name nobody registered is
    refused when the head is built, naming the layouts registered."""
    from moelink.engine.config.arch_spec import Architecture

    with pytest.raises(ValueError, match=r"mtp_layout='not a name' is invalid: choose from 'nextn', 'qwen' or a "
                                         r"layout a family registers"):
        Architecture("X", None, mtp_layout="not a name")
    with pytest.raises(ValueError, match=r"^mtp layout block 'bogus' is not registered: choose from 'dsv4', "
                                         r"'glm5_next', 'hy_v4', 'ling', 'longcat'\.$"):
        MTP_LAYOUTS.get("bogus")
