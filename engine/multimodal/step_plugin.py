"""Images and videos as a step plug-in (engine/contract/step_plugin.py): the rank's ImageRunner (rank_side.py) holds
the requests' items; a step holding any plans its image rows and 3-D positions (before the computed counts move on:
the rows are read by prompt position), the forward splices them in, and the step's vision-tower counts go into its
StepStats. A decode graph takes no image rows or 3-D positions (Qwen3.5; Kimi K2.5's 1-D decode steps carry nothing,
but graphs with its images are untested on a GPU), so a model serving images runs eagerly."""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from ..contract.step_plugin import ForwardExtras, HeldRequest, RankModel, StepBatch, StepPlugin, StepWork
from ..contract.forward_inputs import ImageSplice
from .rank_side import ImageRunner, make_image_runner

if TYPE_CHECKING:
    from moelink.scheduler.outputs import ModelRunnerOutput, NewRequestData

    from ..config.worker_config import WorkerConfig


class _Splice(StepWork[None]):
    graphable = False

    def __init__(self, images: ImageSplice | None, counts: tuple[int, int, float]):
        self.images, self.counts = images, counts

    def forward_extras(self) -> ForwardExtras:
        if self.images is None:
            return {}
        return {"images": self.images}

    def collect(self, payload: None, out: ModelRunnerOutput) -> None:
        if out.stats is not None:
            encoded, hits, seconds = self.counts
            out.stats = replace(out.stats, images_encoded=encoded, encoder_cache_hits=hits, encoder_s=seconds)


class ImagesPlugin(StepPlugin):
    name = "images"
    allows_graphs = False

    def __init__(self, images: ImageRunner):
        self.images = images

    def admit(self, new: NewRequestData, state: HeldRequest) -> None:
        if new.multimodal is not None:
            self.images.add(new.req_id, new.multimodal, new.prompt_token_ids)

    def release(self, req_id: str, preempted: bool) -> None:
        self.images.drop(req_id)  # a preempted one is resent whole when it resumes (its items from the encoder cache)

    def reset(self) -> None:
        self.images.clear()

    def plan(self, batch: StepBatch) -> StepWork | None:
        if not self.images.holds_images():
            return None
        planned = self.images.plan([(st.req_id, st.num_computed_tokens, n)
                                    for st, n in zip(batch.states, batch.query_lens)])
        return _Splice(planned, self.images.take_counts()) if planned is not None else None


class ImagesFeature:
    """On for a multimodal checkpoint with images or videos on (MultimodalConfig.limit_mm_per_prompt) and real
    weights: its vision tower is loaded with the rank."""

    name = ImagesPlugin.name

    def make(self, rank: RankModel, config: WorkerConfig) -> StepPlugin | None:
        images = make_image_runner(rank.cfg, config.multimodal, rank.device, rank.load_format)
        return ImagesPlugin(images) if images is not None else None


FEATURE = ImagesFeature()
