"""A rank loads only its own experts' tensors, straight from the safetensors files."""
from __future__ import annotations

import torch
from safetensors import safe_open

from moelink.comm.backends import make_all_to_all
from moelink.engine.config.model import ModelConfig
from moelink.engine.rank.loader import checkpoint_index, load_model
from moelink.kernels.ops import ReferenceKernels
from moelink.moe.layer import ExpertParallel
from moelink.moe.placement import ExpertPlacement


def test_rank_holds_only_its_experts(tiny_model):
    path = tiny_model("qwen3_e6k3")
    cfg = ModelConfig.from_pretrained(path, "float64")
    placement = ExpertPlacement(num_experts=6, ep_size=4)  # 2, 2, 1, 1 experts per rank
    rank = 1
    ep = ExpertParallel(rank, 4, placement, make_all_to_all("none", None, 0, 1, "cpu"), placement.to_tensors("cpu"))
    model = load_model(cfg, ReferenceKernels(), torch.device("cpu"), ep)
    local = placement.experts_on_rank(rank)
    assert local == [2, 3]
    index = checkpoint_index(path)
    for i in cfg.sparse_layers:
        mlp = model.layers[i].mlp
        assert mlp.w13_EFD.shape[0] == len(local) and mlp.w2_EDI.shape[0] == len(local)
        for slot, e in enumerate(local):
            name = f"model.layers.{i}.mlp.experts.{e}.down_proj.weight"
            with safe_open(str(index[name]), framework="pt") as f:
                torch.testing.assert_close(mlp.w2_EDI[slot], f.get_tensor(name).double())
    # The plan never names another rank's experts, so they are never read.
    names = model.weight_plan()
    assert not any(".experts.0." in n or ".experts.5." in n for n in names)
