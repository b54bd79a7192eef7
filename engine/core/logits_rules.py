"""Request intake for vLLM's logits processors (SamplingParams.logit_bias, allowed_token_ids, bad_words): their
token ids checked against the model's vocabulary, and each bad word tokenized into the token-id sequences the rank's
sampler keeps the output from completing (engine/rank/logits_rules.py applies them), as vLLM's
`SamplingParams.update_from_tokenizer` does: each word with and without a leading space, the spaced form kept only
when it is a different word of as many tokens."""
from __future__ import annotations

import copy

from ..contract.safe_text import shown
from ..contract.sampling_params import SamplingParams
from .no_tokenizer import NoTokenizer

# vLLM's VLLM_MAX_NUM_BAD_WORDS default: token sequences after tokenization.
MAX_BAD_WORDS = 128


def checked_logits_rules(engine, params: SamplingParams) -> SamplingParams:
    """`params` with `bad_words_token_ids` filled (a copy: a caller's parameters may be shared by many prompts);
    ValueError naming the field for an id outside the vocabulary or what this engine cannot apply them with."""
    if not (params.logit_bias or params.allowed_token_ids is not None or params.bad_words):
        return params
    vocab = engine.config.model.vocab_size
    if engine.config.speculative is not None:
        # The verify step samples its positions without the rules (engine/spec/verify.py): refused, not ignored.
        name = "logit_bias" if params.logit_bias else "allowed_token_ids" if params.allowed_token_ids else "bad_words"
        raise ValueError(f"SamplingParams.{name} is not supported with speculative decoding: serve without "
                         "--speculative-config to use logit_bias, allowed_token_ids or bad_words.")
    # max() first (C speed): a list is looked at entry by entry only to name the ids of a refusal.
    if params.logit_bias and max(params.logit_bias) >= vocab:
        bad = [t for t in params.logit_bias if t >= vocab]
        if bad:
            raise ValueError(f"SamplingParams.logit_bias has token ids {shown(bad[:8])} outside the vocabulary: token "
                             f"ids must be in [0, {vocab}).")
    if params.allowed_token_ids is not None and max(params.allowed_token_ids) >= vocab:
        bad = [t for t in params.allowed_token_ids if t >= vocab]
        if bad:
            raise ValueError(f"SamplingParams.allowed_token_ids has token ids {shown(bad[:8])} outside the "
                             f"vocabulary: token ids must be in [0, {vocab}).")
    if not params.bad_words:
        return params
    out = copy.copy(params)
    out.bad_words_token_ids = bad_words_token_ids(engine.tokenizer, params.bad_words, vocab)
    return out


def bad_words_token_ids(tokenizer, words: list[str], vocab: int) -> list[list[int]]:
    """vLLM's tokenization of bad words (SamplingParams.update_from_tokenizer, vLLM 0.32)."""
    if isinstance(tokenizer, NoTokenizer):
        raise ValueError("SamplingParams.bad_words needs a tokenizer: this engine serves token ids only; give the "
                         "banned tokens' ids with logit_bias (a bias of -100) instead.")
    out: list[list[int]] = []
    for word in words:
        for prefix in ("", " "):
            ids = tokenizer.encode(prefix + word.lstrip(), add_special_tokens=False)
            if not ids:
                if not prefix:
                    raise ValueError(f"SamplingParams.bad_words entry {shown(word)} tokenizes to no token: each "
                                     "word must tokenize to at least one token.")
                continue
            # The spaced form counts when it is another word of as many tokens (vLLM's rule).
            if not prefix or (ids[0] != out[-1][0] and len(ids) == len(out[-1])):
                out.append(ids)
                if len(out) > MAX_BAD_WORDS:
                    raise ValueError(f"SamplingParams.bad_words makes {len(out)} token sequences: at most "
                                     f"{MAX_BAD_WORDS} (each word counts once, twice with its spaced form).")
    bad = [t for ids in out for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"SamplingParams.bad_words tokenize to ids {shown(bad[:8])} outside the model's vocabulary "
                         f"[0, {vocab}).")
    return out


__all__ = ["MAX_BAD_WORDS", "bad_words_token_ids", "checked_logits_rules"]
