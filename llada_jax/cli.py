"""The `llada-jax` command.

Each area of the package registers its own subcommands (`register(subparsers)` in its `cli` module);
parsers import nothing heavy, so `llada-jax --help` is fast and JAX starts only when a command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from llada_jax.errors import LLaDAError

# Modules that define `register(subparsers)`, in the order their commands are listed.
COMMAND_MODULES = (
    "llada_jax.cli_model",
    "llada_jax.train.cli",
    "llada_jax.data.cli",
    "llada_jax.checkpoints.cli",
    "llada_jax.sampling.cli",
    "llada_jax.eval.cli",
    "llada_jax.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llada-jax",
        description="LLaDA masked-diffusion language models in JAX: pretrain, fine-tune, sample, convert.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "accepts_config_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.extra = unknown
    from llada_jax.checkpoints.storage import configure_emulator
    from llada_jax.data.settings import mark_absl_flags_parsed

    configure_emulator()  # STORAGE_EMULATOR_HOST, when set, reaches every storage client (see storage)
    mark_absl_flags_parsed()
    try:
        return int(args.func(args) or 0)
    except LLaDAError as e:  # one line, no traceback; see llada_jax.errors for the exit codes
        print(f"llada-jax {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
