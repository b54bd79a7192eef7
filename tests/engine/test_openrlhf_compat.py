"""OpenRLHF's rollout actor on moelink (issue 97 item 6; engine/api/vllm_async_compat.py, docs/rl.md "OpenRLHF").

`_RolloutActor` is OpenRLHF's RolloutRayActor (openrlhf/trainer/ray/vllm_engine.py, 2026-08, 3c3be62) with its
`self.llm` a moelink AsyncEngine in place of vLLM's AsyncLLMEngine: each method's body is OpenRLHF's, call for call.
One training cycle as OpenRLHF's trainers drive it (create_vllm_engines with vllm_enable_sleep, SamplesGenerator,
PPOTrainer.broadcast_to_vllm, PPOTrainerAsync's partial rollout pause, ppo_actor.broadcast_to_vllm over the
stateless group: here moelink's engine/rl/trainer.OpenRLHFGroup over gloo, one tensor per update_weight) is recorded
call by call on the engine and checked against OpenRLHF's transcript; after the update the greedy tokens equal a
fresh engine's on the new weights. Then: the call forms moelink's own callers use, the refusals naming what they
refuse, and LLM.collective_rpc's CUDA IPC path with a handle rebuilt on CPU."""
from __future__ import annotations

import asyncio
import uuid
from copy import deepcopy

import pytest
import torch

from moelink.engine import LLM, AsyncEngine, EngineArgs, SamplingParams
from moelink.engine.api import vllm_async_compat
from moelink.engine.core.outputs import OutputKind
from moelink.engine.rl.trainer import stateless_init_process_group

from tests.helpers.net import free_port
from tests.helpers.parity import prompts
from tests.helpers.tiny_configs import TINY_CONFIGS
from tests.helpers.weight_checkpoints import checkpoint_tensors, perturbed, saved_checkpoint

pytestmark = pytest.mark.usefixtures("heap_held_frozen")

_ARGS = dict(dtype="float32", max_num_seqs=4, num_kv_blocks=64, block_size=8, max_model_len=256)


class _Recorder:
    """The engine, each call OpenRLHF's actor makes on it recorded as (method, args, kwargs)."""

    def __init__(self, engine: AsyncEngine):
        self.engine, self.calls = engine, []

    def __getattr__(self, name):
        attr = getattr(self.engine, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return attr(*args, **kwargs)

        return call


def _tokens_prompt(prompt_token_ids):  # vllm.inputs.TokensPrompt: a TypedDict
    return {"prompt_token_ids": prompt_token_ids}


class _RolloutActor:
    """OpenRLHF's RolloutRayActor's engine calls, verbatim (vllm_engine.py), on `llm`."""

    def __init__(self, llm):
        self.llm = llm

    async def start(self):  # the end of RolloutRayActor.__init__
        await self.llm.is_sleeping()

    async def init_process_group(self, master_address, master_port, rank_offset, world_size, group_name, backend,
                                 use_ray):
        return await self.llm.collective_rpc(
            "init_process_group",
            args=(master_address, master_port, rank_offset, world_size, group_name, backend, use_ray),
        )

    async def update_weight(self, name, dtype, shape, empty_cache=False):
        return await self.llm.collective_rpc("update_weight", args=(name, dtype, shape, empty_cache))

    async def reset_prefix_cache(self):
        await self.llm.reset_prefix_cache()

    async def pause_generation(self):
        await self.llm.pause_generation(mode="keep")

    async def resume_generation(self):
        await self.llm.resume_generation()

    async def sleep(self, level=1):
        await self.llm.sleep(level=level)

    async def wake_up(self, tags=None):
        if tags is None:
            tags = ["weights", "kv_cache"]
        for tag in tags:
            await self.llm.wake_up(tags=[tag])

    def get_num_unfinished_requests(self) -> int:
        return self.llm.output_processor.get_num_unfinished_requests()

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        prompt = _tokens_prompt(prompt_token_ids)
        generator = self.llm.generate(prompt, deepcopy(sampling_params), request_id=uuid.uuid4().hex)
        final_output = None
        async for request_output in generator:
            final_output = request_output
        return final_output


# What OpenRLHF's actor calls on its engine in the cycle below, in order (the weight updates: one per tensor).
def _transcript(names: list[str], port: int) -> list[tuple]:
    return [
        ("is_sleeping", (), {}),
        ("sleep", (), {"level": 1}),  # create_vllm_engines(vllm_enable_sleep=True)
        ("collective_rpc", ("init_process_group",), {"args": ("127.0.0.1", port, 1, 2, "openrlhf", "gloo", False)}),
        ("wake_up", (), {"tags": ["weights"]}), ("wake_up", (), {"tags": ["kv_cache"]}),  # SamplesGenerator
        *[("generate", ("prompt", "params"), {"request_id": "id"})] * 2,
        ("sleep", (), {"level": 1}),
        ("wake_up", (), {"tags": ["weights"]}),  # PPOTrainer.broadcast_to_vllm
        ("pause_generation", (), {"mode": "keep"}),  # PPOTrainerAsync (partial rollout)
        ("reset_prefix_cache", (), {}),  # ppo_actor.broadcast_to_vllm
        *[("collective_rpc", ("update_weight",), {"args": (n, "dtype", "shape", "empty_cache")}) for n in names],
        ("resume_generation", (), {}),
        ("wake_up", (), {"tags": ["weights"]}), ("wake_up", (), {"tags": ["kv_cache"]}),
        *[("generate", ("prompt", "params"), {"request_id": "id"})] * 2,
    ]


def _shape(calls: list[tuple]) -> list[tuple]:
    """The recorded calls with what varies per run (prompts, params, ids, tensors' dtype and shape) as placeholders."""
    out = []
    for name, args, kwargs in calls:
        if name == "generate":
            out.append((name, ("prompt", "params"), {"request_id": "id"}))
        elif name == "collective_rpc" and args[0] == "update_weight":
            out.append((name, args, {"args": (kwargs["args"][0], "dtype", "shape", "empty_cache")}))
        else:
            out.append((name, args, kwargs))
    return out


def test_openrlhf_cycle_on_async_engine_equals_a_fresh_engine(tiny_model, tmp_path):
    path = tiny_model("qwen3_e6k3")
    new = perturbed(checkpoint_tensors(path))
    ps = prompts(TINY_CONFIGS["qwen3_e6k3"]["vocab_size"], seed=31, n=2, lo=3, hi=12)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    got = {}
    for key, model in (("old", path), ("new", saved_checkpoint(path, new, tmp_path / "new"))):
        fresh = LLM(model, **_ARGS)
        got[key] = [o.outputs[0].token_ids for o in fresh.generate(ps, greedy, use_tqdm=False)]
        fresh.shutdown()
    want = got["new"]
    assert want != got["old"], "the perturbation must change the greedy tokens"
    engine = AsyncEngine.from_engine_args(EngineArgs(model=path, enable_weight_updates=True, **_ARGS))
    rec = _Recorder(engine)
    actor = _RolloutActor(rec)
    port = free_port()
    # samples_generator.py's rollout parameters (is_correction_enable: logprobs=1), seeded for a repeatable run
    rollout = SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_tokens=8, min_tokens=1,
                             skip_special_tokens=False, logprobs=1, seed=7)

    async def cycle():
        await actor.start()
        assert not await engine.is_sleeping()
        await actor.sleep()  # create_vllm_engines(vllm_enable_sleep=True)
        assert await engine.is_sleeping()
        # ppo_actor._init_vllm_sync_group: the engines' join fired, the trainer's group made (rank 0), then ray.get
        join = asyncio.create_task(actor.init_process_group("127.0.0.1", port, 1, 2, "openrlhf", "gloo", False))
        group = await asyncio.to_thread(stateless_init_process_group, "127.0.0.1", port, 0, 2, "cpu")
        assert await join == [None]
        await actor.wake_up()  # SamplesGenerator before generation
        assert not await engine.is_sleeping()
        assert actor.get_num_unfinished_requests() == 0  # SamplesGenerator's pick of the least busy engine
        before = []
        for p in ps:  # SingleTurnAgentExecutor.execute: outputs[0].token_ids, its logprobs per token
            out = await actor.generate(p, rollout)
            action = out.outputs[0].token_ids
            assert out.finished and len(action) == 8
            lps = [lp.get(t) for t, lp in zip(action, out.outputs[0].logprobs)]
            assert all(lp is not None and lp.logprob <= 0.0 for lp in lps), lps
            before.append(action)
        await actor.sleep()  # after generation
        await actor.wake_up(tags=["weights"])  # PPOTrainer.broadcast_to_vllm
        await actor.pause_generation()  # PPOTrainerAsync, partial rollout
        assert await engine.is_paused()
        await actor.reset_prefix_cache()
        names = list(new)
        for count, name in enumerate(names, 1):  # ppo_actor.broadcast_to_vllm's _broadcast_param
            param = new[name]
            ref = asyncio.create_task(actor.update_weight(name, dtype=param.dtype, shape=param.shape,
                                                          empty_cache=count == len(names)))
            await asyncio.to_thread(group.broadcast, param.data, 0, None)
            assert await ref == [None]
        await actor.resume_generation()
        await actor.wake_up()
        assert not await engine.is_sleeping() and not await engine.is_paused()
        after = []
        for p in ps:
            after.append((await actor.generate(p, greedy)).outputs[0].token_ids)
        group.close()
        return names, after

    try:
        names, after = asyncio.run(cycle())
        assert after == want, (after, want)
        assert _shape(rec.calls) == _transcript(names, port)
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def served(tiny_model):
    engine = AsyncEngine.from_engine_args(EngineArgs(model=tiny_model("qwen3_e6k3"), enable_weight_updates=True,
                                                     **_ARGS))
    try:
        yield engine
    finally:
        engine.shutdown()


def test_both_generate_forms_and_the_refusals(served):
    engine = served
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    async def main():
        old = [o async for o in engine.generate("old-form", [5, 6, 7], greedy, OutputKind.FINAL_ONLY)]
        new = [o async for o in engine.generate({"prompt_token_ids": [5, 6, 7]}, greedy, "vllm-form")]
        named = [o async for o in engine.generate(prompt=[5, 6, 7], sampling_params=greedy, request_id="named")]
        assert len(old) == 1 and old[0].request_id == "old-form"
        assert new[-1].request_id == "vllm-form" and named[-1].request_id == "named"
        assert old[0].outputs[0].token_ids == new[-1].outputs[0].token_ids == named[-1].outputs[0].token_ids
        with pytest.raises(ValueError, match="priority=3 is not supported"):
            async for _ in engine.generate([5], greedy, "p", priority=3):
                pass
        with pytest.raises(ValueError, match="method='load_weights' is not supported by moelink"):
            await engine.collective_rpc("load_weights")
        with pytest.raises(ValueError, match="callable"):
            await engine.collective_rpc(len)
        with pytest.raises(ValueError, match="no weight update group is joined"):
            await engine.collective_rpc("update_weight", args=("model.norm.weight", torch.float32, [8]))
        with pytest.raises(ValueError, match="use_ray=True is not supported"):
            await engine.collective_rpc("init_process_group", args=("127.0.0.1", 1, 1, 2, "g", "gloo", True))
        with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
            await engine.collective_rpc("update_weight", kwargs={"bogus": 1})
        with pytest.raises(ValueError, match=r"reset_running_requests=True\) is not supported"):
            await engine.reset_prefix_cache(reset_running_requests=True)
        assert await engine.reset_prefix_cache() is True
        # vLLM's level 0: the pause alone; wake_up resumes
        await engine.sleep(level=0)
        assert await engine.is_sleeping() and await engine.is_paused()
        await engine.wake_up(tags=["scheduling"])
        assert not await engine.is_sleeping() and not await engine.is_paused()
        # partial rollout (PPOTrainerAsync): a request held by pause_generation(mode="keep") resumes where it was
        stream = engine.generate([7, 8, 9], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True), "held")
        first = await stream.__anext__()
        assert engine.output_processor.get_num_unfinished_requests() == 1
        await engine.pause_generation(mode="keep")
        assert await engine.is_sleeping()  # vLLM's: a paused scheduler counts
        await engine.reset_prefix_cache()
        await engine.resume_generation()
        last = first
        async for last in stream:
            pass
        assert last.finished and len(last.outputs[0].token_ids) == 40
        assert engine.output_processor.get_num_unfinished_requests() == 0
        with pytest.warns(DeprecationWarning):
            await engine.pause_generation(wait_for_inflight_requests=True)
        assert await engine.is_paused()
        await engine.resume_generation()

    asyncio.run(main())


def test_llm_collective_rpc_takes_a_cuda_ipc_handle(tiny_model, monkeypatch):
    """LLM.collective_rpc("update_weight_cuda_ipc"): the handle filed under this engine's GPU is rebuilt (OpenRLHF's
    worker: func(*args) with args[6] the engine's device index) and written; on CPU with a stand-in handle. The
    greedy tokens change with the new lm_head and come back with the old one."""
    path = tiny_model("qwen3_e6k3")
    llm = LLM(path, enable_weight_updates=True, **_ARGS)
    try:
        name = "lm_head.weight"
        old = checkpoint_tensors(path)[name]
        sent = torch.randn(old.shape, generator=torch.Generator().manual_seed(3)).to(old.dtype)
        seen = []

        def rebuild(*args):  # torch.multiprocessing.reductions.rebuild_cuda_tensor's place
            seen.append(args[6])
            return sent.clone()

        monkeypatch.setattr(vllm_async_compat, "physical_gpu_id", lambda device: "GPU-this")
        handles = {"GPU-other": (rebuild, [None] * 6 + [5]), "GPU-this": (rebuild, [None] * 6 + [3])}
        greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        ps = [[4, 5, 6], [9, 1, 200, 3]]

        def tokens():
            return [o.outputs[0].token_ids for o in llm.generate(ps, greedy, use_tqdm=False)]

        before = tokens()
        assert llm.collective_rpc("update_weight_cuda_ipc", args=(name, old.dtype, old.shape, handles, True)) == [None]
        assert seen == [0]  # args[6] swapped for the engine's device index (CPU: 0)
        assert tokens() != before
        with pytest.raises(ValueError, match="no CUDA IPC handle for this engine's GPU 'GPU-this'"):
            llm.collective_rpc("update_weight_cuda_ipc",
                               args=(name, old.dtype, old.shape, {"GPU-other": handles["GPU-other"]}))
        with pytest.raises(ValueError, match="opened as torch.float32 \\[512, 64\\], announced"):
            llm.collective_rpc("update_weight_cuda_ipc", args=(name, old.dtype, [64, 512], handles))
        llm.update_weights_from_tensor([(name, old)])
        assert tokens() == before
    finally:
        llm.shutdown()
