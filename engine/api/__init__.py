"""moelink.engine.api: the user-facing API: `LLM` (offline), `AsyncEngine` (serving, its stepping and output threads), the
`moelink` command line (cli.py is the composition root that registers every subcommand), `moelink plan`.
Must not import: benchmarks, engine, engine.grammar, engine.lora.rank, engine.models, engine.prompt_logprobs, engine.rank, engine.server, engine.spec, engine.spec.heads, engine.state, engine.tp.
"""
