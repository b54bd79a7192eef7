"""`SamplingParams.spaces_between_special_tokens` in the Rust stream decoder (engine/core/decode_stream.py), as vLLM's
fast detokenizer has it: with skip_special_tokens=False and the flag off, an added token that follows another is
written as its bare content. The oracle is the tokenizer's own whole-text decode (which spaces them) with those
spaces taken out; a decoder that spaces its tokens (WordPiece) shows the difference, a byte-level one has none."""
from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models

from moelink.engine.core.decode_stream import StreamDecoder


def _wordpiece() -> Tokenizer:
    tok = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens([AddedToken("<a>", special=True), AddedToken("<b>", special=True)])
    return tok


def test_spaces_between_special_tokens_off_drops_the_decoders_space():
    tok = _wordpiece()
    a, b = tok.token_to_id("<a>"), tok.token_to_id("<b>")
    ids = [1, a, b, a, 0]
    spaced = StreamDecoder(tok, False, [0]).step(ids)
    assert spaced == tok.decode([0] + ids, skip_special_tokens=False)[len("hello"):] == " world <a> <b> <a> hello"
    assert StreamDecoder(tok, False, [0], spaces_between_special_tokens=False).step(ids) == " world <a><b><a> hello"
    # Skipped special tokens have no text to space: the flag changes nothing then (vLLM's rule).
    assert (StreamDecoder(tok, True, [0], spaces_between_special_tokens=False).step(ids)
            == StreamDecoder(tok, True, [0]).step(ids))
