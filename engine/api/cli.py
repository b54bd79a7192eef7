"""`moelink` command line: generate, serve, stats, plan, make-tiny-model, train-builtin-model, quantize-fp8,
quantize-mxfp4, and plug-in subcommands.

engine/ is the top of the layering, so the CLI may import every module below it; subcommands that live
above it (benchmarks/: `bench-serve`) register themselves through the `moelink.cli` entry-point group
(pyproject.toml), the way pytest and vLLM find plugins, so engine/ never imports benchmarks/.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
from typing import Callable

from .cli_args import add_engine_args, engine_args_from
from .vllm_flags import add_refused_flags

logger = logging.getLogger(__name__)

# Entry-point group of subcommands registered from outside engine/ (`name = "module:register_cli"`).
ENTRY_POINT_GROUP = "moelink.cli"


# `generate`'s sampling flags: SamplingParams field -> flag (what an error names).
SAMPLING_FLAGS = {"max_tokens": "--max-tokens", "temperature": "--temperature", "top_p": "--top-p",
                  "top_k": "--top-k", "seed": "--seed", "stop": "--stop"}


def sampling_params_from(ns: argparse.Namespace):
    """`generate`'s SamplingParams, checked before anything is read from disk; ValueError names the flag."""
    from ..contract.sampling_params import SamplingParams

    try:
        return SamplingParams(**{field: getattr(ns, field) for field in SAMPLING_FLAGS} | {"stop": ns.stop or []})
    except ValueError as exc:
        msg = str(exc)
        for field, flag in SAMPLING_FLAGS.items():
            msg = msg.replace(f"SamplingParams.{field}=", f"{flag}=")
        raise ValueError(msg) from None


def _check_prompts_fit(args, prompts: list[str], max_tokens: int) -> None:
    """Prompt + --max-tokens against the context, from config.json and the tokenizer alone: a request that
    cannot fit is refused before minutes of weight loading, not after."""
    from ..core.no_tokenizer import load_tokenizer

    config = args.create_engine_config()  # config.json (an id resolved in the HF cache); no weights
    # Without a tokenizer (a dummy model's bare directory) the text prompts are refused here, in one sentence.
    max_len, tok = config.scheduler.max_model_len, load_tokenizer(config.model.model, config.load_format)
    for i, prompt in enumerate(prompts):
        n = len(tok.encode(prompt))
        if n < max_len and n + max_tokens > max_len:
            raise ValueError(f"--max-tokens={max_tokens} is too large: this model's maximum context length is "
                             f"{max_len} tokens and --prompt #{i + 1} has {n} tokens ({max_tokens} > {max_len} - "
                             f"{n}); ask for at most {max_len - n}.")


def _generate(ns: argparse.Namespace) -> int:
    from .llm import LLM

    params = sampling_params_from(ns)  # first: a bad flag costs nothing
    args = engine_args_from(ns)
    if args.load_format == "dummy":
        from ..config.worker_config import DUMMY_WARNING

        print(f"moelink: WARNING: {DUMMY_WARNING}", file=sys.stderr, flush=True)
    _check_prompts_fit(args, ns.prompt, params.max_tokens)
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
    import importlib.metadata

    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in sub.choices:
            continue  # an older install's metadata may name a command the package now provides itself
        try:
            register = ep.load()
        except ImportError as exc:
            logger.warning("moelink: subcommand %r unavailable (%s: %s)", ep.name, ep.value, exc)
            continue
        register(sub)


class SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser, which refuses arguments it does not know itself: argparse would hand them up to
    the top-level parser, whose error shows `usage: moelink [-h] {generate,serve,...}` instead of the usage
    of the subcommand that was mistyped."""

    _width: int | None = None

    def _get_formatter(self):
        """argparse builds a formatter for each add_argument (to check the metavar) and each asks the terminal's
        size (environment reads, a syscall): with `serve`'s hundreds of flags, most of building the parser. The
        width is asked once per parser."""
        if self._width is None:
            self._width = shutil.get_terminal_size().columns - 2  # HelpFormatter's own default
        make: Callable[..., argparse.HelpFormatter] = self.formatter_class  # every HelpFormatter takes width=
        return make(prog=self.prog, width=self._width)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def error(self, message: str):
        """A flag it knows given a value it refuses (`argument --flag: ...`) is answered in one line: the usage,
        a hundred lines of flags, tells nothing the message does not. An unknown flag or a missing argument gets
        the usage, which lists what there is."""
        if message.startswith("argument "):
            self.exit(2, f"{self.prog}: error: {message}\n")
        super().error(message)


def _register_tools(sub) -> None:
    from ..tools import mxfp4_checkpoint, quantize_fp8, tiny_model, train_builtin

    for module in (tiny_model, train_builtin, quantize_fp8, mxfp4_checkpoint):
        module.register_cli(sub)


def _register_server(sub) -> None:
    from ..server import cli as server_cli  # serve, stats, http-front (the gRPC front and the HTTP one)

    server_cli.register_cli(sub)


def _register_plan(sub) -> None:
    from . import plan_cli

    plan_cli.register_cli(sub)


# Modules of this package that add their own subcommands with `register_cli(subparsers)`, by the subcommands each
# adds. Imported only when needed: several load torch, which `moelink serve --help` (and a refused flag) must not
# wait for. `build_parser(command)` registers the one module that adds `command`.
REGISTRARS = {"serve": _register_server, "stats": _register_server, "http-front": _register_server,
              "plan": _register_plan, "make-tiny-model": _register_tools, "train-builtin-model": _register_tools,
              "quantize-fp8": _register_tools, "quantize-mxfp4": _register_tools}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `moelink` parser. With `command` (the subcommand about to be parsed, when it is one of REGISTRARS or
    `generate`), only that subcommand's module is imported and registered; else every subcommand, plug-ins too."""
    parser = argparse.ArgumentParser(prog="moelink", description="Mixture-of-experts LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=SubcommandParser)
    gen = sub.add_parser("generate", help="generate text for one or more prompts, offline")
    add_engine_args(gen)
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    gen.add_argument("--max-tokens", type=int, default=32, help="new tokens per prompt (default: %(default)s)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    gen.add_argument("--top-k", type=int, default=-1, help="-1 disables (default: %(default)s)")
    gen.add_argument("--seed", type=int, default=None, help="per-request seed (default: none)")
    gen.add_argument("--stop", action="append", default=None, help="a stop string (repeat for several)")
    add_refused_flags(gen)  # last: a flag moelink takes itself is never refused
    gen.set_defaults(func=_generate)
    if command == "generate":
        return parser
    if command in REGISTRARS:
        REGISTRARS[command](sub)
        return parser
    for register in (_register_tools, _register_server, _register_plan):
        register(sub)
    _register_plugins(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and not argv[0].startswith("-") else None
    ns = build_parser(command).parse_args(argv)
    try:
        return ns.func(ns) or 0
    except ValueError as exc:
        print(f"moelink: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
