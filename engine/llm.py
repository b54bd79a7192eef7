"""`LLM`: the offline batch API (`from moelink.engine import LLM, SamplingParams`)."""
from __future__ import annotations

import itertools
import weakref
from typing import Optional, Sequence, Union

from .engine_args import EngineArgs
from .llm_engine import LLMEngine, PromptType
from .outputs import OutputKind, RequestOutput
from .sampling_params import SamplingParams


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

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Returns one finished RequestOutput per prompt, in input order."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if not self._finalizer.alive:
            raise RuntimeError("this LLM is shut down: create a new one.")
        if not prompts:
            raise ValueError("prompts is empty: pass at least one prompt.")
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"sampling_params has {len(params_list)} entries for {len(prompts)} prompts: give one, or one per prompt."
                )
        # Validate everything before adding anything, so a bad prompt leaves no request behind.
        processed = [
            self.engine.process_inputs(str(next(self._counter)), p, sp) for p, sp in zip(prompts, params_list)
        ]
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
        return [finished[r.request_id] for r in processed]


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
