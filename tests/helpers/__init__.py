"""Code the tests share, imported as `tests.helpers.<module>` (pyproject puts the repository root on sys.path).

- `tiny_configs`: the tiny model configs the `tiny_model` fixture builds.
- `hf_checkpoints`: tiny DeepSeek-V3/V2 and GLM-4-MoE checkpoints saved by transformers (`hf_tiny_model` fixture).
- `parity`: greedy parity against transformers (prompts, cached `generate` outputs, the engine's, pool checks).
- `waits`: `wait_until`, the one bounded poll (for subprocesses and remote servers with nothing to wait on),
  and `wait_event`.
- `engine_steps`: `EngineSteps`, event waits on an in-process engine's steps (and holding a step).
- `grpc_server`: `moelink serve` subprocesses, in-process servers, typed stubs, `pool_is_free`.
- `grpc_calls`: the hostile-input calls on both services.
- `smg_gateway`: the smg gateway in front of a worker.
- `local_ray`: a local Ray (own temp dir, 127.0.0.1), a `ray start --head` on an explicit address.
- `net`: free ports and the TCP sockets listening on this host.
- `fakes`: small typed stand-ins for real interfaces (gRPC call details, ...).
- `sampler`: sampler batches and statistics.
- `scheduler_sim`: the fake worker and oracle of the scheduler tests.
- `deploy_commands`: `moelink serve` commands found in deploy/ files.
- `ep_worker`: one EP rank of the comm tests (run as `python -m tests.helpers.ep_worker`).
"""
