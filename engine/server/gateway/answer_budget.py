"""The byte budget of a non-streamed answer (RequestLimits.max_answer_bytes, `--max-answer-bytes`): an upper
estimate of the JSON the answer builders (completions_answer.py, chat_answer.py, generate_route._Results) would write,
checked at admission, so that no request is admitted whose answer the server cannot build whole.

Why: such an answer is built in memory before a byte is sent; one 143-byte request (n=64 x 1,000 tokens x logprobs
20) made a 36 MB answer, 512 prompts x prompt_logprobs 20 a 663 MB one (+4.6 GB of the server's memory), and 16,384
prompts would have passed 100 GB (issue 95 item 5). A streamed answer is sent as it comes and is not bounded here;
prompt logprobs cannot stream (vLLM refuses them with stream=true), so they always count.

The estimate: per choice (prompt x sample) max_tokens x (a token's text and id + its logprobs entry when asked), its
prompt's tokens again when echoed, and the prompt's tokens x their prompt_logprobs entry. Bytes per entry were
measured on the builders' own JSON (tokens of 7 characters, where English BPE tokens average 4 to 5; logprobs of full
float precision), then rounded up; as (per token, per top logprob):

    /v1/completions `logprobs`           69 + 31 k   -> (80, 40)
    /v1/chat/completions `logprobs`     102 + 85 k   -> (120, 100)   (each token's `bytes` list is most of it)
    vLLM's `prompt_logprobs`             77 + 77 k   -> (90, 90)
    /generate `*_token_logprobs`         36 + 36 k   -> (40, 40)

A token's text and id (`text`, `token_ids`, `output_ids`) count TEXT_BYTES, a choice's own fields CHOICE_BYTES.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from .openai_fields import HttpFieldError

TEXT_BYTES = 16
CHOICE_BYTES = 512
COMPLETIONS_LOGPROB = (80, 40)
CHAT_LOGPROB = (120, 100)
PROMPT_LOGPROB = (90, 90)
GENERATE_LOGPROB = (40, 40)
# vllm_token_generate.py's entries: the token as "token_id:N" with "bytes": null, in the entry and again in each of
# its top_logprobs (at least one, logprobs=0 too). Counted as completions' (80, 40), a 1,000-token answer at
# logprobs=20 came to 1.6x its estimate (1,427 bytes a token, not 880): 128 MiB admitted ~205 MB.
TOKEN_GENERATE_LOGPROB = (120, 80)


def entry_bytes(shape: tuple[int, int], top: Optional[int]) -> int:
    """One token's logprobs entry with `top` top logprobs (None: no logprobs asked, 0 bytes)."""
    return 0 if top is None else shape[0] + shape[1] * top


@dataclass(frozen=True)
class Estimate:
    output: int  # the generated tokens' part (what stream=true would send as it comes)
    prompt: int  # the prompts' part (echo, prompt logprobs)

    @property
    def total(self) -> int:
        return self.output + self.prompt


def estimate(prompt_lens: Iterable[int], n: int, max_tokens: int, logprob: tuple[int, int], top: Optional[int],
             prompt_top: Optional[int], echo: bool = False, prompt_entries_per_choice: bool = True) -> Estimate:
    """The answer's upper size: `prompt_lens` each prompt's tokens; `n` samples each of up to `max_tokens` tokens;
    `logprob` the route's entry shape, `top` its logprobs (None: not asked); `prompt_top` prompt_logprobs (None: not
    asked); `echo`: each choice repeats its prompt (with its logprobs when asked); `prompt_entries_per_choice`: the
    prompt logprobs are in every choice (vLLM's completions and chat), else once per prompt (/generate's sample 0)."""
    lens = list(prompt_lens)
    prompts, tokens = len(lens), sum(lens)
    per_token = TEXT_BYTES + entry_bytes(logprob, top)
    output = prompts * n * (CHOICE_BYTES + max_tokens * per_token)
    prompt = tokens * n * per_token if echo else 0
    if prompt_top is not None:
        prompt += tokens * (n if prompt_entries_per_choice else 1) * entry_bytes(PROMPT_LOGPROB, prompt_top)
    return Estimate(output, prompt)


def check(limits, est: Estimate, fields: str, streamable: bool = True,
          params: tuple[str, str] = ("max_tokens", "prompt_logprobs")) -> None:
    """HttpFieldError (400) when `est` is over --max-answer-bytes: it names `fields` (what makes the answer: the
    request's own names), the estimate and the flag, and suggests stream=true where that would take it; its `param`
    is params[0] when the generated tokens are most of it, else params[1] (the route's names)."""
    budget = limits.max_answer_bytes
    if est.total <= budget:
        return
    output_heavy = est.output >= est.prompt
    param = params[0] if output_heavy else params[1]
    hint = ("ask stream=true (a streamed answer is sent as it comes), or fewer"
            if streamable and output_heavy and est.prompt <= budget else "ask fewer")
    raise HttpFieldError(param, f"the answer to this request would be up to {est.total} bytes ({fields}; "
                                f"{est.output} bytes of generated tokens, {est.prompt} of prompt tokens): at most "
                                f"{budget} bytes are answered whole (--max-answer-bytes); {hint} prompts, samples, "
                                "tokens or logprobs.")


__all__ = ["CHAT_LOGPROB", "COMPLETIONS_LOGPROB", "Estimate", "GENERATE_LOGPROB", "PROMPT_LOGPROB",
           "TOKEN_GENERATE_LOGPROB", "check", "entry_bytes", "estimate"]
