"""`llada-jax create-configs`, `llada-jax pretrain` and `llada-jax sft`."""

from __future__ import annotations

import os

from llada_jax import distributed
from llada_jax.errors import LLaDAError, UsageError


# The pretrain / sft flags, written into the config after the config file and --config.* overrides.
SEED_FLAGS = (
    ("model_name_or_path", str), ("data_path", str), ("output_dir", str), ("batch_size", int),
    ("learning_rate", float), ("max_steps", int), ("gradient_accumulation_steps", int), ("warmup_steps", int),
    ("max_length", int), ("lr_scheduler_type", str), ("save_steps", int), ("logging_steps", int), ("seed", int),
)


def register(sub) -> None:
    p = sub.add_parser("create-configs", help="write pretraining_config.json and sft_config.json with the defaults")
    p.add_argument("--output_dir", default=".", help="where to write the two files (default: .)")
    p.set_defaults(func=run_create_configs)
    for task, help_text in (("pretrain", "pretrain a LLaDA model with the masked-diffusion objective"),
                            ("sft", "supervised fine-tuning (prompts never masked)")):
        p = sub.add_parser(task, help=help_text,
                           description=f"{help_text}. Settings come from --config (a configs/*.py file or a "
                                       "JSON from create-configs), then --config.key=value overrides, then the flags below.")
        p.add_argument("--config", help="configs/*.py with get_config(), or a JSON from create-configs")
        for name, kind in SEED_FLAGS:
            p.add_argument(f"--{name}", type=kind, default=None)
        distributed.add_flags(p)
        p.set_defaults(func=run_train, task=task, accepts_config_overrides=True)
    register_compile_check(sub)


def register_compile_check(sub) -> None:
    from llada_jax.config import PRESETS
    from llada_jax.sampling.cli import sampling_flags

    p = sub.add_parser(
        "compile-check", help="compile the train step (or the sampler) ahead of time for N devices: memory, FLOPs",
        description="Lower and compile a config's train step for N (fake CPU) devices without allocating "
                    "parameters; prints per-device memory and FLOPs per step. Mesh overrides: "
                    "--config.mesh.fsdp=8 etc. With --sample: the sampler of `llada-jax sample` instead, for a "
                    "model preset or saved model (its config only), --mesh, --batch_size, --prompt_length and "
                    "the sampling flags.")
    p.add_argument("--config", default=None, help="configs/*.py or a JSON config (the train step)")
    p.add_argument("--num_devices", type=int, required=True)
    p.add_argument("--task", choices=("pretrain", "sft"), default=None, help="default: the config's task")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    s = p.add_argument_group("the sampler (--sample)")
    s.add_argument("--sample", action="store_true", help="size the sampler instead of the train step")
    s.add_argument("--model", default="llada_8b", help=f"a preset ({' | '.join(PRESETS)}) or a saved model's path")
    s.add_argument("--mesh", default=None, metavar="data=D,fsdp=F,expert=E,tensor=T", help="as `sample --mesh`")
    s.add_argument("--batch_size", type=int, default=8)
    s.add_argument("--prompt_length", type=int, default=512)
    sampling_flags(s)
    p.set_defaults(func=run_compile_check, accepts_config_overrides=True)


def run_compile_check(args) -> int:
    if args.num_devices <= 0:
        raise UsageError("--num_devices must be positive")
    if not args.sample and not args.config:
        raise UsageError("--config is required (or --sample to size the sampler)")
    # Fake devices must be requested before JAX starts its backends.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.num_devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from llada_jax.config import apply_overrides, load_config, model_config_from
    from llada_jax.train.loop import make_run_mesh

    try:
        devices = jax.devices()
        if len(devices) < args.num_devices:
            raise UsageError(f"only {len(devices)} devices available (JAX was started before the flag could apply)")
        devices = devices[: args.num_devices]
        if args.sample:
            from llada_jax.sampling import aot

            report = _compile_sampler(args, devices)
        else:
            from llada_jax.config import override_keys, unused_settings
            from llada_jax.train import aot

            config = load_config(args.config, task=args.task)
            apply_overrides(config, args.extra)
            model_config = model_config_from(config)
            unused = unused_settings(config, model_config, override_keys(args.extra))
            if unused:  # (it would size a run that ignores it: a full fine-tune for a LoRA setting)
                raise UsageError(unused)
            report = aot.compile_train_step(config, model_config, make_run_mesh(config, model_config, devices))
    except LLaDAError:
        raise
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from e
    print(aot.format_report(report))
    if args.json:
        from llada_jax.checkpoints.atomic import write_json

        write_json(args.json, report)
    return 0


def _compile_sampler(args, devices) -> dict:
    from llada_jax import sharding
    from llada_jax.config import DEFAULT_LOGICAL_AXIS_RULES, PRESETS, LLaDAConfig
    from llada_jax.sampling import aot
    from llada_jax.sampling.cli import sampler_options

    if args.model in PRESETS:
        config = LLaDAConfig.preset(args.model)
    else:
        from llada_jax.checkpoints import read_model_config

        config = read_model_config(args.model)
    if args.dtype:
        config = config.replace(dtype=args.dtype, param_dtype=args.dtype)
    sizes = sharding.mesh_shape(sharding.parse_mesh(args.mesh), len(devices))
    sharding.check_model_fits(sizes, config)
    mesh = sharding.make_mesh(sizes, devices)
    return aot.compile_sampler(config, sampler_options(args), mesh, DEFAULT_LOGICAL_AXIS_RULES,
                               batch=args.batch_size, prompt_length=args.prompt_length)


def build_config(args):
    from llada_jax.config import (
        LLaDAConfig,
        apply_overrides,
        load_config,
        sft_defaults,
        train_config,
    )

    if args.config:
        config = load_config(args.config, task=args.task)
    else:
        config = train_config(LLaDAConfig.llada_8b(), task=args.task)
        if args.task == "sft":
            sft_defaults(config)
    apply_overrides(config, args.extra)
    for name, _ in SEED_FLAGS:
        value = getattr(args, name)
        if value is not None:
            config[name] = value
    return config


def run_train(args) -> int:
    from llada_jax.config import override_keys
    from llada_jax.train.loop import train

    try:
        config = build_config(args)
        distributed.start(args)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from e
    try:
        train(config, overridden=override_keys(args.extra))  # (named options count as given: loop.validate)
    except LLaDAError:
        raise  # reported by the command line: config errors exit 2, data errors and stops exit 1
    except FileNotFoundError as e:
        raise UsageError(str(e)) from e
    return 0


def run_create_configs(args) -> int:
    from llada_jax.checkpoints.atomic import write_json
    from llada_jax.config import LLaDAConfig, sft_defaults, train_config

    os.makedirs(args.output_dir, exist_ok=True)
    pretrain = train_config(LLaDAConfig.llada_8b(), task="pretrain")
    pretrain.output_dir, pretrain.data_path = "./llada_pretrained", "./pretraining_data"
    sft = sft_defaults(train_config(LLaDAConfig.llada_8b(), task="sft"))
    sft.model_name_or_path, sft.output_dir, sft.data_path = "./llada_pretrained", "./llada_sft", "./sft_data"
    for name, section, config in (("pretraining_config.json", "pretraining", pretrain),
                                  ("sft_config.json", "sft", sft)):
        body = config.to_dict()
        body.pop("task")
        path = os.path.join(args.output_dir, name)
        write_json(path, {section: body})
        print(f"wrote {path}")
    return 0
