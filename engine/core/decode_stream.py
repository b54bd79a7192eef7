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
    """One request's DecodeStream over the tokenizer's Rust backend.

    `spaces_between_special_tokens=False` (SamplingParams', with skip_special_tokens=False) writes an added token
    that follows another as its bare content, without the space a decoder may put before it (vLLM's fast
    detokenizer's rule; a byte-level BPE or Metaspace decoder puts none, so there it changes nothing)."""

    def __init__(self, backend, skip_special_tokens: bool, context: Sequence[int],
                 spaces_between_special_tokens: bool = True):
        self._backend = backend
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        for tid in context:  # primed: their text is the prompt's, not output
            self._stream.step(backend, tid)
        # id -> content of the added tokens, only when their spaces are to be dropped; None otherwise (the usual).
        self._added: dict[int, str] | None = None
        self._last_added = False
        if not (skip_special_tokens or spaces_between_special_tokens):
            added = {tid: tok.content for tid, tok in backend.get_added_tokens_decoder().items()}
            self._added = added or None

    def step(self, ids: Sequence[int]) -> str | None:
        """The text `ids` release (possibly ""), or None when the stream refused them (the caller falls back)."""
        step, backend = self._stream.step, self._backend
        try:
            if self._added is not None:
                return "".join(self._unspaced(tid, step(backend, tid)) for tid in ids)
            if len(ids) == 1:
                return step(backend, ids[0]) or ""
            return "".join(piece for tid in ids if (piece := step(backend, tid)))
        except Exception:  # noqa: BLE001  (DecodeStream's InvalidPrefix and friends: the Python window takes over)
            return None

    def _unspaced(self, tid: int, piece: str | None) -> str:
        content = self._added.get(tid) if self._added is not None else None
        if content is not None and self._last_added:
            piece = content
        self._last_added = content is not None
        return piece or ""


def stream_decoder(tokenizer, skip_special_tokens: bool, context: Sequence[int],
                   spaces_between_special_tokens: bool = True) -> StreamDecoder | None:
    """A StreamDecoder for `tokenizer` where it has a Rust backend and decodes without a clean-up pass; else None."""
    if getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return None
    backend = getattr(tokenizer, "backend", None)
    if backend is None or not hasattr(backend, "decode"):
        return None
    try:
        return StreamDecoder(backend, skip_special_tokens, context, spaces_between_special_tokens)
    except Exception:  # noqa: BLE001  (a prompt context the stream refuses: the Python window)
        return None


__all__ = ["StreamDecoder", "stream_decoder"]
