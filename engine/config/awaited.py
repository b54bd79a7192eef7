"""Models announced and served elsewhere whose definition is not in the locked transformers: a checkpoint of one is
refused saying so, and which transformers it waits for, rather than as an unknown architecture.

moelink serves a family token for token against transformers' own model (its tests' oracle and its config reader's
source of truth), so a family waits for the transformers release that implements it; vLLM serves these from its own
model code. No torch here: config reading imports this.
"""
from __future__ import annotations

from dataclasses import dataclass

# The transformers release moelink is locked to and tested against (requirements/, docs/dependencies.md).
LOCKED_TRANSFORMERS = "5.24"


@dataclass(frozen=True)
class Awaited:
    name: str  # the model as its makers name it
    what: str  # what it adds that transformers must define first
    model_types: tuple[str, ...]  # config.json model_type spellings
    architectures: tuple[str, ...]  # config.json architectures spellings


AWAITED: tuple[Awaited, ...] = (
    # DeepSeek-V4.1 and Kimi K3, once here, are served: engine/models/deepseek_v41/ (its config read by the family's
    # own class until a transformers release defines it) and engine/models/kimi_k3/ (its text_config read by
    # transformers' KimiLinearConfig).
    # LongCat-Flash-Lite (vLLM's LongcatFlashNgramForCausalLM): LongCat-Flash's layers (transformers 5.24 defines
    # those: engine/models/longcat_flash/) beside an n-gram embedding that no transformers release defines; the hashed
    # n-gram block moelink has (engine/models/ngram_embedding.py) is Qwen3.8-Flash-Next's PLE, another hash and
    # layout. Its model_type is not named here: its files may spell LongCat-Flash's own.
    Awaited("LongCat-Flash-Lite", "n-gram embedding tables", (), ("LongcatFlashNgramForCausalLM",)),
)


def awaited_refusal(raw: dict) -> str | None:
    """The refusal for a config.json of an awaited model (its architectures or model_type), else None."""
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    for a in AWAITED:
        if model_type in a.model_types or any(x in a.architectures for x in archs):
            return (f"config.json architectures={archs!r} (model_type={model_type!r}) is {a.name}, which transformers "
                    f"{LOCKED_TRANSFORMERS} (the version moelink is locked to and tested against) does not define: "
                    f"its {a.what} come with the first transformers release after {LOCKED_TRANSFORMERS} that "
                    f"implements {a.name}; moelink serves it once its lock moves to that release.")
    return None


__all__ = ["AWAITED", "Awaited", "LOCKED_TRANSFORMERS", "awaited_refusal"]
