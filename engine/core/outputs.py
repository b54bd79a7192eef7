"""What users get back: vLLM-shaped RequestOutput / CompletionOutput."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional


class OutputKind(enum.Enum):
    CUMULATIVE = "cumulative"  # every output carries the whole text and ids so far (LLM, default)
    DELTA = "delta"  # every output carries only what is new (streaming front ends)
    FINAL_ONLY = "final_only"  # one output, when the request finishes


@dataclass
class Logprob:
    logprob: float
    rank: int
    decoded_token: Optional[str] = None


@dataclass
class WeightVersionSpan:
    """Output tokens [start, end) were sampled by the weights labelled `version` (vLLM's)."""

    version: str
    start: int
    end: int


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float]
    logprobs: Optional[list[dict[int, Logprob]]]
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    # SamplingParams.return_routed_experts, on the finished output: int [prompt + generated - 1, MoE layers, top_k],
    # the logical expert ids each forwarded position was routed to (int16 when they fit); None otherwise.
    routed_experts: Optional[Any] = None
    # The LoRA adapter that generated it (vLLM's; LLM.generate sets it); None: the base model.
    lora_request: Optional[Any] = None
    # vLLM 0.32's other attributes. On the finished output, the weight versions (RL, docs/rl.md) of its tokens as
    # vLLM's spans, [WeightVersionSpan(version, start, end)] over output token indexes ("default": weights no update
    # labelled, vLLM's name for them); None on the outputs before and without tokens. With vLLM's value for what moelink does not compute: `sampling_mask` (vLLM's per-token support sets
    # after top-k/top-p/min-p, made only when asked) and `spec_decode_metrics` (per request only under vLLM's
    # --per-request-spec-decode-metrics), always None.
    weight_versions: Optional[list["WeightVersionSpan"]] = None
    sampling_mask: Optional[Any] = None
    spec_decode_metrics: Optional[Any] = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    # arrival_time, first_token_time, output_kind; one dict shared by a request's outputs: read, do not modify.
    metrics: dict = field(default_factory=dict)
    # Prefill/decode disaggregation: on a prefill engine's final output, the KVTransferParams a decode engine's
    # request needs to load the KV saved for it (engine/kv_transfer/remote.py); None otherwise (as vLLM's).
    kv_transfer_params: Optional[object] = None
    # SamplingParams.prompt_logprobs: None for the first prompt token, then per prompt token its {token id: Logprob}
    # (the token and the top-n); every output of the request (a stream's first only); None when not asked.
    prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]] = None
    # RL rollouts (docs/rl.md): the weight version (the caller's label of each update, LLM.get_weight_version) of the
    # weights that computed the request's newest tokens (None before any labelled update, or before its first
    # token); and `weight_versions`, set only when they were more than one (an update reached the request while it
    # was held by pause_generation("keep"), SGLang's behaviour): every version its KV and tokens came from, oldest
    # first.
    weight_version: Optional[str] = None
    weight_versions: Optional[tuple] = None
    # vLLM's other attributes: the LoRA adapter that served it (LLM.generate sets it; None: the base model); the
    # encoder prompt of an encoder-decoder model (moelink serves decoder-only models: always None, as vLLM's for
    # them); prompt tokens written to the prefix cache (vLLM's num_cache_creation_tokens: not counted here, None).
    lora_request: Optional[Any] = None
    encoder_prompt: Optional[str] = None
    encoder_prompt_token_ids: Optional[list[int]] = None
    num_cache_creation_tokens: Optional[int] = None
    # vLLM's too, always None here: the encoder-cache transfer of an encoder-decoder or multimodal disaggregation
    # (vLLM's ec_transfer_params; moelink's images are encoded where they are prefilled) and the logprobs of the
    # prompt at given token ids (vLLM's prompt_logprob_token_ids, which moelink's SamplingParams does not take).
    ec_transfer_params: Optional[dict] = None
    prompt_token_id_logprobs: Optional[Any] = None
