"""moelink.benchmarks: kernel, engine, serving and EP benchmarks that print tables, write JSON (with device,
date and commit, `moelink.engine.api.provenance`) and draw plots; `gpu_session.sh` is what a lent GPU runs.

The top of the layering: it may import anything, and nothing in moelink imports it (its `bench-serve`
subcommand registers itself through the `moelink.cli` entry point). Tests run it as smoke, never as timing.
Must not import: engine.grammar, engine.lora.rank, engine.prompt_logprobs.
"""