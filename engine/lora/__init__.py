"""moelink.engine.lora: LoRA adapters served over one base model, many mixed in a batch (issue 60; docs/lora.md).

One feature package beside the per-sequence state: `adapter.py` reads a published peft adapter (adapter_config.json +
adapter_model.safetensors) into a validated `AdapterConfig` and its A / B tensors, and checks it against the served
checkpoint's headers (rank, target modules, shapes, files: one error naming the field); `slots.py` holds a rank's
adapters, an LRU of adapters read into host memory and `max_loras` device slots of stacked, zero-padded A / B per
target linear, and the step's per-token slot index; `layer.py` is the hook each target linear runs (shrink and
expand through the kernels' LoRA family, kernels/ops_lora.py). The models name only the hook's protocol
(engine/models/linear.py `Linear.lora`); the rank attaches it and fills the slots; the driver validates requests
with `adapter.py` and the scheduler never holds more adapters running than slots (scheduler/scheduler.py).
Must not import: benchmarks, engine, engine.api, engine.cluster, engine.core, engine.kv_transfer, engine.models, engine.rank, engine.server, engine.spec, engine.spec.heads, engine.state, engine.tools, engine.rl.
"""
