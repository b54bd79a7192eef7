"""Images into Qwen3.5-MoE (docs/multimodal.md): the vision tower's time per image, and what the encoder cache and
the image-keyed prefix cache save on the time to first token.

    python -m moelink.benchmarks.mm_encoder [--side 448] [--repeats 3] [--device auto|cpu|cuda] [--json PATH]

One engine (on the GPU where there is one, as the engine's `device="auto"` picks; `--device cpu` keeps it on CPU;
the GPU plan's `mm` step runs it there: benchmarks/gpu_session/mm.sh) with a small random Qwen3.5-MoE multimodal checkpoint (engine/models/qwen3_next/tiny.
save_multimodal) whose vision tower is sized to cost something (4 blocks of hidden 256 at Qwen3.5's patch 16, merge
2: a 448 x 448 image is 784 patches, 196 placeholder tokens). Each TTFT is a `generate` of one token, best of
`--repeats`, each repeat with images of its own:
  - new image: a prompt with an image no request has sent (the tower encodes it, the whole prompt is computed);
  - same image, new text: the same image behind another prefix (the encoder cache answers; the prompt is computed);
  - same prompt and image: again (a prefix-cache hit under the image's salt; nothing is encoded).
The tower's own time per image (`EncoderCache.encode_s / misses`) and the driver's processor time per image (the
checkpoint's processor and the 3-D positions, best of `--repeats`) are saved beside them. On CUDA the cache's
time is the host's (the tower's kernels run on after it returns): `tower_s_per_image` times the tower alone on the
last image's patches between device synchronizations, best of `--repeats`.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.models.qwen3_next.tiny import save_multimodal

ONE = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VISION = dict(depth=4, hidden_size=256, num_heads=4, intermediate_size=1024, out_hidden_size=32)


def _image(seed: int, side: int):
    from PIL import Image

    return Image.fromarray((np.random.default_rng(seed).random((side, side, 3)) * 255).astype(np.uint8))


def _ttft(llm, text: str, img) -> float:
    t0 = time.perf_counter()
    llm.generate({"prompt": text, "multi_modal_data": {"image": img}}, ONE, use_tqdm=False)
    return time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(side: int, repeats: int, device: str = "auto") -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = save_multimodal(Path(d), vision=VISION, patch_size=16, max_pixels=side * side)
        llm = LLM(path, dtype="float32", num_kv_blocks=256, block_size=16, max_num_batched_tokens=1024,
                  device=device)
        runner = llm.engine.executor.worker.runner
        cache = runner.plugin("images").images.cache
        _ttft(llm, f"warm {IMAGE} up", _image(10_000, side))  # first-call costs out of the numbers
        cache.encode_s, cache.misses, cache.hits = 0.0, 0, 0
        times: dict[str, list[float]] = {"new_image": [], "same_image_new_text": [], "same_prompt_and_image": []}
        for r in range(repeats):
            img = _image(r, side)
            times["new_image"].append(_ttft(llm, f"describe {IMAGE} please {r}", img))
            times["same_image_new_text"].append(_ttft(llm, f"now tell {IMAGE} again {r}", img))
            times["same_prompt_and_image"].append(_ttft(llm, f"describe {IMAGE} please {r}", img))
        proc_s = []
        for r in range(repeats):  # the driver's share: the checkpoint's processor (PIL resize, patches), the 3-D rope
            t0 = time.perf_counter()
            mm = llm.engine.multimodal.process(IMAGE, {"image": _image(r, side)})[1]
            proc_s.append(time.perf_counter() - t0)
        grid = mm.image_grid_thw[0]
        tower_s = []
        for _ in range(repeats):  # the tower alone, its kernels waited for (on CUDA the cache's clock stops early)
            _sync(runner.device)
            t0 = time.perf_counter()
            runner.plugin("images").images.tower.encode(mm.pixel_values_PC, grid)
            _sync(runner.device)
            tower_s.append(time.perf_counter() - t0)
        return {"side": side, "patches": grid[0] * grid[1] * grid[2], "image_tokens": grid[0] * grid[1] * grid[2] // 4,
                "encoder_s_per_image": cache.encode_s / max(cache.misses, 1), "encoder_misses": cache.misses,
                "encoder_hits": cache.hits, "tower_s_per_image": min(tower_s), "processor_s_per_image": min(proc_s), "ttft_s": {k: min(v) for k, v in times.items()},
                "vision": VISION, "device": str(runner.device),
                "device_name": torch.cuda.get_device_name(runner.device) if runner.device.type == "cuda" else "cpu",
                "host": platform.node(), "python": sys.version.split()[0]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", type=int, default=448)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="the engine's device (auto: the GPU where there is one)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    res = run(a.side, a.repeats, a.device)
    print(json.dumps(res, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
