"""`llada-jax convert to-hf` and `llada-jax convert from-hf`: Orbax checkpoints <-> Hugging Face directories, and
LoRA checkpoints <-> PEFT LoRA adapter directories (`to-hf --adapter_only`, `from-hf --adapter`)."""

from __future__ import annotations

from llada_jax.config import ATTENTION_TYPES, DTYPES
from llada_jax.errors import CheckpointError, UsageError


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert checkpoints between Orbax and the official Hugging Face layout",
                       description="Convert model checkpoints between this project's Orbax layout and the "
                                   "official Hugging Face LLaDA layout (safetensors + config.json).")
    convert = p.add_subparsers(dest="direction", metavar="DIRECTION", required=True)

    to_hf = convert.add_parser(
        "to-hf", help="Orbax checkpoint -> Hugging Face directory",
        description="Write an Orbax model checkpoint as a Hugging Face directory: config.json with the official "
                    "field names, safetensors weights under the official keys (sharded with an index past "
                    "--max_shard_size), the tokenizer files, and this project's configuration_llada.py / "
                    "modeling_llada.py (load with AutoModel.from_pretrained(dir, trust_remote_code=True)). A LoRA "
                    "checkpoint is written as the merged model (its base with the adapters folded in), or with "
                    "--adapter_only as a PEFT LoRA adapter directory.")
    to_hf.add_argument("--input", required=True, metavar="CKPT_DIR",
                       help="a run directory (its latest finished step), its checkpoints/ directory, or a step")
    to_hf.add_argument("--output", required=True, metavar="HF_DIR", help="the Hugging Face directory to create")
    to_hf.add_argument("--dtype", choices=DTYPES, default=None,
                       help="dtype of the saved weights (default: the checkpoint's parameter dtype)")
    to_hf.add_argument("--max_shard_size", default="5GB",
                       help="largest safetensors file, e.g. 5GB, 500MB, 2GiB (default: 5GB)")
    to_hf.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    to_hf.add_argument("--adapter_only", action="store_true",
                       help="LoRA checkpoints: write the adapters alone as a PEFT LoRA adapter directory "
                            "(adapter_config.json + adapter_model.safetensors, float32) to apply to the exported "
                            "base with peft.PeftModel.from_pretrained; without it a LoRA checkpoint is exported as "
                            "the merged model")
    to_hf.set_defaults(func=run_to_hf)

    from_hf = convert.add_parser(
        "from-hf", help="Hugging Face directory (LLaDA, or LLaMA / Mistral / Qwen2) -> Orbax checkpoint",
        description="Write a Hugging Face directory (config.json + model.safetensors or sharded safetensors "
                    "with an index, bf16 or fp32) as an Orbax model checkpoint that every --model / "
                    "--model_name_or_path accepts; tokenizer files go to <output>/tokenizer. The directory holds "
                    "a LLaDA model, or an autoregressive one (model_type llama, mistral or qwen2), which gets a "
                    "mask token (<|mdm_mask|> added to the tokenizer copy, or --mask_token) and an embedding and "
                    "head padded to a multiple of 128 rows. Tensors are converted one at a time.")
    from_hf.add_argument("--input", default=None, metavar="HF_DIR",
                         help="the Hugging Face model directory; with --adapter: the base model (an HF directory "
                              "or an Orbax run; default: base_model_name_or_path of adapter_config.json)")
    from_hf.add_argument("--output", required=True, metavar="CKPT_DIR", help="the run directory to create")
    from_hf.add_argument("--adapter", default=None, metavar="PEFT_DIR",
                         help="import a PEFT LoRA adapter directory (adapter_config.json + "
                              "adapter_model.safetensors) as a LoRA checkpoint of the base model")
    from_hf.add_argument("--dtype", choices=DTYPES, default=None,
                         help="parameter dtype of the checkpoint (default: the dtype of the HF weights)")
    from_hf.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    from_hf.add_argument("--mask_token", default=None,
                         help="AR checkpoints: an existing unused token of the tokenizer to use as the mask token "
                              "(e.g. '<|reserved_special_token_0|>'); default: add <|mdm_mask|>")
    from_hf.add_argument("--attention_type", choices=ATTENTION_TYPES, default=None,
                         help="AR checkpoints: the converted model's attention (default: bidirectional, a LLaDA "
                              "model; causal gives the AR model's own logits)")
    from_hf.add_argument("--block_size", type=int, default=None,
                         help="AR checkpoints: the block size of --attention_type block_causal")
    from_hf.add_argument("--shift_logits", action="store_true",
                         help="AR checkpoints: read the prediction for position i from the output at i - 1 (the "
                              "AR alignment, as Dream and DiffuLLaMA keep it)")
    from_hf.set_defaults(func=run_from_hf)


def _run(fn, **kwargs) -> int:
    import time

    start = time.time()
    try:
        out = fn(**kwargs)
    except CheckpointError:
        raise
    except (FileNotFoundError, FileExistsError, ValueError) as e:  # bad paths, flag values that do not fit
        raise UsageError(str(e)) from e
    print(f"wrote {out} ({time.time() - start:.1f} s)")
    return 0


def run_to_hf(args) -> int:
    from llada_jax.checkpoints.hf_export import convert_to_hf

    return _run(convert_to_hf, input_path=args.input, output_dir=args.output, dtype=args.dtype,
                max_shard_size=args.max_shard_size, overwrite=args.overwrite, adapter_only=args.adapter_only)


def run_from_hf(args) -> int:
    from llada_jax.checkpoints.hf_import import convert_from_hf

    if args.adapter is not None:
        from llada_jax.checkpoints.peft_adapter import import_peft_adapter

        given = [flag for flag, value in (("--dtype", args.dtype), ("--mask_token", args.mask_token),
                                          ("--attention_type", args.attention_type),
                                          ("--block_size", args.block_size), ("--shift_logits", args.shift_logits))
                 if value not in (None, False)]
        if given:
            raise UsageError(f"{given[0]} does not apply to --adapter (the adapters are stored in float32 for the "
                             f"base model as it is)")
        return _run(import_peft_adapter, adapter_dir=args.adapter, output_dir=args.output, base=args.input,
                    overwrite=args.overwrite)
    if args.input is None:
        raise UsageError("--input is required (the Hugging Face model directory), unless --adapter is given")
    overrides = {"attention_type": args.attention_type} if args.attention_type else {}
    if args.shift_logits:
        overrides["shift_logits"] = True
    if args.block_size is not None:
        overrides["block_size"] = args.block_size
    return _run(convert_from_hf, input_dir=args.input, output_dir=args.output, dtype=args.dtype,
                overwrite=args.overwrite, mask_token=args.mask_token, **overrides)
