"""`llada-jax eval-likelihood`: the conditional log-likelihood (and optionally the greedy check) of JSONL pairs.

Input lines: {"prompt": "text", "answer": "text"} (tokenized as the official evaluation does: see
`likelihood.encode_pair`) or {"prompt_ids": [...], "answer_ids": [...]}, each with an optional "id". Output
line i answers input line i: {"id", "log_likelihood", "stderr", "answer_tokens"} plus "greedy" with --greedy.
The parser imports nothing heavy; bad flags and bad lines are one-line errors (exit code 2).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

from llada_jax import distributed
from llada_jax.checkpoints import storage
from llada_jax.config import DTYPES
from llada_jax.errors import UsageError
from llada_jax.sampling.cli import add_merge_lora_flag, check_special_ids
from llada_jax.sampling.prompts import json_object


def register(sub) -> None:
    p = sub.add_parser("eval-likelihood", help="log p(answer | prompt) of JSONL pairs (Monte Carlo estimate)")
    p.add_argument("--model", "--model_name_or_path", dest="model", required=True,
                   help="Orbax checkpoint or HF model directory (a tokenizer is needed for text pairs)")
    p.add_argument("--input", required=True, help='JSONL: {"prompt", "answer"} texts or {"prompt_ids", '
                                                  '"answer_ids"} per line, optional "id"')
    p.add_argument("--output", required=True, help="JSONL, one line per input line, in the same order")
    p.add_argument("--mc_num", type=int, default=128, help="Monte Carlo samples per example (default 128)")
    p.add_argument("--batch_size", type=int, default=16,
                   help="Monte Carlo samples per batch, which share one stratified draw (default 16)")
    p.add_argument("--cfg_scale", type=float, default=0.0, help="classifier-free guidance (0: off)")
    p.add_argument("--greedy", action="store_true", help="also check whether each answer is the greedy decode")
    p.add_argument("--examples_per_call", type=int, default=8, help="examples per jitted call (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute and parameter dtype (default: as the checkpoint)")
    add_merge_lora_flag(p)
    distributed.add_flags(p)
    distributed.add_mesh_flag(p)
    p.set_defaults(func=run)


def read_pairs(path: str) -> list[dict]:
    """The records of a pairs file, validated (errors name the file and line)."""
    records = []
    name = "<stdin>" if path == "-" else path
    with (contextlib.nullcontext(sys.stdin) if path == "-" else storage.open_file(path)) as f:
        for number, line in enumerate(f, 1):
            where = f"{name} line {number}"
            record = json_object(line, where)
            if {"prompt_ids", "answer_ids"} <= set(record):
                for field in ("prompt_ids", "answer_ids"):
                    ids = record[field]
                    if not isinstance(ids, list) or not all(
                            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                        raise ValueError(f"{where}: '{field}' must be a list of non-negative integers")
            elif {"prompt", "answer"} <= set(record):
                if not isinstance(record["prompt"], str) or not isinstance(record["answer"], str):
                    raise ValueError(f"{where}: 'prompt' and 'answer' must be strings")
            else:
                raise ValueError(f"{where}: expected 'prompt' and 'answer' (texts) or 'prompt_ids' and "
                                 f"'answer_ids', got {sorted(record)}")
            records.append(record)
    if not records:
        raise ValueError(f"{name}: no pairs")
    return records


def run(args) -> int:
    for name in ("mc_num", "batch_size", "examples_per_call"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.mc_num % args.batch_size:
        raise UsageError(f"--mc_num {args.mc_num} must be a multiple of --batch_size {args.batch_size}")
    if not args.cfg_scale >= 0:
        raise UsageError(f"--cfg_scale must be >= 0, got {args.cfg_scale}")
    from llada_jax.sharding import parse_mesh

    parse_mesh(args.mesh)  # a malformed --mesh before any start-up
    distributed.start(args)
    from llada_jax.checkpoints import load_on_mesh
    from llada_jax.errors import CheckpointNotFoundError
    from llada_jax.eval import likelihood

    records = distributed.on_main(lambda: _read_input(args))  # process 0 reads; every process evaluates
    try:
        model, tokenizer, mesh = load_on_mesh(args.model, args.mesh, dtype=args.dtype, merge_lora=args.merge_lora)
    except CheckpointNotFoundError as e:
        raise UsageError(f"--model: {e}") from e
    check_special_ids(model, args.model)
    name = "<stdin>" if args.input == "-" else args.input
    prompts, answers = [], []
    for number, record in enumerate(records, 1):
        if "prompt_ids" in record:
            prompt, answer = record["prompt_ids"], record["answer_ids"]
        elif tokenizer is None:
            raise UsageError(f"{name} line {number}: text pairs need a tokenizer, and none is stored with "
                             f"{args.model} (give 'prompt_ids' / 'answer_ids' instead)")
        else:
            prompt, answer = likelihood.encode_pair(tokenizer, record["prompt"], record["answer"])
        prompts.append(prompt)
        answers.append(answer)
    from llada_jax.config import DEFAULT_LOGICAL_AXIS_RULES

    on = dict(mesh=mesh, rules=DEFAULT_LOGICAL_AXIS_RULES, examples_per_call=args.examples_per_call)
    try:
        result = likelihood.log_likelihood(model, prompts, answers, args.mc_num, args.batch_size, args.cfg_scale,
                                           rng=args.seed, return_stderr=True, **on)
        greedy = likelihood.greedy_check(model, prompts, answers, args.cfg_scale, **on) if args.greedy else None
    except ValueError as e:
        raise UsageError(f"{name}: {e}") from e
    import jax

    if jax.process_index() != 0:
        return 0
    lines = []
    for i, record in enumerate(records):
        line = {"id": record["id"]} if "id" in record else {}
        line.update(log_likelihood=float(result.log_likelihood[i]), stderr=float(result.stderr[i]),
                    answer_tokens=len(answers[i]))
        if greedy is not None:
            line["greedy"] = bool(greedy[i])
        lines.append(json.dumps(line) + "\n")
    if args.output == "-":
        sys.stdout.write("".join(lines))
        sys.stdout.flush()
    else:
        from llada_jax.checkpoints.atomic import atomic_file

        with atomic_file(args.output) as out:
            out.writelines(lines)
    print(f"wrote {len(records)} lines to {'<stdout>' if args.output == '-' else args.output}", file=sys.stderr)
    return 0


def _read_input(args) -> list[dict]:
    """Process 0's reading of the pairs (and the check that the output can be written)."""
    if args.output != "-" and storage.is_url(args.output):
        storage.check_writable(args.output.rsplit("/", 1)[0])
    if args.input != "-" and not (os.path.exists(args.input) or storage.is_url(args.input)
                                  and storage.is_file(args.input)):
        raise UsageError(f"--input: {args.input}: no such file")
    try:
        return read_pairs(args.input)
    except ValueError as e:
        raise UsageError(str(e)) from e
