"""`moelink` command line: generate, serve, stats, plan, make-tiny-model, and plug-in subcommands.

engine/ is the top of the layering, so the CLI may import every module below it; subcommands that live
above it (benchmarks/: `bench-serve`) register themselves through the `moelink.cli` entry-point group
(pyproject.toml), the way pytest and vLLM find plugins, so engine/ never imports benchmarks/.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys

from .cli_args import add_engine_args, engine_args_from

logger = logging.getLogger(__name__)

# Entry-point group of subcommands registered from outside engine/ (`name = "module:register_cli"`).
ENTRY_POINT_GROUP = "moelink.cli"


def _generate(ns: argparse.Namespace) -> int:
    from .llm import LLM
    from .sampling_params import SamplingParams

    args = engine_args_from(ns)
    params = SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k,
                            seed=ns.seed, stop=ns.stop or [])
    with LLM(**{k: v for k, v in vars(args).items()}) as llm:  # gives Ray workers back at once
        outs = llm.generate(ns.prompt, params, use_tqdm=len(ns.prompt) > 1)
    for out in outs:
        comp = out.outputs[0]
        print(f"--- prompt: {out.prompt!r}")
        print(comp.text)
        print(f"--- {len(comp.token_ids)} tokens, finish_reason={comp.finish_reason}")
    return 0


def _register_plugins(sub) -> None:
    """Subcommands from the `moelink.cli` entry points. One that fails to import is left out with a
    warning: an optional extra with a missing dependency must not take `moelink serve` down with it."""
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in sub.choices:
            continue  # an older install's metadata may name a command the package now provides itself
        try:
            register = ep.load()
        except ImportError as exc:
            logger.warning("moelink: subcommand %r unavailable (%s: %s)", ep.name, ep.value, exc)
            continue
        register(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moelink", description="Mixture-of-experts LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one or more prompts, offline")
    add_engine_args(gen)
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=None)
    gen.set_defaults(func=_generate)
    # Modules of this package that add their own subcommands with `register_cli(subparsers)`.
    from . import mxfp4_checkpoint, plan_cli, tiny_model  # quantize-mxfp4; plan (moelink.planner); make-tiny-model
    from .server import cli as server_cli  # serve, stats (the gRPC front)

    for module in (tiny_model, server_cli, plan_cli, mxfp4_checkpoint):
        module.register_cli(sub)
    _register_plugins(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns) or 0
    except ValueError as exc:
        print(f"moelink: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
