"""ModelConfig: what the engine needs to know about a checkpoint, read from config.json and validated."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moelink.comm.backends import resolve_backend

from .timeouts import DEFAULT_HEARTBEAT_TIMEOUT_S, DEFAULT_STEP_TIMEOUT_S, check_seconds

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}

# Architectures we can run, by the `architectures` name in config.json.
SUPPORTED_ARCHITECTURES = ("Qwen3MoeForCausalLM", "MixtralForCausalLM")


def parse_dtype(value, checkpoint_dtype: str | None = None) -> torch.dtype:
    """'auto' → the checkpoint's dtype (float32 when it says nothing); names or torch dtypes otherwise."""
    if isinstance(value, torch.dtype):
        if value in _DTYPES.values():
            return value
        raise ValueError(f"dtype={value} is not supported: choose from float32, bfloat16, float16, float64 or 'auto'.")
    if value == "auto":
        return _DTYPES.get(str(checkpoint_dtype or "float32"), torch.float32)
    if value not in _DTYPES:
        raise ValueError(f"dtype={value!r} is not supported: choose from float32, bfloat16, float16, float64 or 'auto'.")
    return _DTYPES[value]


@dataclass
class ModelConfig:
    """Shape and routing of a MoE decoder, from a local Hugging Face directory."""

    model: str
    dtype: torch.dtype
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    max_model_len: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    intermediate_size: int  # dense MLP layers (Qwen3 `mlp_only_layers`)
    norm_topk_prob: bool
    sparse_layers: tuple[int, ...]
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    hf_config: dict = field(repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"config.json num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}.")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"config.json num_experts_per_tok={self.top_k} must be in [1, num_experts={self.num_experts}].")
        if not 1 <= self.max_model_len <= self.max_position_embeddings:
            raise ValueError(
                f"max_model_len={self.max_model_len} is invalid: must be in [1, max_position_embeddings={self.max_position_embeddings}]."
            )

    @classmethod
    def from_pretrained(cls, model: str, dtype="auto", max_model_len: int | None = None) -> "ModelConfig":
        path = Path(model)
        if not path.is_dir():
            raise ValueError(f"model={model!r} is not a directory: pass a local Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json).")
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ValueError(f"model={model!r} has no config.json: a Hugging Face checkpoint directory is required.")
        hf = json.loads(cfg_file.read_text())
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(f"config.json architectures={archs!r} is not supported: moelink runs {', '.join(SUPPORTED_ARCHITECTURES)}.")
        is_qwen = arch == "Qwen3MoeForCausalLM"
        num_layers = int(hf["num_hidden_layers"])
        num_heads = int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        num_experts = int(hf["num_experts"] if is_qwen else hf["num_local_experts"])
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"config.json rope_type={rope_type!r} is not supported yet: only 'default' rotary embeddings.")
        rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        if is_qwen:
            only_dense = set(hf.get("mlp_only_layers") or [])
            step = int(hf.get("decoder_sparse_step", 1) or 1)
            sparse = tuple(i for i in range(num_layers) if i not in only_dense and num_experts > 0 and (i + 1) % step == 0)
            moe_inter = int(hf["moe_intermediate_size"])
        else:
            sparse = tuple(range(num_layers))
            moe_inter = int(hf["intermediate_size"])
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        max_pos = int(hf.get("max_position_embeddings", 4096))
        if max_model_len is not None and (not isinstance(max_model_len, int) or isinstance(max_model_len, bool)):
            raise ValueError(f"max_model_len={max_model_len!r} is invalid: must be a positive integer.")
        return cls(
            model=str(path),
            dtype=parse_dtype(dtype, hf.get("torch_dtype") or hf.get("dtype")),
            architecture=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads", num_heads)),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            max_position_embeddings=max_pos,
            max_model_len=max_model_len if max_model_len is not None else max_pos,
            num_experts=num_experts,
            top_k=int(hf["num_experts_per_tok"]),
            moe_intermediate_size=moe_inter,
            intermediate_size=int(hf.get("intermediate_size", moe_inter)),
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)) if is_qwen else True,
            sparse_layers=sparse,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
            hf_config=hf,
        )


_EXECUTORS = ("auto", "inprocess", "ray")


@dataclass
class ParallelConfig:
    """Data-parallel attention + expert-parallel MoE over the same `expert_parallel_size` ranks.

    Every rank runs attention for its own requests and holds 1/N of the experts.
    `executor` "auto" is in-process for one rank and Ray beyond; `ray_address`
    None starts a local Ray instance, "auto" joins the running cluster, or give
    an address. `all_to_all` names a backend of moelink.comm.backends: "auto"
    picks "none" for one rank and "torch" otherwise (gloo on CPU, NCCL on GPU).
    """

    expert_parallel_size: int = 1
    executor: str = "auto"
    ray_address: str | None = None
    all_to_all: str = "auto"
    num_redundant_experts: int = 0
    # Watchdogs of a multi-rank engine (see RayExecutor): a model step that takes longer than
    # step_timeout_s fails the engine (the first model step, which JIT-compiles kernels, gets at least
    # timeouts.FIRST_STEP_TIMEOUT_S); a rank that answers no heartbeat for heartbeat_timeout_s (frozen, wedged
    # or unreachable) fails it too, whether or not a step is running. One collective may wait
    # comm_timeout_s for its peers, so step_timeout_s is longer: a lost peer is reported by its rank.
    step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S
    heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S
    comm_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        n = self.expert_parallel_size
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"expert_parallel_size={n!r} is invalid: must be a positive integer.")
        if self.executor not in _EXECUTORS:
            raise ValueError(f"executor={self.executor!r} is invalid: choose from {', '.join(_EXECUTORS)}.")
        if self.executor == "inprocess" and n > 1:
            raise ValueError(f"executor='inprocess' runs one rank; expert_parallel_size={n} needs executor='ray' or 'auto'.")
        # The registry owns the names and "auto"; it also refuses a backend that cannot run at n ranks.
        resolve_backend(self.all_to_all, n)
        if not isinstance(self.num_redundant_experts, int) or self.num_redundant_experts < 0:
            raise ValueError(f"num_redundant_experts={self.num_redundant_experts!r} is invalid: must be an integer >= 0.")
        for name in ("step_timeout_s", "heartbeat_timeout_s", "comm_timeout_s"):
            check_seconds(name, getattr(self, name))

    @property
    def world_size(self) -> int:
        return self.expert_parallel_size

    @property
    def resolved_executor(self) -> str:
        if self.executor != "auto":
            return self.executor
        return "inprocess" if self.expert_parallel_size == 1 else "ray"
