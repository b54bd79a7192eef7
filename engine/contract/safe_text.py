"""User values in log lines and error messages: escaped, and cut to a bounded length.

A client chooses request ids, stop strings and prompts. Written into a text
log as they are, a newline in one starts a forged log line, and a 30 MB id
makes one 30 MB line per refused request; repeated whole in an error status,
10,000 stop strings make a 240 KB message. `shown` is the one way such a value
reaches a log or a status: every character that is not printable (newlines,
escape sequences, U+2028, ...) is written as its Python escape, and at most
`limit` characters are kept, with a note of how many were cut. Its cost is
bounded by `limit`, not by the size of the value.
"""
from __future__ import annotations

import reprlib

MAX_SHOWN_CHARS = 200  # of one user value
MAX_MESSAGE_CHARS = 1000  # of a whole error message (several values and the sentence around them)
MAX_LOG_LINE_CHARS = 4000  # of one log message, whatever went into it

# repr with a bounded cost: long strings and lists are cut before they are rendered.
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = MAX_SHOWN_CHARS + 2
_repr.maxlist = _repr.maxtuple = _repr.maxset = _repr.maxfrozenset = _repr.maxdict = 8
_repr.maxlevel = 2


def _escape(text: str) -> str:
    if text.isprintable():  # the usual case, at C speed
        return text
    # repr of one character is its escape ('\n' -> \n, '\x1b' -> \x1b, '\u2028' -> \u2028).
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def shown(value, limit: int = MAX_SHOWN_CHARS, quote: bool = True) -> str:
    """`value` as it may appear in a log line or an error message: at most `limit` characters, plus a note
    of the full size when it was cut.

    quote=True: a repr (strings in quotes, lists as lists), as in "stop=['a', 'b']";
    quote=False: a string as it is (escaped), as in "request_id=abc".
    """
    if isinstance(value, str):
        head = value[:limit]
        text = repr(head) if quote else _escape(head)
        note = f"{len(value)} characters in all"
        cut = len(value) > limit or len(text) > limit + 2
    else:
        # reprlib cuts long lists ("[1, 2, ...]") and strings inside them; repr of a str is already escaped.
        text = _escape(_repr.repr(value))
        sized = isinstance(value, (list, tuple, set, frozenset, dict))
        note = f"{len(value)} items" if sized else f"{len(text)} characters"
        cut = len(text) > limit or (sized and len(value) > _repr.maxlist)
    return f"{text[:limit]}... ({note})" if cut else text
