"""Incremental detokenization in Rust: `tokenizers`' DecodeStream behind the output processor's window
(output_processor.IncrementalDetokenizer), one call per generated token.

DecodeStream keeps the same window as the Python one (the ids since the last emitted text, and the text those
decoded to): a token's text is released once it extends that text and does not end in U+FFFD (an unfinished UTF-8
character), special tokens skipped as asked. It is primed with the same few prompt tokens as the Python window, so
a SentencePiece tokenizer's leading space on the first output token comes out the same. Used when the tokenizer is a
`tokenizers` one whose decode needs no clean-up pass (`clean_up_tokenization_spaces`: applied to whole texts, not a
stream's pieces); a stream it refuses (DecodeStream raises on a window whose new text no longer starts with the old:
ids no tokenizer would produce) goes back to the Python window (`step` returns None).
"""
from __future__ import annotations

from typing import Sequence

from tokenizers.decoders import DecodeStream  # tokenizers >= 0.21 (pyproject.toml)


class StreamDecoder:
    """One request's DecodeStream over the tokenizer's Rust backend."""

    def __init__(self, backend, skip_special_tokens: bool, context: Sequence[int]):
        self._backend = backend
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        for tid in context:  # primed: their text is the prompt's, not output
            self._stream.step(backend, tid)

    def step(self, ids: Sequence[int]) -> str | None:
        """The text `ids` release (possibly ""), or None when the stream refused them (the caller falls back)."""
        step, backend = self._stream.step, self._backend
        try:
            if len(ids) == 1:
                return step(backend, ids[0]) or ""
            return "".join(piece for tid in ids if (piece := step(backend, tid)))
        except Exception:  # noqa: BLE001  (DecodeStream's InvalidPrefix and friends: the Python window takes over)
            return None


def stream_decoder(tokenizer, skip_special_tokens: bool, context: Sequence[int]) -> StreamDecoder | None:
    """A StreamDecoder for `tokenizer` where it has a Rust backend and decodes without a clean-up pass; else None."""
    if getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return None
    backend = getattr(tokenizer, "backend", None)
    if backend is None or not hasattr(backend, "decode"):
        return None
    try:
        return StreamDecoder(backend, skip_special_tokens, context)
    except Exception:  # noqa: BLE001  (a prompt context the stream refuses: the Python window)
        return None


__all__ = ["StreamDecoder", "stream_decoder"]
