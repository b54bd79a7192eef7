"""The features a rank's step takes as plug-ins (engine/contract/step_plugin.py), in the order their work runs at
each point of a step (KV loads first, before the adapters' slots and given routing; KV saves after the others).
Each feature is one package with a `FEATURE` that makes its plug-in when the worker's configuration turns it on; a
new feature is its package plus one line here. The cluster hands the list to every Worker (as it hands speculative
decoding's implementation), so the rank imports no feature: engine/rank/worker.py makes their plug-ins
(engine/contract/step_plugin.step_plugins) from the loaded model."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..grammar.step_plugin import FEATURE as GRAMMAR
from ..kv_transfer.step_plugin import FEATURE as KV_TRANSFER
from ..lora.rank.plugin import FEATURE as LORA
from ..multimodal.step_plugin import FEATURE as IMAGES
from ..prompt_logprobs.plugin import FEATURE as PROMPT_LOGPROBS
from ..rl.routed_experts import FEATURE as ROUTED_EXPERTS
from ..rl.routing_replay import FEATURE as ROUTING_REPLAY
from ..spec.step_plugin import FEATURE as SPECULATIVE

if TYPE_CHECKING:
    from ..contract.step_plugin import StepFeature

STEP_FEATURES: tuple[StepFeature, ...] = (
    KV_TRANSFER,
    SPECULATIVE,
    LORA,
    IMAGES,
    ROUTING_REPLAY,
    ROUTED_EXPERTS,
    PROMPT_LOGPROBS,
    GRAMMAR,
)


__all__ = ["STEP_FEATURES"]
