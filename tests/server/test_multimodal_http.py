"""Images through `moelink serve` and the openai client (issue 59, docs/multimodal.md): an `image_url` data URL in a
chat message goes through the managed smg gateway, which preprocesses it and sends VllmEngine's mm_inputs; the
answer is the Python API's, token for token, on the same prompt and image. Too many images, a huge one and bytes
that are no image are each refused with a 400 naming why. One server (about a minute of CPU with smg's start)."""
from __future__ import annotations

import base64
import io

import pytest

from tests.helpers.grpc_server import ServerProcess
from tests.helpers.net import free_port

pytestmark = pytest.mark.slow

NEW = 8


def _data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_an_image_url_gets_the_python_apis_tokens_and_bad_images_a_400(tmp_path):
    openai = pytest.importorskip("openai")
    from moelink.engine import LLM, SamplingParams
    from moelink.engine.server.gateway.supervisor import smg_executable
    from tests.helpers.mm_checkpoints import image, save_mm_checkpoint

    if smg_executable() is None:
        pytest.skip("the smg gateway (PyPI `smg`) is not installed")
    path = save_mm_checkpoint(tmp_path)
    # Black and white, at a size the processor keeps: smg's preprocessing and transformers' give the same pixels.
    img = image(1, 32, 32, binary=True)
    srv = ServerProcess(path, ["--dtype", "float64", "--num-kv-blocks", "64", "--served-model-name", "mm",
                               "--limit-mm-per-prompt", "image=1", "--mm-max-pixels", "1024",
                               "--http-port", str(free_port())])
    try:
        port = int(srv.wait_for_line(r"moelink: OpenAI API on http://127\.0\.0\.1:(\d+)/v1", 120, "the API line")
                   .group(1))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=120, max_retries=0)

        def chat(*images, text="what is here"):
            parts = [{"type": "image_url", "image_url": {"url": _data_url(i)}} for i in images]
            return client.chat.completions.create(
                model="mm", messages=[{"role": "user", "content": parts + [{"type": "text", "text": text}]}],
                max_tokens=NEW, temperature=0, extra_body={"ignore_eos": True, "skip_special_tokens": False})

        got = chat(img)
        # Two images past limit_mm_per_prompt image=1: smg refuses them itself, from the limit the engine reports
        # (GetServerInfo.mm_item_limits).
        with pytest.raises(openai.BadRequestError, match="limit-mm-per-prompt"):
            chat(img, image(2, 32, 32))
        with pytest.raises(openai.BadRequestError, match=r"max_pixels=1024"):
            chat(image(3, 96, 96))  # resized by the processor to 64 x 64: 4096 pixels past --mm-max-pixels 1024
        with pytest.raises(openai.BadRequestError, match="image decode error"):  # not an image: smg's own 400
            client.chat.completions.create(model="mm", max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"no").decode()}},
                {"type": "text", "text": "x"}]}])
        assert chat(img).choices[0].message.content == got.choices[0].message.content  # still serving
    finally:
        srv.stop()
        srv.close()
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(path).apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is here"}]}],
        tokenize=False, add_generation_prompt=True)
    out = LLM(path, dtype="float64", num_kv_blocks=64).generate(
        {"prompt": text, "multi_modal_data": {"image": img}},
        SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, skip_special_tokens=False), use_tqdm=False)[0]
    assert got.choices[0].message.content == out.outputs[0].text
    assert got.usage.prompt_tokens == len(out.prompt_token_ids) and got.usage.completion_tokens == NEW
