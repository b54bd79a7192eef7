"""`LLM`: the offline batch API (`from moelink.engine import LLM, SamplingParams`)."""
from __future__ import annotations

import dataclasses
import itertools
import weakref
from typing import Optional, Sequence, Union

from ..config.engine_args import EngineArgs
from ..core.llm_engine import LLMEngine, ProcessedRequest, PromptType
from ..core.outputs import OutputKind, RequestOutput
from ..contract.lora import LoRARequest
from ..contract.safe_text import shown
from ..contract.sampling_params import SamplingParams


class LLM:
    """Generate for a list of prompts with continuous batching, as vLLM's `LLM` does.

    >>> llm = LLM(model="tiny-model", dtype="float32")
    >>> out = llm.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0))
    >>> out[0].outputs[0].text

    With expert_parallel_size > 1 an LLM holds Ray workers (and a Ray instance it started):
    `shutdown()` or `with LLM(...) as llm:` gives them back, as does dropping the last
    reference to it (garbage collection) or the interpreter's exit. Idempotent.
    """

    def __init__(self, model: str, **kwargs):
        self.engine = LLMEngine.from_engine_args(EngineArgs(model=model, **kwargs))
        self._counter = itertools.count()
        # Holds the engine, not the LLM: `del llm` still frees the LLM, and this then frees the workers.
        self._finalizer = weakref.finalize(self, self.engine.shutdown)

    def shutdown(self) -> None:
        """Release the engine's workers (Ray actors, placement group, a Ray it started). Idempotent;
        the LLM cannot generate afterwards."""
        self._finalizer()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- RL rollouts (docs/rl.md): SGLang's names ---------------------------------------------------------------
    def update_weights_from_disk(self, model_path: str, load_format: str | None = None,
                                 weight_version: str | None = None, flush_cache: bool = True,
                                 rollback_bytes: int | None = None) -> dict:
        """Serve the checkpoint at `model_path` (same architecture, new values) from now on, written in place into
        every rank's weights; the prefix cache is flushed. All or nothing: a failed update is rolled back on every
        rank from the old bytes each saved (at most `rollback_bytes` a rank, checked before anything is read; 0: no
        rollback; None: 1 GiB when each rank's part fits in it, else none, logged: docs/rl.md). {"bytes_read",
        "seconds", "weight_version"}."""
        return self.engine.rl.update_weights_from_disk(model_path, load_format, weight_version, flush_cache,
                                                       rollback_bytes)

    def update_weights_from_tensor(self, named_tensors, load_format: str | None = None,
                                   weight_version: str | None = None, flush_cache: bool = True) -> dict:
        """Write [(checkpoint name, tensor)] (any subset of the served checkpoint's tensors) into every rank's weights
        in place (a trainer in the same process or Ray job); the prefix cache is flushed."""
        return self.engine.rl.update_weights_from_tensor(named_tensors, load_format, weight_version, flush_cache)

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group", backend: str = "gloo",
                                  timeout_s: float = 60.0, join_timeout_s: float = 30.0) -> dict:
        """Join a trainer's process group (the trainer is rank 0 and serves the rendezvous at master_address:
        master_port; engine rank r joins as rank_offset + r); the trainer makes its group at the same time.
        `timeout_s`: the group's (each broadcast); `join_timeout_s`: the most the join may take."""
        return self.engine.rl.init_weights_update_group(master_address, master_port, rank_offset, world_size,
                                                        group_name, backend, timeout_s, join_timeout_s)

    def update_weights_from_distributed(self, names, dtypes, shapes, group_name: str = "weight_update_group",
                                        flush_cache: bool = True, weight_version: str | None = None,
                                        bucket_bytes: int = 512 << 20, rollback_bytes: int | None = None) -> dict:
        """Receive the tensors the trainer broadcasts in `group_name` (each whole, in the order of `names`), a bucket
        of at most `bucket_bytes` at a time; every rank keeps its own part. All or nothing: a failed update is rolled
        back on every rank from the old bytes each saved (at most `rollback_bytes` a rank; 0: no rollback; None:
        1 GiB when each rank's part fits in it, else none, logged). {"bytes_read", "seconds", ...}."""
        return self.engine.rl.update_weights_from_distributed(names, dtypes, shapes, group_name, flush_cache,
                                                              weight_version, bucket_bytes, rollback_bytes)

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> dict:
        """Leave a trainer's process group."""
        return self.engine.rl.destroy_weights_update_group(group_name)

    def pause_generation(self, mode: str = "abort", clear_cache: bool = False) -> dict:
        """Stop generating until continue_generation: "abort" aborts every request, "wait" starts nothing new and
        lets started requests finish, "keep" holds them in place (KV kept; an update meanwhile reaches them, and
        their outputs name both versions). Requests added while paused wait (LLM.generate is refused).
        `clear_cache` (vLLM's): forget every cached prefix once paused; refused with "keep"."""
        return self.engine.rl.pause_generation(mode, clear_cache)

    def is_paused(self) -> bool:
        """Whether generation is paused (vLLM's is_paused)."""
        return self.engine.rl.is_paused()

    def continue_generation(self) -> dict:
        """Generate again after pause_generation."""
        return self.engine.rl.continue_generation()

    def sleep(self, level: int = 1) -> dict:
        """Give the devices back to a trainer (vLLM's sleep): level 1 keeps the weights in host memory and frees the
        KV cache; level 2 drops the weights too (an update fills them again). Requests are refused until wake_up."""
        return self.engine.rl.memory.sleep(level)

    def wake_up(self, tags=None) -> dict:
        """Give the released memory back (`tags`: "weights", "kv_cache"; None: both)."""
        return self.engine.rl.memory.wake_up(tags)

    def release_memory_occupation(self, tags=None) -> dict:
        """SGLang's name for sleep(level=1)."""
        return self.engine.rl.memory.release_memory_occupation(tags)

    def resume_memory_occupation(self, tags=None) -> dict:
        """SGLang's name for wake_up."""
        return self.engine.rl.memory.resume_memory_occupation(tags)

    def get_weight_version(self) -> str | None:
        """The weight_version the last update set (None before any)."""
        return self.engine.rl.weight_version

    def flush_cache(self) -> int:
        """Forget every cached prefix (SGLang's flush_cache; vLLM's reset_prefix_cache): blocks freed."""
        return self.engine.rl.flush_cache()

    reset_prefix_cache = flush_cache

    def collective_rpc(self, method, timeout: float | None = None, args: tuple = (), kwargs: dict | None = None) -> list:
        """vLLM's LLM.collective_rpc for OpenRLHF's worker extension calls (init_process_group, update_weight,
        update_weight_cuda_ipc: engine/api/vllm_async_compat.py, docs/rl.md), run as this LLM's weight update calls;
        one None per rank. `timeout` is not applied here: a join is bounded by its join_timeout_s, a broadcast by
        the group's timeout_s. Any other method is refused naming it."""
        from .vllm_async_compat import WorkerRpc

        if getattr(self, "_rpc", None) is None:
            self._rpc = WorkerRpc(lambda: self.engine.info().device)
        call, call_args = self._rpc.plan(method, args, kwargs)
        getattr(self, call)(*call_args)
        self._rpc.joined(call, call_args)
        return [None] * int(self.engine.config.parallel.world_size)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def chat(self, messages, sampling_params: Optional[SamplingParams] = None, use_tqdm: bool = True,
             special_tokens_in_content: str = "tokens", tokenization_kwargs: Optional[dict] = None,
             **template_kwargs) -> list[RequestOutput]:
        """Generate for a conversation (a list of {"role", "content"} messages) or for each of a list of them, as
        vLLM's LLM.chat: each rendered with the model's chat template, one RequestOutput per conversation, its
        `prompt` the rendered text. `special_tokens_in_content="text"` encodes special-token text inside the
        messages as plain text, so a user cannot forge a turn (Tokenizer.apply_chat_template); "tokens" (the
        default, as vLLM) encodes it as the control tokens it spells. `continue_final_message=True` (with
        `add_generation_prompt=False`) renders the last message without its end of turn, for the model to continue
        (transformers' and vLLM's); `tokenization_kwargs` as `generate`'s."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages is invalid: give a conversation (a non-empty list of {'role', 'content'} "
                             "messages) or a non-empty list of conversations.")
        batch = isinstance(messages[0], (list, tuple))
        conversations = list(messages) if batch else [messages]
        tok = self.engine.tokenizer
        # The rendered text (reported as each output's prompt) is the same either way special tokens are encoded.
        texts = [tok.apply_chat_template(list(c), tokenize=False, **template_kwargs) for c in conversations]
        ids = [tok.apply_chat_template(list(c), tokenize=True, special_tokens_in_content=special_tokens_in_content,
                                       **template_kwargs) for c in conversations]
        outputs = self.generate(ids, sampling_params, use_tqdm=use_tqdm, tokenization_kwargs=tokenization_kwargs)
        for out, text in zip(outputs, texts):
            out.prompt = text  # the rendered conversation, as vLLM reports it
        return outputs

    def get_default_sampling_params(self) -> SamplingParams:
        """The sampling parameters a request without its own gets (vLLM's): SamplingParams' defaults overlaid with
        the checkpoint's generation_config.json (temperature, top_p, top_k, min_p, repetition_penalty,
        max_new_tokens as max_tokens), unless the engine was started with generation_config="vllm"
        (engine/config/generation_defaults.py)."""
        return SamplingParams(**self.engine.config.sampling_defaults)

    def generate(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
        use_tqdm: bool = True,
        lora_request: Union[LoRARequest, Sequence[Optional[LoRARequest]], None] = None,
        tokenization_kwargs: Optional[dict] = None,
    ) -> list[RequestOutput]:
        """Returns one finished RequestOutput per prompt, in input order; with SamplingParams.n > 1 its
        `outputs` are the n samples, CompletionOutput.index 0 to n-1 (as vLLM's LLM returns them).
        lora_request: the LoRA adapter of every prompt, or one per prompt (None: the base model); needs an LLM
        made with enable_lora=True (docs/lora.md).
        tokenization_kwargs: vLLM 0.32's place for `truncate_prompt_tokens` (keep the prompt's last N tokens; -1: as
        many as fit), which this LLM also takes in SamplingParams; any other key is refused by name."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if not self._finalizer.alive:
            raise RuntimeError("this LLM is shut down: create a new one.")
        if not prompts:
            raise ValueError("prompts is empty: pass at least one prompt.")
        paused = self.engine.rl.paused
        if paused is not None:
            raise ValueError(f"generation is paused (mode={paused!r}): LLM.generate would wait for ever; "
                             "call continue_generation first.")
        if sampling_params is None:  # vLLM's: the checkpoint's generation_config.json (get_default_sampling_params)
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"sampling_params has {len(params_list)} entries for {len(prompts)} prompts: give one, or one per prompt."
                )
        if lora_request is None or isinstance(lora_request, LoRARequest):
            loras = [lora_request] * len(prompts)
        else:
            loras = list(lora_request)
            if len(loras) != len(prompts):
                raise ValueError(f"lora_request has {len(loras)} entries for {len(prompts)} prompts: give one, or one "
                                 "per prompt.")
        params_list = _with_tokenization(params_list, tokenization_kwargs)
        # Validate everything before adding anything, so a bad prompt leaves no request behind.
        groups = [self._samples(p, sp, lr) for p, sp, lr in zip(prompts, params_list, loras)]
        processed = [req for group in groups for req in group]
        for req in processed:
            # Only final outputs are read here: none is built per step (vLLM's LLM does the same).
            self.engine.add_processed(req, OutputKind.FINAL_ONLY)
        finished: dict[str, RequestOutput] = {}
        bar = _bar(len(processed), use_tqdm)
        try:
            while self.engine.has_requests():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        except BaseException:
            # Ctrl-C or an engine error: free every block we still hold.
            self.engine.abort_requests([r.request_id for r in processed if r.request_id not in finished])
            raise
        finally:
            bar.close()
        outputs = [_gathered([finished[r.request_id] for r in group]) for group in groups]
        for out, lora in zip(outputs, loras):
            if lora is not None:  # vLLM's RequestOutput.lora_request and CompletionOutput.lora_request
                out.lora_request = lora
                for comp in out.outputs:
                    comp.lora_request = lora
        return outputs

    def _samples(self, prompt: PromptType, params: Optional[SamplingParams],
                 lora: Optional[LoRARequest] = None) -> list[ProcessedRequest]:
        """One prompt's engine requests, validated and tokenized once: itself, or for n > 1 one per sample,
        ids `<id>-<i>`, parameters `params.sample(i)` (seed + i when seeded), as the servers run n."""
        request_id = str(next(self._counter))
        n = params.n if isinstance(params, SamplingParams) else 1  # anything else: process_inputs says what
        if n == 1:
            return [self.engine.process_inputs(request_id, prompt, params, lora_request=lora, cap_max_tokens=True)]
        first = self.engine.process_inputs(f"{request_id}-0", prompt, params.sample(0), lora_request=lora,
                                           cap_max_tokens=True)
        return [first] + [dataclasses.replace(first, request_id=f"{request_id}-{i}", params=params.sample(i))
                          for i in range(1, n)]


def _with_tokenization(params_list: list, tokenization_kwargs: Optional[dict]) -> list:
    """Each prompt's parameters with vLLM's tokenization_kwargs applied: `truncate_prompt_tokens` (and
    `truncation_side` "left", vLLM's default: the last tokens are kept). vLLM logs the keys its renderer does not
    read and goes on; here they are refused by name, as every other unknown field."""
    if not tokenization_kwargs:
        return params_list
    if not isinstance(tokenization_kwargs, dict):
        raise ValueError(f"tokenization_kwargs={shown(tokenization_kwargs)} is invalid: give a dict or None.")
    kw = dict(tokenization_kwargs)
    keep = kw.pop("truncate_prompt_tokens", None)
    side = kw.pop("truncation_side", "left")
    if kw:
        raise ValueError(f"tokenization_kwargs {shown(sorted(kw))} are not supported: LLM.generate takes "
                         "truncate_prompt_tokens (and truncation_side 'left').")
    if side != "left":
        raise ValueError(f"tokenization_kwargs truncation_side={shown(side)} is not supported: the prompt's last "
                         "tokens are kept ('left', vLLM's default).")
    if keep is None:
        return params_list
    return [dataclasses.replace(p, truncate_prompt_tokens=keep) if isinstance(p, SamplingParams) else p
            for p in params_list]


def _gathered(samples: list[RequestOutput]) -> RequestOutput:
    """A prompt's finished samples as one RequestOutput: CompletionOutput i is sample i; the id is the prompt's
    (without the `-<i>`); its first token is the first of any sample's."""
    if len(samples) == 1:
        return samples[0]
    first = samples[0]
    times = [t for t in (s.metrics.get("first_token_time") for s in samples) if t is not None]
    return RequestOutput(
        request_id=first.request_id.rsplit("-", 1)[0], prompt=first.prompt, prompt_token_ids=first.prompt_token_ids,
        outputs=[dataclasses.replace(s.outputs[0], index=i) for i, s in enumerate(samples)], finished=True,
        num_cached_tokens=first.num_cached_tokens,
        metrics={**first.metrics, "first_token_time": min(times, default=None)},
        prompt_logprobs=first.prompt_logprobs)  # sample 0 scored the prompt (SamplingParams.sample)


class _NullBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _bar(total: int, enabled: bool):
    if not enabled:
        return _NullBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="Generating", unit="req", dynamic_ncols=True)
