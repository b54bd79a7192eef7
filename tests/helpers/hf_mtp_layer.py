"""Hy4's and GLM-5.3-Flash's MTP modules composed from transformers' own layer classes: the independent recomputation
of engine/models/hy_v4/mtp.py and glm5_next/mtp.py (tests/engine/test_spec_decode_mtp_families.py).

transformers 5.24 builds neither module, but builds every part of its decoder layer: a main layer of the same shape
(a full indexer, routed experts) is one. So the module's layer here is transformers' layer `template` of a copy of the
checkpoint whose tensors there are the module's (read by transformers' own loader, its conversions included), run
without its hyper-connections as vLLM and SGLang run the module's layer: x -> x + attn(input_layernorm(x)) -> ... ->
+ mlp(post_attention_layernorm(.)); around it enorm, hnorm, eh_proj and the final norm in plain torch, the embedding
zeroed at position 0 (vLLM's rule), the main model's embedding and LM head. float64, the whole sequence at once, no
cache (transformers' forward without a cache defines DeepSeek Sparse Attention)."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# family -> (the module's prefix in the files, its own tensors' names under it, transformers' layer to hold it)
LAYOUTS = {
    "HYV4ForCausalLM": ("model.mtp_layers.0.", ("enorm", "hnorm", "eh_proj", "final_layernorm"), "model.layers.{j}."),
    "Glm5NextForConditionalGeneration": ("model.language_model.layers.{L}.",
                                         ("enorm", "hnorm", "eh_proj", "shared_head.norm"),
                                         "model.language_model.layers.{j}."),
}


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


class HFComposedMTP:
    """The module of checkpoint `path` (float64), its layer transformers' layer `template` holding the module's
    tensors (module docstring)."""

    def __init__(self, path: str, template: int):
        import transformers

        raw = json.loads((Path(path) / "config.json").read_text())
        arch = raw["architectures"][0]
        text = raw.get("text_config", raw)
        prefix, own, at = LAYOUTS[arch]
        prefix, at = prefix.format(L=text["num_hidden_layers"]), at.format(j=template)
        mtp = load_file(str(Path(path) / "mtp.safetensors"))
        self.own = {n: mtp[prefix + n + ".weight"].to(torch.float64) for n in own}
        main = load_file(str(Path(path) / "model.safetensors"))
        for name, t in mtp.items():  # the module's layer tensors into layer `template`
            rest = name[len(prefix):]
            if not rest.startswith(tuple(n + "." for n in own)):
                assert at + rest in main, f"{at + rest} (the module's {name}) is no tensor of layer {template}"
                main[at + rest] = t
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(Path(path) / "config.json", tmp)
            save_file(main, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
            cls = getattr(transformers, arch)
            swapped = cls.from_pretrained(tmp, dtype=torch.float64, experts_implementation="eager").eval()
            plain = cls.from_pretrained(path, dtype=torch.float64, experts_implementation="eager").eval()
        body = swapped.model.language_model if hasattr(swapped.model, "language_model") else swapped.model
        self.layer, self.body, self.arch = body.layers[template], body, arch
        self.embed = plain.get_input_embeddings().weight
        self.head = plain.lm_head.weight.to(torch.float64)
        self.eps = float(text["rms_norm_eps"])

    @torch.no_grad()
    def forward(self, input_ids_T: torch.Tensor, hidden_TD: torch.Tensor) -> torch.Tensor:
        """The module's final-normed rows at positions 0 .. T-1: row t reads token input_ids_T[t] and state
        hidden_TD[t]."""
        T = len(input_ids_T)
        e_TD = self.embed[input_ids_T].masked_fill((torch.arange(T) == 0)[:, None], 0)
        x_TD = torch.cat([_rms(e_TD, self.own["enorm"], self.eps), _rms(hidden_TD, self.own["hnorm"], self.eps)], -1)
        x_1TD = (x_TD @ self.own["eh_proj"].T)[None]
        kw: dict = {}
        if self.arch == "HYV4ForCausalLM":  # causal mask and rope, as HYV4Model builds them
            from transformers.masking_utils import create_causal_mask

            pos = torch.arange(T)[None]
            kw = dict(position_ids=pos, position_embeddings=self.body.rotary_emb(x_1TD, position_ids=pos),
                      attention_mask=create_causal_mask(config=self.body.config, inputs_embeds=x_1TD,
                                                        attention_mask=None, cache=None, position_ids=pos,
                                                        allow_is_causal_skip=False))
        else:  # GLM-5.3: no rope; the indexer makes the selection causal (Glm5NextTextModel's padding mask)
            kw = dict(attention_mask=torch.ones(1, T, dtype=torch.bool), position_embeddings=None)
        a_1TD = self.layer.self_attn(hidden_states=self.layer.input_layernorm(x_1TD), **kw)[0]
        r_1TD = x_1TD + a_1TD
        y_1TD = r_1TD + self.layer.mlp(self.layer.post_attention_layernorm(r_1TD))
        final = self.own["final_layernorm" if "final_layernorm" in self.own else "shared_head.norm"]
        return _rms(y_1TD[0], final, self.eps)

    def logits(self, out_TD: torch.Tensor) -> torch.Tensor:
        return out_TD @ self.head.T


__all__ = ["HFComposedMTP"]
