"""Writes docstrings.jsonl, the items of the lm-eval tasks beside it, from the built-in model's own corpus.

    .venv/bin/python benchmarks/peer/lm_eval_tasks/make_items.py        # moelink's python (reads the stdlib with ast)

Each item is one public stdlib definition and the first sentence of its docstring, the text the built-in model was
trained on (engine/tools/builtin_corpus.py: a ChatML turn "What does NAME do?" answered by the summary line):
- `question`: "What does NAME do?"; `summary`: the answer, its final period dropped;
- `first3`: the summary's first three words (the generate_until tasks' target);
- `choices` / `answer`: the summary and three other items' summaries, in a seeded order (the multiple-choice task).
Chosen with a fixed seed: 24 of all such definitions, and 8 whose summary begins "Return a list of" or "Return the
current" (the built-in model answers nearly every question with "Return a list of all the current file.": without
these the generate tasks' score would be 0 on both engines, and a score of 0 cannot show a difference). The corpus is
the running Python's stdlib: another Python version may pick other items; the committed file is the one measured.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from moelink.engine.tools.builtin_corpus import stdlib_docs

OUT = Path(__file__).resolve().parent / "docstrings.jsonl"
SEED = 79
N_RANDOM, N_ANSWERABLE, N_CHOICES = 24, 8, 4
ANSWERABLE = re.compile(r"Return (a list of|the current) ")
SENTENCE = re.compile(r"[A-Z][A-Za-z ,'-]+\.")  # one plain sentence: no code, no second sentence


def candidates() -> list[tuple[str, str]]:
    """(dotted name, summary sentence) of each public definition whose summary is one short plain sentence."""
    out, seen = [], set()
    for doc in stdlib_docs():
        name = f"{doc.module}.{doc.qualname}"
        if not doc.qualname or any(p.startswith("_") for p in name.split(".")):
            continue
        summary = doc.paragraphs[0]
        if not SENTENCE.fullmatch(summary) or not 4 <= len(summary.split()) <= 12 or summary in seen:
            continue
        seen.add(summary)
        out.append((name, summary))
    return out


def items(pool: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    answerable = [c for c in pool if ANSWERABLE.match(c[1])]
    others = [c for c in pool if not ANSWERABLE.match(c[1])]
    picked = rng.sample(others, N_RANDOM) + rng.sample(answerable, N_ANSWERABLE)
    rng.shuffle(picked)
    rows = []
    for name, summary in picked:
        wrong = rng.sample([s for _, s in picked if s != summary], N_CHOICES - 1)
        answer = rng.randrange(N_CHOICES)
        choices = [s.rstrip(".") for s in wrong[:answer] + [summary] + wrong[answer:]]
        text = summary.rstrip(".")
        rows.append({"name": name, "question": f"What does {name} do?", "summary": text,
                     "first3": " ".join(text.split()[:3]), "choices": choices, "answer": answer})
    return rows


def main() -> None:
    rows = items(candidates(), random.Random(SEED))
    OUT.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} items to {OUT}")


if __name__ == "__main__":
    main()
