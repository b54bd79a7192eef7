"""The moelink.v1 Control service (docs/rl.md): the RL control calls, SGLang's names, on the served engine: updates
from disk and from a trainer's process group, pause / continue, flush, the weight version, sleep / wake-up.

Each call runs on the engine thread between two steps (AsyncEngine.control). Refused with FAILED_PRECONDITION naming
--enable-weight-updates unless the server was started with it; like every RPC but health, they need the API key where
one is set (engine/server/auth.py); a refused update is INVALID_ARGUMENT naming why.
"""
from __future__ import annotations

import grpc

from ..api.async_engine import AsyncEngine
from ..contract.weight_sync import DEFAULT_BUCKET_BYTES, DEFAULT_JOIN_TIMEOUT_S, DEFAULT_TIMEOUT_S
from .gen import moelink_v1_pb2 as pb
from .gen import moelink_v1_pb2_grpc as pb_grpc
from .serving import abort_rpc, optional


_GROUP = "weight_update_group"  # SGLang's default group name


class ControlServicer(pb_grpc.ControlServicer):
    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    async def _call(self, context, what: str, *args):
        try:
            return await self.engine.control(what, *args)
        except Exception as exc:
            await abort_rpc(context, exc, what)

    async def UpdateWeightsFromDisk(self, request: pb.UpdateWeightsFromDiskRequest, context) -> pb.UpdateWeightsResponse:
        args = [request.model_path, optional(request, "load_format"), optional(request, "weight_version"), True]
        if request.HasField("rollback_bytes"):
            args.append(request.rollback_bytes)
        info = await self._call(context, "update_weights_from_disk", *args)
        resp = pb.UpdateWeightsResponse(bytes_read=info["bytes_read"], seconds=info["seconds"])
        if info["weight_version"] is not None:
            resp.weight_version = info["weight_version"]
        return resp

    async def PauseGeneration(self, request: pb.PauseGenerationRequest, context) -> pb.PauseGenerationResponse:
        info = await self._call(context, "pause_generation", request.mode or "abort")
        return pb.PauseGenerationResponse(aborted=info["aborted"], started=info["started"])

    async def ContinueGeneration(self, request, context) -> pb.ContinueGenerationResponse:
        await self._call(context, "continue_generation")
        return pb.ContinueGenerationResponse()

    async def FlushCache(self, request, context) -> pb.FlushCacheResponse:
        if not self.engine.takes_control_calls:  # the engine lets its own callers flush; a client only with the flag
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "FlushCache is refused: start the server with --enable-weight-updates to take RL "
                                "control calls.")
        return pb.FlushCacheResponse(num_blocks_freed=await self._call(context, "flush_cache"))

    async def Sleep(self, request: pb.SleepRequest, context) -> pb.SleepResponse:
        info = await self._call(context, "sleep", request.level or 1)
        return pb.SleepResponse(bytes_freed=info["bytes_freed"], seconds=info["seconds"])

    async def WakeUp(self, request: pb.WakeUpRequest, context) -> pb.WakeUpResponse:
        info = await self._call(context, "wake_up", list(request.tags) or None)
        return pb.WakeUpResponse(bytes=info["bytes"], seconds=info["seconds"],
                                 graphs_recaptured=info["graphs_recaptured"])

    async def InitWeightsUpdateGroup(self, request: pb.InitWeightsUpdateGroupRequest,
                                     context) -> pb.WeightsUpdateGroupResponse:
        # The join is bounded by the default join_timeout_s, or by the caller's deadline where that comes first.
        remaining = context.time_remaining()
        join_timeout = DEFAULT_JOIN_TIMEOUT_S if remaining is None else max(min(DEFAULT_JOIN_TIMEOUT_S, remaining), 0.1)
        info = await self._call(context, "init_weights_update_group", request.master_address, request.master_port,
                                request.rank_offset, request.world_size, request.group_name or _GROUP,
                                request.backend or "gloo", optional(request, "timeout_s", DEFAULT_TIMEOUT_S),
                                join_timeout)
        return pb.WeightsUpdateGroupResponse(message=info["message"])

    async def UpdateWeightsFromDistributed(self, request: pb.UpdateWeightsFromDistributedRequest,
                                           context) -> pb.UpdateWeightsResponse:
        args = [list(request.names), list(request.dtypes), [list(s.dims) for s in request.shapes],
                request.group_name or _GROUP, True, optional(request, "weight_version")]
        args.append(optional(request, "bucket_bytes", DEFAULT_BUCKET_BYTES))
        if request.HasField("rollback_bytes"):
            args.append(request.rollback_bytes)
        info = await self._call(context, "update_weights_from_distributed", *args)
        resp = pb.UpdateWeightsResponse(bytes_read=info["bytes_read"], seconds=info["seconds"])
        if info["weight_version"] is not None:
            resp.weight_version = info["weight_version"]
        return resp

    async def DestroyWeightsUpdateGroup(self, request: pb.DestroyWeightsUpdateGroupRequest,
                                        context) -> pb.WeightsUpdateGroupResponse:
        info = await self._call(context, "destroy_weights_update_group", request.group_name or _GROUP)
        return pb.WeightsUpdateGroupResponse(message=info["message"])

    async def GetWeightVersion(self, request, context) -> pb.GetWeightVersionResponse:
        version = await self._call(context, "get_weight_version")
        return pb.GetWeightVersionResponse() if version is None else pb.GetWeightVersionResponse(weight_version=version)
