"""`llada-jax sample` (batch sampling JSONL -> JSONL) and `llada-jax inference` (one prompt, or a chat).

The parsers import nothing heavy; JAX, the model and the tokenizer load only when a command runs. Bad flags
and bad input lines are `UsageError`s (one line naming the flag or the line, exit code 2), raised before
the model is loaded wherever the check does not need it.
"""

from __future__ import annotations

import os
import sys
import tempfile

from llada_jax import distributed
from llada_jax.checkpoints import layout, storage
from llada_jax.config import DTYPES, padding_token_id
from llada_jax.errors import UsageError
from llada_jax.sampling.options import BLOCK_METHODS, CACHES, MAX_POST_STEPS, METHODS, REMASKING


def register(sub) -> None:
    p = sub.add_parser("sample", help="sample answers for a JSONL file of prompts (batched, resumable)")
    p.add_argument("--model", "--model_name_or_path", dest="model", required=True,
                   help="Orbax checkpoint (run, checkpoints/ or step directory) or HF model directory")
    p.add_argument("--input", required=True, help='JSONL: {"input_ids": [...]}, {"prompt": "..."} or '
                                                  '{"messages": [...]} per line, optional "id"; - for standard input')
    p.add_argument("--output", required=True, help="JSONL, one line per input line, in the same order; - for "
                                                   "standard output (progress and logs go to standard error)")
    p.add_argument("--resume", action="store_true", help="continue a partly written --output")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    sampling_flags(p)
    add_merge_lora_flag(p)
    distributed.add_flags(p)
    distributed.add_mesh_flag(p)
    p.set_defaults(func=run_sample)

    p = sub.add_parser("inference", help="answer one prompt (--prompt) or chat in the terminal (--interactive)")
    p.add_argument("--model", "--model_name_or_path", dest="model", required=True,
                   help="Orbax checkpoint or HF model directory (with its tokenizer)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="answer this text and exit")
    mode.add_argument("--interactive", action="store_true", help="multi-turn chat on the terminal")
    p.add_argument("--no_chat_template", action="store_true",
                   help="send raw text (base models); default: the chat template when the tokenizer has one")
    p.add_argument("--seed", type=int, default=0)
    sampling_flags(p)
    add_merge_lora_flag(p)
    distributed.add_flags(p)
    distributed.add_mesh_flag(p)
    p.set_defaults(func=run_inference)


def sampling_flags(p) -> None:
    p.add_argument("--sampling_method", choices=METHODS + BLOCK_METHODS, default="semi_ar_padding",
                   help="block_diffusion or llada2 (LLaDA 2.x's generate(): blocks from position 0, threshold 0.95) "
                        "for a block_causal model, one of the others for a bidirectional one")
    p.add_argument("--remasking_strategy", choices=REMASKING, default="low_confidence")
    p.add_argument("--gen_length", type=int, default=128, help="generated tokens per prompt (default 128)")
    p.add_argument("--block_length", type=int, default=32,
                   help="semi-autoregressive block (default 32; block_diffusion decodes the model's block_size)")
    p.add_argument("--steps", type=int, default=128, help="denoising steps in total (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--cfg_scale", type=float, default=0.0, help="classifier-free guidance (0: off)")
    p.add_argument("--logits_eos_inf", action="store_true", help="never generate EOS")
    p.add_argument("--confidence_eos_eot_inf", action="store_true",
                   help="EOS / end-of-turn predictions get the lowest confidence (paper Appendix B.4)")
    p.add_argument("--threshold", type=float, default=None,
                   help="parallel decoding: each step commits every masked position of the block whose confidence "
                        "is >= this (at least one); --steps is then unused (default: the step schedule; llada2: "
                        "0.95)")
    p.add_argument("--editing_threshold", type=float, default=None,
                   help="LLaDA 2.1 token editing (block_diffusion / llada2, with a threshold): a committed token of "
                        "the block is replaced by the model's prediction when that differs with probability above "
                        "this (LLaDA 2.1's generate() uses 0.9; default: no editing)")
    p.add_argument("--max_post_steps", type=int, default=MAX_POST_STEPS,
                   help=f"with --editing_threshold: editing steps a block may take once it has no mask left "
                        f"(default {MAX_POST_STEPS})")
    p.add_argument("--cache", choices=CACHES, default=None,
                   help="KV cache for block decoding: prefix (cache before the block) or dual (before and after); "
                        "default: prefix for block_diffusion (its exact cache), none for the other methods")
    p.add_argument("--cache_refresh", type=int, default=0,
                   help="with --cache, refresh the cache (a full forward) every N steps of a block; "
                        "0: only at the start of each block (default)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute and parameter dtype (default: as the checkpoint)")


def add_merge_lora_flag(parser) -> None:
    """`--merge_lora` of the commands that load a model with --model."""
    parser.add_argument("--merge_lora", action="store_true",
                        help="a LoRA run as --model: fold its adapters into the base weights once at load (the "
                             "plain model's speed); default: apply them unmerged")


def sampler_options(args, tokenizer=None):
    """The `SamplerOptions` the flags describe, validated (a bad value names its flag)."""
    from llada_jax.sampling import SamplerOptions

    try:
        return SamplerOptions(
            method=args.sampling_method, gen_length=args.gen_length, block_length=args.block_length,
            steps=args.steps, temperature=args.temperature, cfg_scale=args.cfg_scale,
            remasking=args.remasking_strategy, logits_eos_inf=args.logits_eos_inf,
            confidence_eos_eot_inf=args.confidence_eos_eot_inf,
            eot_id=tokenizer.eot_id if tokenizer is not None else None, threshold=args.threshold,
            editing_threshold=args.editing_threshold, max_post_steps=args.max_post_steps,
            cache=args.cache, cache_refresh=args.cache_refresh)
    except ValueError as e:
        raise _usage(e) from e


def _usage(error: ValueError) -> UsageError:
    """An options error as a usage error, naming the flag where the message starts with the option."""
    text = str(error)
    flagged = text.split()[0] in ("gen_length", "block_length", "steps", "temperature", "cfg_scale", "threshold",
                                  "cache_refresh", "editing_threshold", "max_post_steps")
    return UsageError(f"--{text}" if flagged else text)


def check_special_ids(model, path: str) -> None:
    """The ids a command that runs the model on prompts needs: the mask token, and the pad of left-padded prompts
    (`config.padding_token_id`: pad_token_id, else eos_token_id). A missing one is a UsageError naming the field
    and the config file of `path` (the --model), before any work."""
    config = model.config
    problem = None
    if config.mask_token_id is None:
        problem = "mask_token_id is not set: the samplers and the likelihood need the mask token"
    else:
        try:
            padding_token_id(config)
        except ValueError as e:
            problem = str(e)
    if problem:
        raise UsageError(f"--model: {layout.model_config_file(path)}: {problem}")


def check_model(sampler, model, path: str) -> None:
    """The flags against the loaded model (the method its attention allows, gen_length in its blocks, the token
    ids in its vocabulary and the special ids it needs; `path`: the --model), before anything is sampled."""
    check_special_ids(model, path)
    try:
        sampler.options.resolved(model.config)
    except ValueError as e:
        raise _usage(e) from e


def _sampler(args, tokenizer=None, mesh=None):
    """The sampler the flags describe (validated before anything is loaded), on `mesh` when given."""
    from llada_jax.config import DEFAULT_LOGICAL_AXIS_RULES
    from llada_jax.sampling import Sampler

    return Sampler(sampler_options(args, tokenizer), mesh=mesh,
                   rules=DEFAULT_LOGICAL_AXIS_RULES if mesh is not None else None)


def start(args):
    """Multi-process start-up, then the model and its tokenizer on the `--mesh` of every device (checked against
    the devices and the model's shape before anything is loaded): (model, tokenizer or None, mesh)."""
    from llada_jax.checkpoints import load_on_mesh
    from llada_jax.errors import CheckpointNotFoundError

    distributed.start(args)
    try:
        return load_on_mesh(args.model, args.mesh, dtype=args.dtype, merge_lora=args.merge_lora)
    except CheckpointNotFoundError as e:
        raise UsageError(f"--model: {e}") from e


def _sample_job(args) -> dict:
    """Process 0's reading of the input and of the output's state: {"records", "start", "staged"}."""
    from llada_jax.sampling import batch, prompts

    if args.input != "-" and not (os.path.exists(args.input) or storage.is_url(args.input)
                                  and storage.is_file(args.input)):
        raise UsageError(f"--input: {args.input}: no such file")
    try:
        records = prompts.read_records(args.input)
    except ValueError as e:
        raise UsageError(str(e)) from e
    # An output in object storage is written to a local copy, uploaded whole after every write (no appends there)
    output, staged = args.output, None
    if storage.is_url(args.output):
        storage.check_writable(args.output.rsplit("/", 1)[0])
        output = staged = os.path.join(tempfile.mkdtemp(prefix="llada_jax_sample_"), "output.jsonl")
        if storage.exists(args.output):
            storage.download(args.output, output)
    start = 0
    if args.output != "-" and os.path.exists(output) and os.path.getsize(output) > 0:
        if not args.resume:
            raise UsageError(f"--output {args.output} already exists; pass --resume to continue it, or remove it")
        try:
            start = batch.read_done(output, records)
        except ValueError as e:
            raise UsageError(f"--resume: {e}") from e
    return {"records": records, "start": start, "staged": staged}


def run_sample(args) -> int:
    from llada_jax.sampling import batch, prompts

    _sampler(args)  # flags first: a bad --gen_length fails before anything is read or loaded
    if args.batch_size <= 0:
        raise UsageError(f"--batch_size must be a positive integer, got {args.batch_size}")
    if args.resume and args.output == "-":
        raise UsageError("--resume needs an --output file (standard output cannot be continued)")
    from llada_jax.sharding import parse_mesh

    parse_mesh(args.mesh)  # a malformed --mesh before any start-up
    model, tokenizer, mesh = start(args)
    import jax

    main = jax.process_index() == 0
    job = distributed.on_main(lambda: _sample_job(args))  # process 0 reads; every process samples
    records, start_line = job["records"], job["start"]
    if start_line == len(records):
        if main:
            print(f"{args.output}: all {len(records)} lines are already done", file=sys.stderr)
        return 0
    sampler = _sampler(args, tokenizer, mesh)
    check_model(sampler, model, args.model)
    encoded = []
    limit = model.config.max_sequence_length - args.gen_length
    name = "<stdin>" if args.input == "-" else args.input
    for number, record in enumerate(records, 1):
        where = f"{name} line {number}"
        if prompts.needs_tokenizer(record) and tokenizer is None:
            raise UsageError(f"{where}: a text prompt needs a tokenizer, and none is stored with {args.model} "
                             f"(give 'input_ids' instead)")
        ids = prompts.encode(record, tokenizer) if number > start_line else []
        if len(ids) > limit:
            raise UsageError(f"{where}: the prompt has {len(ids)} tokens; with --gen_length {args.gen_length} at "
                             f"most {limit} fit the model's max_sequence_length {model.config.max_sequence_length}")
        vocab = model.config.padded_vocab_size
        if ids and max(ids) >= vocab:
            raise UsageError(f"{where}: token id {max(ids)} is outside the model's vocabulary [0, {vocab})")
        encoded.append(ids)
    output, upload = None, None
    if main:
        output = sys.stdout if args.output == "-" else job["staged"] or args.output
        if job["staged"]:
            def upload():
                storage.upload(job["staged"], args.output)
    written = batch.sample_file(model, tokenizer, sampler, records, encoded, output,
                                batch_size=args.batch_size, seed=args.seed, start=start_line,
                                progress=main and not args.no_progress, after_write=upload)
    if main:
        print(f"wrote {written} lines to {name if args.output == '-' else args.output} ({start_line + written} of "
              f"{len(records)} done)", file=sys.stderr)
    return 0


def run_inference(args) -> int:
    from llada_jax.sampling import chat
    from llada_jax.sharding import parse_mesh

    _sampler(args)
    parse_mesh(args.mesh)
    model, tokenizer, mesh = start(args)
    if tokenizer is None:
        raise UsageError(f"--model: no tokenizer is stored with {args.model}; inference needs one")
    use_template = tokenizer.declares_chat_template and not args.no_chat_template
    sampler = _sampler(args, tokenizer, mesh)
    check_model(sampler, model, args.model)
    session = chat.Chat(model, tokenizer, sampler, use_template=use_template, seed=args.seed)
    if args.interactive:
        return chat.interactive(session)
    try:
        answer, _ = session.reply(args.prompt)
    except ValueError as e:
        raise UsageError(f"--prompt: {e}") from e
    import jax

    if jax.process_index() == 0:
        print(answer)
    return 0
