"""`vllm.grpc.engine.VllmEngine`: the protocol the managed gateway (and other vLLM gRPC clients) speak.

Proto and stubs come from the gateway project's `smg_grpc_proto` package. What a gateway relies
on: Generate with pre-tokenized input; chunks carry *new* token ids; every
output index ends with one GenerateComplete holding finish_reason and token
counts; GetModelInfo names the model and a tokenizer directory the gateway can
read; GetTokenizer ships the same files as a zip for gateways on other hosts.
RPCs we have nothing for (Embed, profiling, KV events, FlushCache) answer
UNIMPLEMENTED, which gateways accept.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import io
import logging
import time
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import grpc
from smg_grpc_proto.generated import common_pb2, vllm_engine_pb2 as pb, vllm_engine_pb2_grpc as pb_grpc

from ..core.input_processing import kept_prompt_tokens
from ..core.llm_engine import ProcessedRequest
from ..contract.safe_text import shown
from ..contract.sampling_params import SamplingParams
from .limits import RequestLimits
from .mm_wire import media_from_proto
from ..multimodal.spec import multimodal_architecture, published_model_type
from .pd_role import kv_params_from_json, kv_params_to_json, with_role_default
from .proto_params import ProtoReading, as_sent, listed, plain, present, zero_means
from .proto_params import sampling_params_from_proto as params_from_proto
from .serving import Serving, abort_rpc, top_logprobs, wire_logprob, wire_message
from .gateway.quirks import streamed_abort_as_error
from .gateway.lora_routes import adapter_of
from .gateway.tool_calls import one_call

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VllmEngine"].full_name
SERVER_TYPE = "moelink-grpc"
try:
    MOELINK_VERSION = version("moelink")
except PackageNotFoundError:  # running from a source tree
    MOELINK_VERSION = "unknown"
# What a tokenizer bundle holds, when present (the names Hugging Face tokenizers use).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "config.json", "chat_template.jinja", "chat_template.json", "tokenizer.model", "tiktoken.model", "vocab.json",
                   "merges.txt", "added_tokens.json")


# vLLM's proto: no presence on most fields, 0 read as the default where 0 means nothing (top_p, top_k,
# repetition_penalty), as vLLM reads them.
VLLM_READING = ProtoReading(
    fields=dict(
        temperature=present("temperature", 1.0), top_p=zero_means("top_p", 1.0), top_k=plain("top_k"),
        min_p=plain("min_p"), frequency_penalty=plain("frequency_penalty"), presence_penalty=plain("presence_penalty"),
        repetition_penalty=zero_means("repetition_penalty", 1.0),
        max_tokens=present("max_tokens"),  # unset: until the context is full, as in vLLM
        min_tokens=plain("min_tokens"), stop=listed("stop"), stop_token_ids=listed("stop_token_ids"),
        ignore_eos=plain("ignore_eos"), include_stop_str_in_output=plain("include_stop_str_in_output"),
        logprobs=present("logprobs"), prompt_logprobs=present("prompt_logprobs"),
        truncate_prompt_tokens=present("truncate_prompt_tokens"),
        seed=present("seed"), skip_special_tokens=plain("skip_special_tokens"),
        # This protocol carries token ids only (the gateway detokenizes): text is needed here just to match
        # stop strings.
        detokenize=lambda sp: bool(sp.stop),
        # map<int32, float>: a bias is a float32 on the wire, read as its sender wrote it (proto_params.as_sent).
        logit_bias=lambda sp: {t: as_sent(b) for t, b in sp.logit_bias.items()} or None,
    ),
    n=zero_means("n", 1),
)


def sampling_params_from_proto(sp: pb.SamplingParams, limits: RequestLimits = RequestLimits()
                               ) -> tuple[SamplingParams, int]:
    """(engine SamplingParams, n) with vLLM's reading of unset proto3 fields; ValueError names the field."""
    return params_from_proto(sp, VLLM_READING, limits)


def output_logprobs(token_ids, logprobs, num_top) -> pb.OutputLogProbs | None:
    if num_top is None or not logprobs:
        return None
    proto = pb.OutputLogProbs()
    for tid, entry in zip(token_ids, logprobs):
        proto.token_logprobs.append(wire_logprob(entry[tid].logprob))
        proto.token_ids.append(tid)
        if num_top:
            top = top_logprobs(entry, num_top)
            proto.top_logprobs.append(pb.TopLogProbs(values=[wire_logprob(lp.logprob) for _, lp in top], token_ids=[t for t, _ in top]))
    return proto


def input_logprobs(prompt_ids, prompt_logprobs, num_top) -> pb.InputLogProbs | None:
    """RequestOutput.prompt_logprobs on the wire: a value per prompt token (none for the first), its id, and the
    top-n per position (an empty one for the first, keeping the three lists aligned)."""
    if num_top is None or prompt_logprobs is None:
        return None
    proto = pb.InputLogProbs()
    for tid, entry in zip(prompt_ids, prompt_logprobs):
        proto.token_ids.append(tid)
        if entry is None:
            proto.token_logprobs.append(pb.InputTokenLogProb())
            proto.top_logprobs.append(pb.TopLogProbs())
            continue
        proto.token_logprobs.append(pb.InputTokenLogProb(value=wire_logprob(entry[tid].logprob)))
        top = top_logprobs(entry, num_top) if num_top else []
        proto.top_logprobs.append(pb.TopLogProbs(values=[wire_logprob(lp.logprob) for _, lp in top],
                                                 token_ids=[t for t, _ in top]))
    return proto


def tokenizer_zip(model_dir: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in TOKENIZER_FILES:
            path = model_dir / name
            if path.is_file():
                zf.write(path, arcname=name)
    return buf.getvalue()


class VllmEngineServicer(pb_grpc.VllmEngineServicer):
    def __init__(self, serving: Serving):
        self.s = serving
        self._tokenizer_zip: bytes | None = None

    async def _prepare(self, rid: str, request: pb.GenerateRequest, params: SamplingParams) -> ProcessedRequest:
        if request.HasField("media_refs"):
            raise ValueError(f"media_refs is not supported: {self.s.text_only_reason()}")
        if request.extra_mm_inputs and not request.HasField("mm_inputs"):  # a second modality's batch
            raise ValueError("extra_mm_inputs is not supported without mm_inputs: the first batch goes in mm_inputs.")
        if request.HasField("kv_transfer_params"):
            raise ValueError("kv_transfer_params (the typed Mooncake message) is not supported: it cannot name the "
                             "saved KV; send kv_transfer_params_json (vLLM's JSON object) instead.")
        # smg's request has no LoRA field: the OpenAI front noted the adapter the HTTP `model` named under the
        # request's relay id (gateway/lora_routes.py). Unloaded since: refused naming the model.
        name = adapter_of(request.request_id)
        lora = self.s.adapter(name, "model") if name is not None else None
        if request.HasField("mm_inputs"):
            return await self._prepare_images(rid, request, params, lora)
        which = request.WhichOneof("input")
        # Only the kept tail is tokenized (a long text costs no more than it); process_inputs keeps the same.
        keep = kept_prompt_tokens(params, self.s.info.max_model_len)
        if which == "tokenized":
            return await self.s.prepare(rid, request.tokenized.input_ids, params, "tokenized.input_ids", keep, lora)
        if which == "text":
            return await self.s.prepare(rid, request.text, params, "text", keep, lora)
        raise ValueError("input is missing: set tokenized.input_ids (or text).")

    async def _prepare_images(self, rid: str, request: pb.GenerateRequest, params: SamplingParams,
                              lora=None) -> ProcessedRequest:
        """smg's preprocessed images and videos (engine/server/mm_wire.py: mm_inputs, and a second modality's batch
        in extra_mm_inputs) with the expanded token ids, through the engine's processor's checks
        (docs/multimodal.md)."""
        token_ids = {"image": self.s.engine.image_token_id, "video": self.s.engine.video_token_id}
        if token_ids["image"] is None:
            raise ValueError(f"mm_inputs is not supported: {self.s.text_only_reason()}")
        if request.WhichOneof("input") != "tokenized":
            raise ValueError("mm_inputs needs tokenized input (tokenized.input_ids with the placeholders expanded).")
        batches = [("mm_inputs", request.mm_inputs)] + [
            (f"extra_mm_inputs[{i}]", b) for i, b in enumerate(request.extra_mm_inputs)]
        kv = params.kv_transfer_params
        relayed = kv is not None and kv.do_remote_prefill and kv.mm_hashes is not None
        for name, batch in batches:
            if kv is not None and kv.do_remote_prefill and not batch.HasField("pixel_values") and not relayed:
                # smg's PD mode sends the decode leg its images' grids and its own hashes without the pixels: the KV
                # is keyed by moelink's hashes of the pixels, which the prefill server returns in its
                # kv_transfer_params (mm_hashes) for the router to relay (docs/multimodal.md).
                raise ValueError(f"{name}.pixel_values is missing on a decode request whose kv_transfer_params_json "
                                 "has no mm_hashes: send the pixels, or the prefill server's kv_transfer_params "
                                 "unchanged (its mm_hashes key the KV of images sent without pixels).")
        data, names = {}, {}
        for name, batch in batches:
            modality, item = media_from_proto(batch, token_ids, name, grids_alone=relayed)
            if modality in data:
                raise ValueError(f"{name} is a second {modality} batch (after {names[modality]}): one batch per "
                                 "modality.")
            data[modality], names[modality] = item, name
        prompt = {"prompt_token_ids": list(request.tokenized.input_ids), "multi_modal_data": data}
        try:
            return await self.s.prepare(rid, prompt, params, "tokenized.input_ids", lora=lora)
        except ValueError as e:  # the Python API's names for what this request calls mm_inputs
            msg = str(e)
            for modality, name in names.items():
                msg = msg.replace(f"prompt['multi_modal_data'][{modality!r}]", name)
            raise ValueError(msg.replace("prompt_token_ids", "tokenized.input_ids")) from None

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        try:
            rid = self.s.request_id(request.request_id)
            # The cheap checks first: a refused request never costs a tokenization.
            params, n = sampling_params_from_proto(request.sampling_params, self.s.limits)
            # The gateway's array of required calls, closed after one when the HTTP request said
            # parallel_tool_calls: false (gateway/quirks.py close_required_calls_after_one; the front noted it).
            structured = one_call(params.structured_outputs, request.request_id)
            if structured is not params.structured_outputs:
                params = dataclasses.replace(params, structured_outputs=structured)
            if request.HasField("kv_transfer_params_json"):
                # Prefill/decode disaggregation (engine/server/pd_role.py): validated with the rest of the params.
                params = dataclasses.replace(params, kv_transfer_params=kv_params_from_json(
                    request.kv_transfer_params_json))
            params = with_role_default(params, self.s.info.kv_role, n)
            processed = await self._prepare(rid, request, params)
            ids = processed.prompt_token_ids
            stream = self.s.run(rid, processed, n=n, client=self.s.client_of(context))
            # Non-streaming: everything per index, sent once in the GenerateComplete.
            all_ids: list[list[int]] = [[] for _ in range(n)]
            all_lps: list[list] = [[] for _ in range(n)]
            prompt_lps = None  # sample 0's (SamplingParams.sample): the first output that carries them
            async with contextlib.aclosing(stream):
                async for index, out in stream:
                    comp = out.outputs[0]
                    all_ids[index].extend(comp.token_ids)
                    if params.logprobs is not None and comp.logprobs:
                        all_lps[index].extend(comp.logprobs)
                    fresh = None
                    if out.prompt_logprobs is not None and prompt_lps is None:
                        prompt_lps = fresh = input_logprobs(ids, out.prompt_logprobs, params.prompt_logprobs)
                    if request.stream and (comp.token_ids or comp.finish_reason is None):
                        # completion_tokens of a chunk counts its own tokens (vLLM's convention: clients add them up).
                        # The prompt's logprobs ride the first chunk (the proto's convention).
                        await context.write(pb.GenerateResponse(chunk=pb.GenerateStreamChunk(
                            token_ids=comp.token_ids, prompt_tokens=len(ids), completion_tokens=len(comp.token_ids),
                            cached_tokens=out.num_cached_tokens, index=index,
                            output_logprobs=output_logprobs(comp.token_ids, comp.logprobs, params.logprobs),
                            input_logprobs=fresh)))
                    if comp.finish_reason == "error" and processed.must_load:
                        # A decode leg without pixels that cannot be served (its load failed, it was preempted:
                        # scheduler/load_only.py): an error status naming why, not a completion a router would relay
                        # as an answer.
                        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, wire_message(str(comp.stop_reason)))
                    if comp.finish_reason == "abort" and streamed_abort_as_error(request.stream,
                                                                                 self.s.registry.draining):
                        # Cut short by the shutdown: an error, not a last message (gateway/quirks.py
                        # streamed_abort_as_error: a streamed "abort" would reach the HTTP client as "stop"); an
                        # error status reaches it as an error event. (An Abort RPC's request still ends with
                        # finish_reason "abort": its caller asked for it.)
                        await context.abort(grpc.StatusCode.UNAVAILABLE, (
                            f"request {shown(request.request_id)} was cut short after {len(all_ids[index])} tokens: "
                            f"the server is shutting down; retry on another replica."))
                    if comp.finish_reason is not None:
                        # Streaming: output_ids repeat only this last delta (vLLM's convention: the
                        # gateway has the rest from the chunks); otherwise they are the whole output.
                        # completion_tokens is always the whole count.
                        out_ids = comp.token_ids if request.stream else all_ids[index]
                        lps = comp.logprobs if request.stream else all_lps[index]
                        complete = self._complete(out, comp, index, out_ids, len(all_ids[index]), len(ids),
                                                  output_logprobs(out_ids, lps, params.logprobs))
                        if prompt_lps is not None and index == 0 and not request.stream:
                            complete.input_logprobs.CopyFrom(prompt_lps)
                        await context.write(pb.GenerateResponse(complete=complete))
        except (grpc.aio.AbortError, GeneratorExit):
            raise
        except Exception as exc:
            await abort_rpc(context, exc, f"VllmEngine.Generate {shown(request.request_id)}")

    @staticmethod
    def _complete(out, comp, index, out_ids, num_generated, num_prompt, lps) -> pb.GenerateComplete:
        complete = pb.GenerateComplete(
            output_ids=out_ids, finish_reason=comp.finish_reason, prompt_tokens=num_prompt,
            completion_tokens=num_generated, cached_tokens=out.num_cached_tokens, index=index, output_logprobs=lps)
        if out.kv_transfer_params is not None:  # a prefill server: where the decode server fetches this prompt's KV
            complete.kv_transfer_params_json = kv_params_to_json(out.kv_transfer_params)
        if isinstance(comp.stop_reason, str):
            complete.matched_stop_str = comp.stop_reason
        elif isinstance(comp.stop_reason, int):
            complete.matched_token_id = comp.stop_reason
        return complete

    async def HealthCheck(self, request, context) -> pb.HealthCheckResponse:
        if not self.s.healthy:
            return pb.HealthCheckResponse(healthy=False, message=f"engine is not running: {self.s.engine.dead_error}")
        if self.s.registry.draining:
            return pb.HealthCheckResponse(healthy=False, message="draining: shutting down")
        return pb.HealthCheckResponse(healthy=True, message="healthy")

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        try:
            await self.s.abort_requested(request.request_ids)
        except ValueError as exc:
            await abort_rpc(context, exc, "VllmEngine.Abort")
        return pb.AbortResponse()

    async def GetModelInfo(self, request, context) -> pb.GetModelInfoResponse:
        s, m, tok = self.s, self.s.model, self.s.tokenizer
        pad = m.hf_config.get("pad_token_id")
        # An engine that takes images says so, as the checkpoint is published (the wrapper's model type and
        # architecture: what smg picks its image processor by); otherwise the text model it runs.
        vision = s.engine.image_token_id is not None
        model_type = published_model_type(m.model) if vision else str(m.hf_config.get("model_type", ""))
        arch = multimodal_architecture(m.model) if vision else None
        return pb.GetModelInfoResponse(
            model_path=s.model_path, tokenizer_path=s.model_path, served_model_name=s.served_model_name,
            is_generation=True, max_context_length=s.info.max_model_len, vocab_size=m.vocab_size,
            supports_vision=vision, model_type=model_type, architectures=[arch or m.architecture],
            eos_token_ids=list(s.info.eos_token_ids), pad_token_id=pad if isinstance(pad, int) else 0,
            bos_token_id=tok.bos_token_id or 0, max_req_input_len=s.info.max_model_len - 1)

    async def GetServerInfo(self, request, context) -> pb.GetServerInfoResponse:
        s = self.s
        return pb.GetServerInfoResponse(
            active_requests=len(s.registry.active), is_paused=s.engine.paused,
            last_receive_timestamp=s.registry.last_receive_time, uptime_seconds=time.time() - s.start_time,
            server_type=SERVER_TYPE, data_parallel_size=s.info.expert_parallel_size,
            kv_connector=s.info.kv_connector, kv_role=s.info.kv_role,
            kv_cache_dtype=s.info.kv_cache_dtype, block_size=s.info.block_size, model_dtype=str(s.model.dtype),
            max_num_seqs=s.info.max_num_seqs, **self._media_info())

    def _media_info(self) -> dict:
        """An engine that takes images: its per-prompt limits (video's where it takes videos: smg's sorted
        "image=8,video=2") and the encoder's input dtype, as smg reads them."""
        if self.s.engine.image_token_id is None:
            return {}
        limits = self.s.engine.multimodal_config
        videos = limits.videos if self.s.engine.video_token_id is not None else 0
        return dict(mm_item_limits=f"image={limits.images}" + (f",video={videos}" if videos else ""),
                    multimodal_encoder_dtype=str(self.s.model.dtype).removeprefix("torch."))

    async def GetLoads(self, request: pb.GetLoadsRequest, context) -> pb.GetLoadsResponse:
        s, reg = self.s, self.s.registry
        per_rank = s.rank_stats()
        loads = []
        for rank, st in enumerate(per_rank):
            if request.HasField("dp_rank") and request.dp_rank != rank:
                continue
            used = (st.num_total_blocks - st.num_free_blocks) * s.info.block_size
            loads.append(pb.SchedulerLoad(
                dp_rank=rank, num_running_reqs=st.num_running, num_waiting_reqs=st.num_waiting,
                num_total_reqs=st.num_running + st.num_waiting, num_used_tokens=used,
                max_total_num_tokens=st.num_total_blocks * s.info.block_size, token_usage=st.kv_usage,
                gen_throughput=reg.generation_throughput() / len(per_rank), cache_hit_rate=st.prefix_cache_hit_rate,
                utilization=st.num_running / s.info.max_num_seqs, max_running_requests=s.info.max_num_seqs,
                # Not yet in the engine: what this server admitted that has no token yet, split evenly.
                num_waiting_uncached_tokens=reg.queued_tokens // len(per_rank)))
        return pb.GetLoadsResponse(
            timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(), version=f"moelink {MOELINK_VERSION}",
            dp_rank_count=len(per_rank), loads=loads)

    # -- RPCs moelink has nothing behind (gateways treat UNIMPLEMENTED as "not offered") --
    async def Embed(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Embed: moelink serves generative models only.")

    async def FlushCache(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "FlushCache is not offered by moelink yet.")

    async def StartProfile(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "profiling over gRPC is not offered by moelink.")

    async def StopProfile(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "profiling over gRPC is not offered by moelink.")

    async def SubscribeKvEvents(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "KV cache events are not published by moelink yet; "
                                                           "poll GetLoads instead.")

    async def GetTokenizer(self, request, context):
        model_dir = Path(self.s.model_path)
        if self._tokenizer_zip is None:
            self._tokenizer_zip = tokenizer_zip(model_dir)
        data = self._tokenizer_zip
        digest = hashlib.sha256(data).hexdigest()
        chunk = max(1024, min(512 * 1024, self.s.config.max_message_size // 2))
        for start in range(0, len(data), chunk):
            end = min(start + chunk, len(data))
            await context.write(common_pb2.GetTokenizerChunk(data=data[start:end], sha256=digest if end == len(data) else ""))

