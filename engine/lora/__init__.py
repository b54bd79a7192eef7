"""moelink.engine.lora: LoRA adapters served over one base model, many mixed in a batch (issue 60; docs/lora.md).

One feature package beside the per-sequence state: `adapter.py` reads a published peft adapter (adapter_config.json +
adapter_model.safetensors) into a validated `AdapterConfig` (adapter_config.py) and its A / B tensors, and checks it against the served
checkpoint's headers (rank, target modules, shapes, files: one error naming the field); `slots.py` holds a rank's
adapters, an LRU of adapters read into host memory and `max_loras` device slots of stacked, zero-padded A / B per
target, and the step's per-token slot index; `layer.py` is the hook each target linear runs (shrink and expand
through the kernels' LoRA family, kernels/ops_lora.py), `experts.py` the routed experts' path with per-expert A / B;
`patterns.py` peft's rank_pattern / alpha_pattern keys matched by RE2 (linear time, google-re2); `checker.py` the driver's check of
a request's adapter (whole: config, headers, values), `loader.py` its read of the adapter's weights on a worker
thread (off the step loop), `admission.py` the requests the engine holds back meanwhile (`LoRAAdmission`). The models name
only the hooks' protocols (engine/models/linear.py `Linear.lora`, moe/layer.py `MoELayer.lora_experts`); the rank
attaches them and fills the slots (engine/lora/rank/plugin.py); the scheduler never runs more adapters at once than slots (scheduler/lora_slots.py).
Must not import: benchmarks, engine, engine.api, engine.cluster, engine.core, engine.grammar, engine.kv_transfer, engine.lora.rank, engine.models, engine.multimodal, engine.prompt_logprobs, engine.rank, engine.rl, engine.server, engine.spec, engine.spec.heads, engine.state, engine.tools.
"""
