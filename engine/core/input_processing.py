"""Request validation and tokenization, before a request touches a scheduler (LLMEngine.process_inputs): every
bad input gets one error naming its field, the value and what is allowed; a rejected request holds nothing."""
from __future__ import annotations

import hashlib

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

from .logits_rules import checked_logits_rules
from .no_tokenizer import NoTokenizer
from ..contract.safe_text import shown
from ..contract.lora import LoRARequest
from ..contract.sampling_params import SamplingParams

if TYPE_CHECKING:  # xgrammar is imported where grammars are compiled (engine/core/structured_output.py)
    from xgrammar import CompiledGrammar

    from ..multimodal.inputs import MultimodalInputs

PromptType = Union[str, list[int], dict]


def too_long(field: str, num_tokens: int, max_model_len: int) -> ValueError:
    return ValueError(f"{field} has {num_tokens} tokens, too long: max_model_len={max_model_len} leaves room for "
                      f"at most {max_model_len - 1} prompt tokens.")


def max_tokens_too_large(field: str, max_tokens: int, num_prompt_tokens: int, max_model_len: int) -> ValueError:
    """vLLM's wording (its OpenAI server's 400), with the numbers: what was asked, what the prompt took."""
    return ValueError(
        f"SamplingParams.max_tokens={max_tokens} is too large: this model's maximum context length is "
        f"{max_model_len} tokens and the {field} has {num_prompt_tokens} tokens ({max_tokens} > {max_model_len} - "
        f"{num_prompt_tokens}); ask for at most {max_model_len - num_prompt_tokens}, or leave max_tokens unset "
        f"to generate up to the context.")


def kept_prompt_tokens(params: SamplingParams, max_model_len: int) -> int | None:
    """How many prompt tokens params.truncate_prompt_tokens keeps (the last ones); None: no truncation.

    -1 keeps as many as fit beside max_tokens (unset: one), so "the model's limit" never turns a request that
    truncation could save into a max_tokens refusal; a max_tokens that leaves no room is still refused."""
    keep = params.truncate_prompt_tokens
    if keep != -1:
        return keep
    return max(max_model_len - (params.max_tokens or 1), 1)


def _first_bad_id(ids: list, vocab: int) -> int | None:
    """Index of the first entry that is not an int in [0, vocab), or None; C-speed when all are fine."""
    if not ids or (set(map(type, ids)) == {int} and min(ids) >= 0 and max(ids) < vocab):
        return None
    return next(i for i, t in enumerate(ids) if type(t) is not int or not 0 <= t < vocab)


@dataclass
class ProcessedRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    # Set when params.structured_outputs is (compiled in process_inputs).
    grammar: CompiledGrammar | None = None
    # Who sent it (engine/server/client_identity.py): the scheduler shares slots and tokens fairly among clients
    # (scheduler/fairness.py). (): anonymous, as offline use.
    client: tuple[str, ...] = ()
    # What its KV depends on besides the token ids (scheduler Request.cache_salt): tagged parts a feature adds
    # (an adapter, images); b"" for a plain prompt.
    cache_salt: bytes = b""
    # Its LoRA adapter (checked against the checkpoint: engine/lora/checker.py); None: the base model.
    lora: LoRARequest | None = None
    # Its images, processed (engine/multimodal/inputs.MultimodalInputs), carried to its rank; None: text only.
    multimodal: MultimodalInputs | None = None
    # Why it can only load its prompt's KV, never compute it (a decode request without its pixels); "" otherwise
    # (scheduler Request.must_load).
    must_load: str = ""


# The keys of vLLM's prompt dicts (TextPrompt / TokensPrompt) the engine reads; "multi_modal_data" only where a
# multimodal model is served (engine/multimodal/).
PROMPT_KEYS = ("prompt", "prompt_token_ids", "multi_modal_data")


def check_prompt_dict(prompt: dict, multimodal) -> None:
    """Refuse a prompt dict key the engine would otherwise drop (vLLM's mm_processor_kwargs, cache_salt, ...), and
    images for a model that cannot see them: nothing a caller sends is silently ignored."""
    for key in prompt:
        if key not in PROMPT_KEYS:
            raise ValueError(f"prompt[{shown(key)}] is not supported: a prompt dict takes the keys "
                             f"{', '.join(map(repr, PROMPT_KEYS))}.")
    if prompt.get("multi_modal_data") is not None and multimodal is None:  # None: no images, as vLLM reads it
        raise ValueError("prompt['multi_modal_data'] is not supported: this engine serves a text model (images are "
                         "taken by a multimodal checkpoint, docs/multimodal.md); send text or token ids only.")


def process_inputs(engine, request_id: str, prompt: PromptType, params: SamplingParams | None,
               field: str | None = None, compile_grammar: bool = True,
               lora_request: LoRARequest | None = None, cap_max_tokens: bool = False) -> ProcessedRequest:
    """Tokenize and validate; raises ValueError naming the bad field. Thread-safe (reads only).

    `field`: what messages call the prompt (default "prompt", or "prompt_token_ids" for ids; a server
    passes the name of the proto field it came from). `compile_grammar=False`: leave `grammar` unset for a
    caller that awaits the compile itself (AsyncEngine.compile_grammar), holding no thread while it runs.
    `cap_max_tokens`: a max_tokens past the context generates up to the context (vLLM's offline LLM), instead of
    the servers' refusal (vLLM's OpenAI server answers 400).
    """
    params = checked_logits_rules(engine, _checked_params(engine, request_id, params))
    lora = _checked_lora(engine, lora_request)
    text, ids, mm, field = _prompt_token_ids(engine, prompt, params, field)
    ids = _fitted_prompt(engine, ids, params, field, text, mm)
    max_tokens = _max_tokens(engine, ids, params, field, cap_max_tokens)
    grammar = None
    if params.structured_outputs is not None and compile_grammar:
        # Compiled on the grammar pool; this caller waits, the engine loop does not.
        grammar = engine.grammars.compile(params.structured_outputs)
    # The KV's salt: each feature's tagged part (an adapter's, the images', the given routing's), concatenated.
    salt = ((lora.cache_salt if lora is not None else b"") + (mm.cache_salt if mm is not None else b"")
            + forced_routing_salt(engine, params, len(ids)))
    return ProcessedRequest(request_id, text, ids, params, max_tokens, grammar, lora=lora, cache_salt=salt,
                            multimodal=mm, must_load=NO_PIXELS if mm is not None and not mm.pixels else "")


def _checked_params(engine, request_id: str, params: SamplingParams | None) -> SamplingParams:
    """The request id and the sampling parameters this engine can honour (None: the defaults); what it was not
    started for (routed experts, a KV transfer) is refused, never silently dropped."""
    if not isinstance(request_id, str) or not request_id:
        raise ValueError(f"request_id={shown(request_id)} is invalid: must be a non-empty string.")
    params = SamplingParams() if params is None else params
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling_params={shown(params)} is invalid: must be a SamplingParams.")
    if params.n != 1:
        # Refused, not run as one sample: a caller asking for n must get n or an error.
        raise ValueError(f"SamplingParams.n={params.n} is invalid for one engine request: an engine request is "
                         f"one sample; run n requests with params.sample(i), i < n (as LLM.generate and the "
                         f"servers do).")
    if params.return_routed_experts and not engine.config.return_routed_experts:
        # Refused, not answered without them: the ranks record routing only when started to.
        raise ValueError("SamplingParams.return_routed_experts=True is invalid: this engine records no routing; start "
                         "it with enable_return_routed_experts=True (--enable-return-routed-experts).")
    if params.kv_transfer_params is not None and engine.config.kv_connector is None:
        # Refused, not ignored: a decode request would silently recompute its prompt, a prefill one save nothing.
        raise ValueError("SamplingParams.kv_transfer_params is set, but this engine has no KV connector: start it "
                         "with kv_connector=RemoteKVConnector(...) (engine/kv_transfer/remote.py).")
    if params.kv_transfer_params is not None and hasattr(engine.config.kv_connector, "check_params"):
        # A KV source outside the engine's peers is refused here, before any connection (engine/kv_transfer/peers.py).
        engine.config.kv_connector.check_params(params.kv_transfer_params)
    return params


def _checked_lora(engine, lora_request: LoRARequest | None) -> LoRARequest | None:
    """The request's adapter checked against the checkpoint (engine/lora/checker.py); None: the base model."""
    if lora_request is None:
        return None
    if engine.lora_checker is None:  # refused, not served by the base model
        raise ValueError(f"lora_request={lora_request!r} is invalid: this engine serves no LoRA adapters; start "
                         "it with enable_lora=True (--enable-lora).")
    return engine.lora_checker.check(lora_request)


def _prompt_token_ids(engine, prompt: PromptType, params: SamplingParams, field: str | None
                      ) -> tuple[str | None, list[int], MultimodalInputs | None, str]:
    """(its text or None, its token ids, its processed images or None, what messages call it) of a prompt given as
    text, token ids or a vLLM prompt dict (with images: their placeholders expanded in the ids)."""
    text = None
    mm = None
    if isinstance(prompt, dict):
        check_prompt_dict(prompt, getattr(engine, "multimodal", None))
        if prompt.get("multi_modal_data") is not None:
            text, prompt, mm = _with_images(engine, prompt, params)
        elif "prompt_token_ids" in prompt:
            prompt = prompt["prompt_token_ids"]
        elif "prompt" in prompt:
            prompt = prompt["prompt"]
        else:
            raise ValueError("prompt dict is invalid: it needs a 'prompt' or 'prompt_token_ids' key.")
    field = field or ("prompt" if isinstance(prompt, str) else "prompt_token_ids")
    if isinstance(engine.tokenizer, NoTokenizer):
        engine.tokenizer.check_request(field, prompt, params)
    if mm is not None:
        ids = prompt
    elif isinstance(prompt, str):
        text = prompt
        if not prompt:
            raise ValueError(f"{field} is empty: give at least one character or token id.")
        ids = engine.tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple)):
        ids = list(prompt)
    else:
        raise ValueError(f"{field} of type {type(prompt).__name__} is invalid: pass a string or a list of token ids.")
    if not ids:
        raise ValueError(f"{field} is empty: give at least one character or token id.")
    return text, ids, mm, field


def _fitted_prompt(engine, ids: list[int], params: SamplingParams, field: str, text: str | None,
                   mm: MultimodalInputs | None) -> list[int]:
    """The prompt's ids truncated as asked (truncate_prompt_tokens), checked to fit the model and the KV cache and
    to be token ids of its vocabulary (cheapest check first: a long list is refused before each id is read)."""
    max_len = engine.config.scheduler.max_model_len
    keep = kept_prompt_tokens(params, max_len)
    if keep is not None:
        ids = ids[-keep:]
    if len(ids) >= max_len:  # before looking at each id: a long list is refused at no cost
        raise too_long(field, len(ids), max_len)
    vocab = engine.config.model.vocab_size
    bad = _first_bad_id(ids, vocab)
    if bad is not None:
        name = f"{field}[{bad}]" if text is None else f"{field} token {bad}"
        raise ValueError(f"{name}={shown(ids[bad])} is out of range: token ids must be integers in [0, {vocab}).")
    if mm is None and params.kv_transfer_params is not None and params.kv_transfer_params.do_remote_prefill:
        _check_decode_leg_has_its_images(engine, ids, field)
    bs, blocks = engine.config.cache.block_size, engine.config.cache.num_kv_blocks
    # The prompt and its first sampled token must fit what one sequence may hold alone: the whole pool, or
    # less when the sliding-window layers' blocks come from the same pool (Scheduler.pool_tokens).
    if len(ids) + 1 > engine.schedulers[0].pool_tokens:
        alone = "" if engine.config.cache.sliding_window is None else (
            f", of which one sequence may use {engine.schedulers[0].pool_tokens} tokens beside its "
            "sliding-window layers' blocks")
        raise ValueError(
            f"{field} has {len(ids)} tokens, more than the KV cache holds ({blocks} blocks of {bs} tokens"
            f"{alone}): raise num_kv_blocks / kv_cache_memory_bytes or shorten the prompt."
        )
    return ids


def _max_tokens(engine, ids: list[int], params: SamplingParams, field: str, cap: bool = False) -> int:
    """The most tokens the request may generate: its max_tokens, or what the context leaves after the prompt when
    unset (or, with `cap`, when max_tokens asks more); its stop token ids checked against the vocabulary first."""
    vocab, max_len = engine.config.model.vocab_size, engine.config.scheduler.max_model_len
    bad = _first_bad_id(params.stop_token_ids, vocab)
    if bad is not None:
        raise ValueError(f"SamplingParams.stop_token_ids contains {shown(params.stop_token_ids[bad])}: "
                         f"token ids must be in [0, {vocab}).")
    room = max_len - len(ids)
    if cap:
        # vLLM's offline LLM neither refuses nor rewrites such a max_tokens: its scheduler stops the request when
        # the sequence reaches max_model_len (finish_reason "length"); SamplingParams.max_tokens stays as given.
        return room if params.max_tokens is None else min(params.max_tokens, room)
    if params.max_tokens is not None and params.max_tokens > room:
        # Refused, not clamped (vLLM answers 400): a client that asked for N tokens and silently got fewer
        # would read finish_reason="length" as its own limit.
        raise max_tokens_too_large(field, params.max_tokens, len(ids), max_len)
    return room if params.max_tokens is None else params.max_tokens


def forced_routing_salt(engine, params: SamplingParams, num_prompt_tokens: int) -> bytes:
    """SamplingParams.forced_routed_experts checked against the model and the prompt; the cache salt of its KV
    (b"" without it): KV computed with given routing is shared only with requests giving the same routing."""
    given = params.forced_routed_experts
    if given is None:
        return b""
    cfg = engine.config.model
    moe_layers, top_k = len(cfg.sparse_layers), cfg.top_k
    experts = cfg.num_experts + (cfg.moe.zero_experts if cfg.moe is not None else 0)
    if given.shape[1:] != (moe_layers, top_k) or given.shape[0] > num_prompt_tokens:
        raise ValueError(f"SamplingParams.forced_routed_experts has shape {tuple(given.shape)}: it must be [n <= "
                         f"{num_prompt_tokens} prompt positions, {moe_layers} MoE layers, top_k {top_k}].")
    if int(given.max()) >= experts:
        raise ValueError(f"SamplingParams.forced_routed_experts holds expert {int(given.max())}: this model's expert "
                         f"ids are 0 to {experts - 1}.")
    parallel = engine.config.parallel
    if parallel.tensor_parallel_size > 1 and not parallel.experts_split_by_tp:
        raise ValueError("SamplingParams.forced_routed_experts is not supported with tensor and expert parallelism "
                         "together: each TP rank routes a slice of the tokens; serve with TP alone or EP alone.")
    if parallel.expert_parallel_size > 1 and engine.config.cuda_graph.batch_sizes:
        raise ValueError("SamplingParams.forced_routed_experts under expert parallelism needs eager steps: start the "
                         "engine with enforce_eager=True (--enforce-eager); its steps would mix with the other "
                         "ranks' graph replays.")
    return b"replay:" + hashlib.sha256(given.tobytes() + repr(given.shape).encode()).digest()


def _check_decode_leg_has_its_images(engine, ids: list[int], field: str) -> None:
    """A decode request (kv_transfer_params.do_remote_prefill) whose prompt holds image placeholders must carry its
    images: their hashes key the KV it loads (engine/kv_transfer/auth.salted_key) and its prefix cache, and Qwen's
    decode positions turn by their rope delta, all recomputed here from the images. Without them the load would
    find nothing (the save is keyed by the images) and the placeholders would be computed as text."""
    mm = getattr(engine, "multimodal", None)
    for token_id in () if mm is None else (mm.image_token_id, mm.video_token_id):
        if token_id is not None and token_id in ids:
            raise ValueError(f"{field} holds image or video placeholders (id {token_id}) but the request has no "
                             "multi_modal_data: a decode request of prefill/decode disaggregation must carry the "
                             "same images and videos as its prefill request (docs/multimodal.md).")


# Why a decode request without its pixels can never be computed here (scheduler Request.must_load): the message a
# failed load, a preemption or anything else that would recompute it ends it with.
NO_PIXELS = ("its images came without pixels (a decode request of prefill/decode disaggregation, its hashes the "
             "prefill engine's kv_transfer_params.mm_hashes): it cannot be computed here, only loaded")


def _check_load_only(params: SamplingParams) -> None:
    """A request sent without its pixels loads its prompt's KV or ends: what would compute its whole prompt here
    is refused naming the field."""
    if params.prompt_logprobs is not None or params.return_routed_experts:
        field = "prompt_logprobs" if params.prompt_logprobs is not None else "return_routed_experts"
        raise ValueError(f"SamplingParams.{field} is not supported on a decode request without pixels: it computes "
                         "every prompt token here (their images' rows need the pixels).")


def _with_images(engine, prompt: dict, params: SamplingParams) -> tuple[str | None, list[int], MultimodalInputs]:
    """(text, token ids with the image placeholders expanded, the processed images and videos) through the
    checkpoint's processor (engine/multimodal/processor.py; token ids come with the processor's outputs,
    engine/multimodal/preprocessed.py); what they cannot run with is refused naming it."""
    if params.truncate_prompt_tokens is not None:  # a cut could fall inside an image's placeholders
        raise ValueError("SamplingParams.truncate_prompt_tokens is not supported with multi_modal_data: the prompt's "
                         "image placeholders must all be kept.")
    if "prompt_token_ids" in prompt:  # the processor's outputs already (smg's gRPC MultimodalInputs carries them)
        ids = prompt["prompt_token_ids"]
        if not isinstance(ids, (list, tuple)) or not ids:
            raise ValueError(f"prompt['prompt_token_ids']={shown(ids)} is invalid: must be a non-empty list of "
                             "token ids.")
        data = prompt["multi_modal_data"]  # {"image": ..., "video": ...}: checked by the processor
        vocab = engine.config.model.vocab_size
        bad = _first_bad_id(list(ids), vocab)
        if bad is not None:
            raise ValueError(f"prompt_token_ids[{bad}]={shown(ids[bad])} is out of range: token ids must be "
                             f"integers in [0, {vocab}).")
        kv = params.kv_transfer_params
        relayed = kv.mm_hashes if kv is not None and kv.do_remote_prefill else None
        mm = engine.multimodal.process_preprocessed(list(ids), data, relayed=relayed)
        if not mm.pixels:
            _check_load_only(params)
        return None, list(ids), mm
    text = prompt.get("prompt")
    ids, mm = engine.multimodal.process(text, prompt["multi_modal_data"])
    return text, ids, mm
