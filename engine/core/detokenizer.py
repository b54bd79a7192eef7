r"""Incremental detokenization: token ids in, text deltas out, stop strings cut.

Decoding the whole output every step costs O(n) per token (O(n^2) per
request); instead, as in vLLM, we decode only a short window of trailing tokens:

    ids:  ... | prefix_offset ........ read_offset ........ end |
                \___ prefix_text ___/
                \______________ new_text _________________/

`prefix_text` was already emitted; the delta is `new_text[len(prefix_text):]`.
Decoding both from the same `prefix_offset` keeps context-dependent decoders
(SentencePiece's leading-space rule) consistent. A byte-level BPE token can end
inside a multi-byte UTF-8 character; the decoder then yields U+FFFD, so such a
window is held back until a later token completes the character.
"""
from __future__ import annotations

from typing import Optional, Sequence

from .tokenizer import Tokenizer

# How many prompt tokens seed the first window (vLLM uses the same number):
# enough context for leading-space rules, small enough to be cheap.
_INITIAL_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text deltas for one request.

    `update(new_ids)` returns the text that became final with those ids;
    `flush()` returns whatever was still held back once generation ends. Once
    a stop string matched, `stop_reason` holds it and later calls return "".
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ) -> None:
        if isinstance(stop, str):
            stop = [stop]
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop={list(stop)!r} is invalid: stop strings must be non-empty strings.")
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        # As in vLLM, stop strings (like EOS and stop ids) do not end a request
        # before min_tokens tokens: only text decoded after them is searched.
        self.min_tokens = min_tokens
        self.stop_reason: Optional[str] = None
        self.output_token_ids: list[int] = []
        # A suffix shorter than the longest stop string may still grow into one.
        self._max_stop_len = max((len(s) for s in self.stop), default=0)

        context = list(prompt_token_ids[-_INITIAL_CONTEXT_TOKENS:])
        # A prompt ending inside a UTF-8 character would make our first
        # deltas depend on the prompt's bytes; start without context then.
        if context and self._decode(context).endswith(_REPLACEMENT_CHAR):
            context = []
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._text = ""          # decoded output text (cut at a stop string once one matched)
        self._emitted_len = 0    # how much of _text the caller has received

    @property
    def output_text(self) -> str:
        """All output text decoded so far, including text still held back."""
        return self._text

    @property
    def finished(self) -> bool:
        return self.stop_reason is not None

    def update(self, new_token_ids: Sequence[int]) -> str:
        """Append generated ids; return the new text that is safe to show."""
        if self.stop_reason is not None:
            return ""
        self.output_token_ids.extend(new_token_ids)
        self._ids.extend(new_token_ids)
        self._text += self._decode_window(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """End of generation: return text held back for UTF-8 or stop-string reasons."""
        if self.stop_reason is not None:
            return ""
        self._text += self._decode_window(final=True)
        return self._release(final=True)

    # ---- internals -------------------------------------------------------

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_window(self, final: bool) -> str:
        if len(self._ids) == self._read_offset:
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        # Equal length: the new ids were skipped specials (nothing to show yet).
        # Trailing U+FFFD: a character is still incomplete; wait for its bytes.
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_REPLACEMENT_CHAR) and not final):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        # Drop ids before the window so memory stays bounded on long outputs.
        if self._prefix_offset > 0:
            del self._ids[:self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return new_text[len(prefix_text):]

    def _release(self, final: bool) -> str:
        start = self._emitted_len
        if self.stop and len(self.output_token_ids) > self.min_tokens:
            match = self._find_stop(start)
            if match is not None:
                pos, stop_str = match
                end = pos + len(stop_str) if self.include_stop_str_in_output else pos
                self.stop_reason = stop_str
                self._text = self._text[:end]
                self._emitted_len = end
                return self._text[start:end]
        end = len(self._text) if final else len(self._text) - self._held_suffix_len()
        end = max(end, start)
        self._emitted_len = end
        return self._text[start:end]

    def _find_stop(self, start: int) -> Optional[tuple[int, str]]:
        # Text before `start` was released, so no stop string can begin there:
        # any stop string's start stayed in the held-back suffix until now.
        best: Optional[tuple[int, str]] = None
        for s in self.stop:
            pos = self._text.find(s, start)
            if pos < 0:
                continue
            # Earliest match wins; at the same position the longer string.
            if best is None or pos < best[0] or (pos == best[0] and len(s) > len(best[1])):
                best = (pos, s)
        return best

    def _held_suffix_len(self) -> int:
        # Longest tail of the text that is a proper prefix of some stop
        # string; holding exactly that (not always max_len - 1 characters)
        # keeps streaming latency low while never releasing a stop's start.
        text = self._text
        for k in range(min(self._max_stop_len - 1, len(text) - self._emitted_len), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
