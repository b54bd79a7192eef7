"""What `engine_e2e` runs: the model shapes as config.json directories, the workloads, and the engine options it
needs that may not exist yet in the checkout it runs from (checked by name, never assumed).

Models: the published config.json numbers of Qwen3-30B-A3B and DeepSeek-V2-Lite, as `engine_decode` holds them
(the engine's own config reader reads them; random weights through `load_format="dummy"`). A small byte-level
tokenizer is written beside config.json so that a server can start on the directory; every prompt is token
ids and every request asks for token ids only (detokenize=False), so its vocabulary never matters.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .engine_decode import DEEPSEEK_V2_LITE, QWEN3_30B_A3B, SMOKE, pick_layers

MODELS = {"qwen3-30b-a3b": (QWEN3_30B_A3B, "Qwen3-30B-A3B"),
          "deepseek-v2-lite": (DEEPSEEK_V2_LITE, "DeepSeek-V2-Lite")}
# The CPU smoke's model: Qwen3-MoE's structure at toy size, one layer.
SMOKE_HF = dict(SMOKE, num_hidden_layers=1, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, vocab_size=512,
                eos_token_id=1)
# benchmark dtype name -> (EngineArgs.dtype, EngineArgs.quantization)
DTYPES = {"bf16": ("bfloat16", None), "fp8": ("bfloat16", "fp8")}


@dataclass(frozen=True)
class Workload:
    """One LLM.generate call: `requests` prompts of `input_len` token ids, `output_len` new tokens each (EOS
    ignored). The decode-heavy workload runs once per batch (its request count), the others at `requests`."""

    name: str
    input_len: int
    output_len: int
    requests: int = 0  # 0: one run per --batches value
    what: str = ""
    # Its requests must all hold their KV at once (a full decode batch); prefill-heavy work may queue.
    resident: bool = True


FULL = {"decode": Workload("decode", 128, 512, 0, "decode-heavy"),
        "balanced": Workload("balanced", 1024, 256, 64, "balanced"),
        "prefill": Workload("prefill", 2048, 8, 128, "prefill-heavy", resident=False)}
QUICK = {"decode": Workload("decode", 128, 256, 0, "decode-heavy"),
         "balanced": Workload("balanced", 1024, 256, 32, "balanced"),
         "prefill": Workload("prefill", 2048, 8, 64, "prefill-heavy", resident=False)}
SMOKE_WORKLOADS = {"decode": Workload("decode", 8, 6, 0, "decode-heavy"),
                   "balanced": Workload("balanced", 48, 6, 2, "balanced"),
                   "prefill": Workload("prefill", 96, 2, 2, "prefill-heavy", resident=False)}


def workload_requests(wl: Workload, batches: list[int]) -> list[int]:
    """Request counts a workload runs at: every batch for decode-heavy, its own count otherwise."""
    return list(batches) if wl.requests == 0 else [wl.requests]


def decode_context(wl: Workload) -> int:
    """Cached tokens per sequence of the graph-only step that stands beside a decode-heavy run: the run's mean."""
    return wl.input_len + wl.output_len // 2


# -- engine options arriving in main --------------------------------------------------------------------------------
def engine_fields() -> set[str]:
    from moelink.engine import EngineArgs

    return {f.name for f in dataclasses.fields(EngineArgs)}


def missing_reason(field: str) -> str:
    return f"needs EngineArgs.{field} (arriving in main)"


def async_modes(fields: set[str]) -> list[bool | None]:
    """(on, off) when the engine has the switch; [None] (the engine's only loop) when it has not."""
    return [True, False] if "async_scheduling" in fields else [None]


# -- model directories --------------------------------------------------------------------------------------------
def write_model_dir(out: Path, hf: dict, layers: int, max_len: int = 4096) -> Path:
    """config.json (the published numbers, `layers` decoder layers) and a small tokenizer; no weights."""
    from moelink.engine.tools.tiny_corpus import train_tiny_tokenizer, write_tokenizer_configs

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dict(hf, num_hidden_layers=layers), indent=1) + "\n")
    tok = train_tiny_tokenizer(512)
    tok.save(str(out / "tokenizer.json"))
    write_tokenizer_configs(out, tok, max_len)
    return out


def write_smoke_checkpoint(out: Path) -> Path:
    """The smoke model with weights on disk: only for a checkout whose engine has no load_format="dummy" yet."""
    from moelink.engine.tools.tiny_model import make_tiny_model

    h = SMOKE_HF
    return make_tiny_model(out, arch="qwen3_moe", num_layers=h["num_hidden_layers"], hidden_size=h["hidden_size"],
                           num_experts=h["num_experts"], top_k=h["num_experts_per_tok"],
                           num_heads=h["num_attention_heads"], num_kv_heads=h["num_key_value_heads"],
                           head_dim=h["head_dim"], moe_intermediate_size=h["moe_intermediate_size"],
                           vocab_size=h["vocab_size"], max_position_embeddings=h["max_position_embeddings"],
                           dtype="bfloat16")


def layers_that_fit(hf: dict, workloads: list[Workload], batches: list[int], device) -> int:
    """Decoder layers to build: all that fit beside the KV cache of the largest workload whose requests must be
    resident together (engine_decode's rule, bf16 weights: the FP8 run builds the same count so that the two
    compare; prefill-heavy requests queue for blocks as they would in serving)."""
    seqs, tokens = 1, 0
    for wl in (w for w in workloads if w.resident):
        for n in workload_requests(wl, batches):
            if n * (wl.input_len + wl.output_len) > tokens:
                seqs, tokens = n, n * (wl.input_len + wl.output_len)
    return pick_layers(hf, seqs, -(-max(tokens, 1) // seqs), device)
