"""Loading a model whatever its format: an Orbax run, a LoRA checkpoint or a Hugging Face directory
(auto-detected).

    load_model_and_tokenizer(path)   the model and the tokenizer stored with it: what sampling, evaluation,
                                     the lm-eval adapter and the demo load
    load_pretrained(path)            the model alone (`LLaDAForMaskedLM.from_pretrained`)
    load_lora_model(run_dir, step)   a LoRA step: its base (in any of these formats, loaded by load_pretrained)
                                     with the adapters (`adapters.apply_adapters`)
    load_on_mesh(path, mesh)         the model and tokenizer on a device mesh (sample, inference, evaluation)
    model_tokenizer(path)            the tokenizer stored with it (an AR model's with the mask token added)
    read_model_config(path)          its LLaDAConfig, without the weights
"""

from __future__ import annotations

from llada_jax.checkpoints import layout, storage
from llada_jax.config import LLaDAConfig


def load_pretrained(path: str, dtype: str | None = None, **overrides):
    """Load a model from an Orbax checkpoint (a run directory, its checkpoints/ directory, or a step) or a
    Hugging Face directory (one with config.json: LLaDA, or an autoregressive LLaMA / Mistral / Qwen2 model,
    converted with a mask token: see `llada_jax.checkpoints.ar_import`), detected automatically.

    `dtype` sets the compute dtype; keyword arguments: `param_dtype` (default: as stored), `mesh` and `rules`
    (shard the parameters as they are placed), and LLaDAConfig fields that do not change shapes
    (scan_layers, remat_policy, attention_impl); for an AR directory also `attention_type`, `shift_logits` and
    `mask_token` (an existing token to use as the mask). A LoRA checkpoint (`llada_jax.checkpoints.adapters`)
    gives its base with the adapters applied; `merge_lora=True` folds them into the weights, `base=PATH` loads
    another copy of the base than the one the checkpoint names.
    """
    if layout.model_format(path) == "hf":
        from llada_jax.checkpoints.hf_import import load_hf_model

        overrides.pop("merge_lora", None)  # a Hugging Face model directory holds a whole model
        if overrides.pop("base", None) is not None:
            raise ValueError(f"{path}: base= applies to LoRA checkpoints; this is a Hugging Face model directory")
        return load_hf_model(path, dtype, **overrides)
    merge_lora, base = overrides.pop("merge_lora", False), overrides.pop("base", None)
    run_dir, step = layout.find_checkpoint(path)
    if layout.is_lora_step(run_dir, step):
        return load_lora_model(run_dir, step, merge_lora=merge_lora, base=base, dtype=dtype, **overrides)
    if base is not None:
        raise ValueError(f"{path}: base= applies to LoRA checkpoints; this one holds a whole model")
    from llada_jax.checkpoints.orbax_model import load_model

    return load_model(layout.step_dir(run_dir, step), dtype=dtype, **overrides)


def load_lora_model(run_dir: str, step: int, *, merge_lora: bool = False, base: str | None = None,
                    mesh=None, rules=None, **load_kwargs):
    """The base model named by a LoRA step (or `base`) with the step's adapters: unmerged, or merged into the
    weights. `load_kwargs` (dtype, param_dtype, scan_layers, ...) go to the base's loader; the adapters stay
    float32. The model's attention_type / shift_logits / block_size are the run's (`adapters.adapted_config`).
    A base that is itself a LoRA checkpoint is loaded merged."""
    from llada_jax.checkpoints import adapters

    lora, recorded = adapters.read_lora(run_dir, step)
    base_path = base or recorded
    adapters.require_base(layout.step_dir(run_dir, step), base_path)
    model = load_pretrained(base_path, mesh=mesh, rules=rules, merge_lora=True, **load_kwargs)
    model = adapters.apply_adapters(model, run_dir, step, lora, base_path, mesh=mesh, rules=rules, **load_kwargs)
    return model.merge_lora() if merge_lora else model


def load_model_and_tokenizer(path: str, *, dtype: str | None = None, tokenizer: str | None = None, **overrides):
    """(model, TokenizerHelper or None): a saved model and the tokenizer stored with it (or the one at
    `tokenizer`). `dtype` sets both the compute and the parameter dtype (default: as stored); other keyword
    arguments as `load_pretrained` (mesh, rules, scan_layers, ...)."""
    from llada_jax.tokenizer import TokenizerHelper

    if dtype is not None:
        overrides = {"param_dtype": dtype, **overrides}
    model = load_pretrained(path, dtype, **overrides)
    mask_token = overrides.get("mask_token")
    directory = tokenizer or model_tokenizer(path, mask_token=mask_token)
    if not directory:
        return model, None
    # an existing token made the mask (mask_token=...) is not named <|mdm_mask|>: the helper is told its id
    mask_id = model.config.mask_token_id if mask_token is not None else None
    return model, TokenizerHelper(storage.local_copy(directory), mask_token_id=mask_id)


def model_tokenizer(path: str, *, mask_token: str | None = None) -> str | None:
    """The tokenizer directory stored with a saved model, or None. An autoregressive HF directory's tokenizer
    has no mask token: it is copied to a local temporary directory with the mask token added, as the model's
    conversion plans it (`ar_import.VocabPlan`)."""
    directory = layout.tokenizer_path(path)
    if directory is None or layout.model_format(path) != "hf":
        return directory
    from llada_jax.checkpoints.hf_import import read_config

    ar = read_config(storage.clean(path), mask_token=mask_token)[2]
    if ar is None or not ar.vocab.add_to_tokenizer:
        return directory
    import tempfile

    from llada_jax.checkpoints.ar_import import write_tokenizer

    local = tempfile.mkdtemp(prefix="llada_jax_tokenizer_")
    write_tokenizer(directory, local, ar.vocab)
    return local


def load_on_mesh(path: str, mesh: str | None = None, *, dtype: str | None = None, merge_lora: bool = False):
    """(model, tokenizer or None, mesh) for a command that runs a model on every device of every process: the mesh
    of a `--mesh data=D,fsdp=F,tensor=T` value (default: every device on data) is checked against the devices
    and the model's shape (read without its weights) before anything is loaded, then the parameters are restored
    straight into their shardings (the default logical-axis rules). `jax.distributed` must be started first.
    A LoRA checkpoint gives its base with the adapters, folded into the weights with `merge_lora`."""
    import jax

    from llada_jax import sharding
    from llada_jax.config import DEFAULT_LOGICAL_AXIS_RULES

    sizes = sharding.mesh_shape(sharding.parse_mesh(mesh), jax.device_count())
    sharding.check_model_fits(sizes, read_model_config(path))
    on = sharding.make_mesh(sizes)
    model, tokenizer = load_model_and_tokenizer(path, dtype=dtype, mesh=on, rules=DEFAULT_LOGICAL_AXIS_RULES,
                                                merge_lora=merge_lora)
    return model, tokenizer, on


def read_model_config(path: str) -> LLaDAConfig:
    """The LLaDAConfig (architecture) of a saved model, Orbax or Hugging Face, without loading its weights."""
    if layout.model_format(path) == "hf":
        from llada_jax.checkpoints.hf_import import read_config

        return read_config(storage.clean(path))[1]
    from llada_jax.checkpoints.orbax_model import read_model_config as read_orbax_config

    return read_orbax_config(path)

