"""`llada-jax data convert` and `llada-jax data check`.

The parsers import nothing heavy; the work modules load when a command runs.

    llada-jax data convert --format sharegpt|alpaca|openai --tokenizer DIR INPUT OUTPUT
    llada-jax data check --kind pretrain|sft [--tokenizer DIR] [--vocab_size N] FILE...

Every path (inputs, output, tokenizer directory) may be a URL (gs://...; see `llada_jax.checkpoints.storage`).

Exit codes: 0 success; 1 bad data (`convert`: the first bad record, unless --skip_invalid; `check`: any
problem, listed up to --max_problems); 2 a usage error (a missing tokenizer or input, a missing bucket or
object, no permission, a bad flag), reported as one line naming the path or URL. A failed `convert` writes
nothing.
"""

from __future__ import annotations

import sys

from llada_jax.errors import UsageError

FORMATS = ("sharegpt", "alpaca", "openai")
TOO_LONG = ("error", "skip", "truncate_prompt")


def register(sub) -> None:
    p = sub.add_parser("data", help="prepare and validate training data (convert, check)")
    data_sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    c = data_sub.add_parser("convert", help="chat data (ShareGPT, Alpaca, OpenAI messages) -> pre-tokenized SFT JSONL",
                            description="Tokenize chats with a tokenizer's chat template and write one "
                                        '{"input_ids", "prompt_length"} line per assistant turn.')
    c.add_argument("--format", required=True, choices=FORMATS, help="layout of the input records")
    c.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer directory (local, or a URL: downloaded)")
    c.add_argument("--max_length", type=int, default=None, help="apply the too-long policy at this length")
    c.add_argument("--too_long", choices=TOO_LONG, default="error",
                   help="examples longer than --max_length: error (default), skip, truncate_prompt")
    c.add_argument("--skip_invalid", action="store_true", help="skip bad records (counted and listed)")
    c.add_argument("input", help="input JSONL file or JSON array file (a path or a URL)")
    c.add_argument("output", help="output JSONL file, a path or a URL (written only when complete)")
    c.set_defaults(func=run_convert)

    k = data_sub.add_parser("check", help="validate training data files and print their statistics",
                            description="Validate every record; print counts and length percentiles, or the "
                                        "problems found (exit code 1).")
    k.add_argument("--kind", required=True, choices=("pretrain", "sft"), help="what the files are for")
    k.add_argument("--tokenizer", default=None, help="tokenizer directory (needed for text and chat records; "
                                                     "gives the vocabulary size and mask id)")
    k.add_argument("--vocab_size", type=int, default=None, help="ids must be below this (default: the tokenizer's)")
    k.add_argument("--mask_token_id", type=int, default=None,
                   help="id that must not appear in clean data (default: the tokenizer's mask token)")
    k.add_argument("--max_length", type=int, default=None, help="also count records longer than this")
    k.add_argument("--max_problems", type=int, default=20, help="problems listed (all are counted)")
    k.add_argument("files", nargs="+", help="JSONL files, globs or directories (paths or URLs)")
    k.set_defaults(func=run_check)


def run_convert(args) -> int:
    from llada_jax.data.converters import DatasetConverter
    from llada_jax.errors import DataError

    try:
        converter = DatasetConverter(args.tokenizer, max_length=args.max_length, too_long=args.too_long,
                                     skip_invalid=args.skip_invalid)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from e
    try:
        report = converter.convert(args.format, args.input, args.output)
    except DataError as e:
        print(f"llada-jax data convert: error: {e}", file=sys.stderr)
        print("nothing written (use --skip_invalid to skip bad records)", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as e:  # a missing input (a StorageError reaches main: exit 2)
        raise UsageError(str(e)) from e
    print(report.summary())
    for line in report.skipped.examples:
        print(f"  {line}")
    return 0


def run_check(args) -> int:
    from llada_jax.data.check import check_files

    if args.max_problems < 1:
        raise UsageError("--max_problems must be at least 1")
    try:
        report = check_files(args.files, kind=args.kind, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                             mask_token_id=args.mask_token_id, max_length=args.max_length,
                             max_problems=args.max_problems)
    except (FileNotFoundError, ValueError) as e:
        # DataError is a ValueError too, but check_files collects those; what arrives here is a set-up problem.
        raise UsageError(str(e)) from e
    print("\n".join(report.lines()))
    return 0 if report.ok else 1
