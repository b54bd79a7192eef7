"""`moelink.v1.Generation`: the native streaming service (engine/server/protos/moelink_v1.proto)."""
from __future__ import annotations

import contextlib
import dataclasses
import time

import grpc
import numpy as np

from ..core.llm_engine import ProcessedRequest
from ..core.no_tokenizer import NoTokenizer
from ..core.outputs import CompletionOutput, RequestOutput
from ..contract.safe_text import shown
from ..contract.sampling_params import SamplingParams
from .gen import moelink_v1_pb2 as pb
from .gen import moelink_v1_pb2_grpc as pb_grpc
from .limits import RequestLimits
from .proto_params import ProtoReading, listed, plain, present
from .pd_role import kv_params_from_json, kv_params_to_json, with_role_default
from .proto_params import sampling_params_from_proto as params_from_proto
from .serving import Serving, abort_rpc, optional, top_logprobs, wire_logprob

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
_DEFAULTS = SamplingParams()  # unset optional fields read these
_d = _DEFAULTS
# moelink.v1: proto3 presence marks what the client set; unset reads the engine's defaults.
NATIVE_READING = ProtoReading(
    fields=dict(
        temperature=present("temperature", _d.temperature), top_p=present("top_p", _d.top_p),
        top_k=present("top_k", _d.top_k), min_p=present("min_p", _d.min_p),
        repetition_penalty=present("repetition_penalty", _d.repetition_penalty),
        presence_penalty=present("presence_penalty", _d.presence_penalty),
        frequency_penalty=present("frequency_penalty", _d.frequency_penalty),
        seed=present("seed"),
        max_tokens=lambda sp: None if sp.unlimited_tokens else optional(sp, "max_tokens", _d.max_tokens),
        min_tokens=plain("min_tokens"), stop=listed("stop"), stop_token_ids=listed("stop_token_ids"),
        ignore_eos=plain("ignore_eos"), include_stop_str_in_output=plain("include_stop_str_in_output"),
        logprobs=present("logprobs"), skip_special_tokens=present("skip_special_tokens", True),
        return_routed_experts=plain("return_routed_experts"),
    ),
    n=present("n", 1),
)


def sampling_params_from_proto(sp: pb.SamplingParams, limits: RequestLimits = RequestLimits()
                               ) -> tuple[SamplingParams, int]:
    """(engine SamplingParams, n); ValueError naming the field on bad values (lists checked by length first)."""
    return params_from_proto(sp, NATIVE_READING, limits)


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, serving: Serving):
        self.s = serving

    async def _prepare(self, rid: str, request: pb.GenerateRequest, params: SamplingParams) -> ProcessedRequest:
        which = request.WhichOneof("input")
        # The adapter by its served name (engine/server/lora_names.py); empty: the base model.
        lora = self.s.adapter(request.lora_name, "lora_name") if request.lora_name else None
        if which == "prompt":
            return await self.s.prepare(rid, request.prompt, params, "prompt", lora=lora)
        if which == "prompt_token_ids":
            return await self.s.prepare(rid, request.prompt_token_ids.ids, params, "prompt_token_ids", lora=lora)
        raise ValueError("prompt is missing: set either prompt (text) or prompt_token_ids.")

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        # A coroutine writing with context.write (not an async generator): a cancelled or
        # disconnected call raises CancelledError right here, and closing `stream` aborts the request.
        try:
            rid = self.s.request_id(request.request_id)
            # The cheap checks first: a refused request never costs a tokenization.
            params, n = sampling_params_from_proto(request.sampling_params, self.s.limits)
            if request.HasField("kv_transfer_params_json"):  # prefill/decode disaggregation (server/pd_role.py)
                params = dataclasses.replace(params, kv_transfer_params=kv_params_from_json(
                    request.kv_transfer_params_json))
            params = with_role_default(params, self.s.info.kv_role, n)
            if isinstance(self.s.tokenizer, NoTokenizer) and not params.stop:
                # No tokenizer (a bare dummy model): token ids out, empty text; this protocol cannot ask for that.
                params = dataclasses.replace(params, detokenize=False)
            stream = self.s.run(rid, await self._prepare(rid, request, params), n=n, client=self.s.client_of(context))
            counts = [0] * n
            async with contextlib.aclosing(stream):
                async for index, out in stream:
                    comp = out.outputs[0]
                    counts[index] += len(comp.token_ids)
                    await context.write(self._message(rid, index, out, comp, counts[index], params.logprobs))
        except (grpc.aio.AbortError, GeneratorExit):
            raise
        except Exception as exc:
            await abort_rpc(context, exc, f"Generate {shown(request.request_id)}")

    def _message(self, rid: str, index: int, out: RequestOutput, comp: CompletionOutput, num_generated: int,
                 num_logprobs) -> pb.GenerateResponse:
        msg = pb.GenerateResponse(request_id=rid, index=index, token_ids=comp.token_ids, text=comp.text)
        if out.weight_version is not None:
            msg.weight_version = out.weight_version
        if out.weight_versions is not None:
            msg.weight_versions.extend("" if v is None else v for v in out.weight_versions)
        if num_logprobs is not None and comp.logprobs:
            for tid, entry in zip(comp.token_ids, comp.logprobs):
                lp = entry[tid]
                msg.logprobs.append(pb.TokenLogprob(
                    token_id=tid, logprob=wire_logprob(lp.logprob), rank=lp.rank, token=lp.decoded_token or "",
                    top=[pb.TopLogprob(token_id=t, logprob=wire_logprob(v.logprob), rank=v.rank, token=v.decoded_token or "")
                         for t, v in top_logprobs(entry, num_logprobs)]))
        if comp.routed_experts is not None:  # the last message of a sample that asked (docs/rl.md)
            ids = np.ascontiguousarray(comp.routed_experts)
            wide = ids.dtype if ids.dtype in (np.int16, np.int32) else np.int32
            msg.routed_experts.CopyFrom(pb.RoutedExperts(shape=list(ids.shape), dtype=np.dtype(wide).name,
                                                         data=ids.astype(np.dtype(wide).newbyteorder("<")).tobytes()))
        if comp.finish_reason is not None:
            msg.finish_reason = comp.finish_reason
            if isinstance(comp.stop_reason, str):
                msg.stop_str = comp.stop_reason
            elif isinstance(comp.stop_reason, int):
                msg.stop_token_id = comp.stop_reason
            prompt = len(out.prompt_token_ids)
            msg.usage.CopyFrom(pb.Usage(prompt_tokens=prompt, completion_tokens=num_generated,
                                        cached_tokens=out.num_cached_tokens, total_tokens=prompt + num_generated))
            if out.kv_transfer_params is not None:
                msg.kv_transfer_params_json = kv_params_to_json(out.kv_transfer_params)
        return msg

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        try:
            return pb.AbortResponse(num_aborted=await self.s.abort_requested(request.request_ids))
        except ValueError as exc:
            await abort_rpc(context, exc, "Abort")

    async def ModelInfo(self, request, context) -> pb.ModelInfoResponse:
        m, s = self.s.model, self.s
        resp = pb.ModelInfoResponse(
            served_model_name=s.served_model_name, served_model_names=list(s.served_model_names),
            model_path=s.model_path, architecture=m.architecture,
            model_type=str(m.hf_config.get("model_type", "")), dtype=str(m.dtype).replace("torch.", ""),
            max_model_len=s.info.max_model_len, vocab_size=m.vocab_size, eos_token_ids=list(s.info.eos_token_ids),
            num_layers=m.num_layers, hidden_size=m.hidden_size, num_experts=m.num_experts,
            num_experts_per_tok=m.top_k, block_size=s.info.block_size, num_kv_blocks=s.stats().num_total_blocks,
            max_num_seqs=s.info.max_num_seqs, expert_parallel_size=s.info.expert_parallel_size,
            has_chat_template=bool(s.tokenizer.chat_template), device=s.info.device_name)
        if s.tokenizer.bos_token_id is not None:
            resp.bos_token_id = s.tokenizer.bos_token_id
        return resp

    async def ServerInfo(self, request, context) -> pb.ServerInfoResponse:
        st, reg = self.s.stats(), self.s.registry
        return pb.ServerInfoResponse(
            num_running=st.num_running, num_waiting=st.num_waiting, kv_usage=st.kv_usage,
            num_free_blocks=st.num_free_blocks, num_total_blocks=st.num_total_blocks,
            prefix_cache_hit_rate=st.prefix_cache_hit_rate, num_preemptions_total=st.num_preemptions_total,
            active_requests=len(reg.active), queued_requests=reg.queued_requests, queued_tokens=reg.queued_tokens,
            max_queued_requests=reg.max_queued_requests or 0, max_queued_tokens=reg.max_queued_tokens or 0,
            requests_total=reg.requests_total, rejected_total=reg.rejected_total,
            generated_tokens_total=reg.generated_tokens_total, generation_throughput=reg.generation_throughput(),
            uptime_s=time.time() - self.s.start_time, healthy=self.s.healthy, draining=reg.draining)

    async def ExpertLoad(self, request, context) -> pb.ExpertLoadResponse:
        load = self.s.engine.expert_load()
        return pb.ExpertLoadResponse(
            moe_layers=load.moe_layers, num_experts=load.num_experts, top_k=load.top_k, world_size=load.world_size,
            layers=[pb.ExpertLoadRow(tokens_per_expert=row) for row in load.tokens_per_expert_LG],
            experts_on_ranks=[pb.RankExperts(experts=held) for held in load.experts_on_ranks],
            bytes_dispatched=load.bytes_dispatched, bytes_combined=load.bytes_combined, steps=load.steps,
            **_eplb_fields(load))


def _eplb_fields(load) -> dict:
    """The ExpertLoadResponse fields of online EPLB (engine/cluster/eplb_controller.py); none when it is off."""
    if load.eplb is None:
        return {}
    m = load.eplb
    layers = [pb.LayerPlacement(experts_on_ranks=[pb.RankExperts(experts=held) for held in layer])
              for layer in load.experts_on_ranks_per_layer]
    return dict(placement_per_layer=layers,
                eplb_rebalances=m["rebalances"], eplb_bytes_moved=m["bytes_moved"],
                eplb_imbalance_before=m["predicted_imbalance_before"] or 0.0,
                eplb_imbalance_after=m["predicted_imbalance_after"] or 0.0)
