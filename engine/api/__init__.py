"""moelink.engine.api: the user-facing API: `LLM` (offline), `AsyncEngine` (serving, its stepping and output threads), the
`moelink` command line (cli.py is the composition root that registers every subcommand), `moelink plan`.
Must not import: benchmarks, engine, engine.models, engine.rank, engine.server, engine.spec, engine.spec.heads, engine.state, engine.tp.
"""
