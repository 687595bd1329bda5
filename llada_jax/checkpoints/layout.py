"""Where things are in a run directory and in a Hugging Face model directory.

A run directory (what `pretrain`, `sft` and `convert from-hf` write):

    <run>/config.json                 the training config (training runs)
    <run>/metrics.jsonl, tensorboard/ training metrics
    <run>/tokenizer/                  the tokenizer files, when the run has a tokenizer
    <run>/checkpoints/<step>/         one Orbax checkpoint step, a composite of the ITEMS below

A step is finished when Orbax has finalised it: renamed its temporary directory into place on a file system,
written its `commit_success.txt` marker on an object store (gs://: there is no rename); an interrupted save
leaves neither, so it is never mistaken for a checkpoint. Every path may be a URL (`storage`).

A Hugging Face model directory holds `config.json` plus the weights and, usually, the tokenizer files. A
training run directory also holds a `config.json` (the training config), so a directory counts as Hugging
Face only when it is not an Orbax run.

Nothing here imports JAX; Orbax only to ask whether a step is finished.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil

from llada_jax.checkpoints import storage
from llada_jax.checkpoints.storage import join
from llada_jax.errors import CheckpointNotFoundError

CHECKPOINTS = "checkpoints"
TOKENIZER = "tokenizer"
RUN_CONFIG = "config.json"
HF_CONFIG_FILE = "config.json"

# The items of a checkpoint step.
PARAMS = "params"  # the model parameters, in the layout model_config describes (scanned or unrolled)
MODEL_CONFIG = "model_config"  # LLaDAConfig as JSON
HF_CONFIG = "hf_config"  # the config.json a model was imported from (so an export writes it back)
OPT_STATE = "opt_state"  # optimizer state (training checkpoints)
TRAIN_STATE = "train_state"  # step, seed and the non-finite counters as JSON (training checkpoints)
TRAIN_CONFIG = "config"  # the full training config as JSON (training checkpoints)
DATA_STATE = "data"  # the data iterator's state (training checkpoints)
LORA = "lora"  # LoRA checkpoints: the LoRAConfig and the base model's path (`params` then holds the adapters)

# The files whose presence makes a directory a tokenizer (`tokenizer_path`): copied last, so that a partial copy
# to an object store is not taken for a tokenizer.
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")
# Files that make up a tokenizer in a Hugging Face model directory.
TOKENIZER_PATTERNS = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "*.tiktoken", "chat_template.jinja",
    "chat_template.json",
)

_STEP = re.compile(r"\d+")


def checkpoints_dir(run_dir: str) -> str:
    return join(storage.clean(run_dir), CHECKPOINTS)


def step_dir(run_dir: str, step: int) -> str:
    return join(checkpoints_dir(run_dir), str(step))


def is_finished(step_path: str) -> bool:
    """Whether a checkpoint step directory holds a completed save."""
    from orbax.checkpoint import path as ocp_path

    return storage.is_dir(step_path) and ocp_path.step.is_checkpoint_finalized(step_path)


def finished_steps(run_dir: str) -> list[int]:
    """The steps of `run_dir/checkpoints/` whose save completed, ascending."""
    root = checkpoints_dir(run_dir)
    return sorted(int(name) for name in storage.listdir(root)
                  if _STEP.fullmatch(name) and is_finished(join(root, name)))


def latest_finished_step(run_dir: str) -> int | None:
    steps = finished_steps(run_dir)
    return steps[-1] if steps else None


def is_lora_step(run_dir: str, step: int) -> bool:
    """Whether a checkpoint step holds LoRA adapters (its `lora` item names the base model) rather than a whole
    model; `checkpoints.adapters` reads and writes such steps."""
    return storage.is_dir(join(step_dir(run_dir, step), LORA))


def _base(path: str) -> str:
    return storage.clean(path).rsplit("/", 1)[-1]


def _parent(path: str) -> str:
    return storage.clean(path).rsplit("/", 1)[0]


def is_orbax_checkpoint(path: str) -> bool:
    """A run directory (with checkpoints/), a checkpoints/ directory, or one step of it (with params/)."""
    return (storage.is_dir(join(path, CHECKPOINTS)) or _base(path) == CHECKPOINTS
            or storage.is_dir(join(path, PARAMS)))


def is_hf_model_dir(path: str) -> bool:
    """A Hugging Face model directory: config.json and no Orbax checkpoint."""
    return storage.is_file(join(path, HF_CONFIG_FILE)) and not is_orbax_checkpoint(path)


def find_checkpoint(path: str) -> tuple[str, int]:
    """(run directory, step) that `path` names: a run directory (its latest finished step), its checkpoints/
    directory, or one step directory."""
    path = storage.clean(path)
    if not storage.is_dir(path):
        raise CheckpointNotFoundError(f"{path}: no such checkpoint directory")
    if _STEP.fullmatch(_base(path)) and storage.is_dir(join(path, PARAMS)):
        root = _parent(path)
        if _base(root) != CHECKPOINTS:
            raise CheckpointNotFoundError(f"{path}: a step directory must sit in a '{CHECKPOINTS}' directory")
        if not is_finished(path):
            raise CheckpointNotFoundError(f"{path}: this checkpoint step was not finished (an interrupted save)")
        return _parent(root), int(_base(path))
    run_dir = _parent(path) if _base(path) == CHECKPOINTS else path
    if not storage.is_dir(checkpoints_dir(run_dir)):
        raise CheckpointNotFoundError(f"{path}: not a checkpoint (no '{CHECKPOINTS}' directory)")
    step = latest_finished_step(run_dir)
    if step is None:
        raise CheckpointNotFoundError(f"{checkpoints_dir(run_dir)}: holds no finished checkpoint step")
    return run_dir, step


def model_format(path: str) -> str:
    """"hf" or "orbax": the kind of saved model at `path` (CheckpointNotFoundError when it is neither)."""
    if not storage.is_dir(path):
        raise CheckpointNotFoundError(f"{path}: no such model directory (an Orbax checkpoint or a Hugging Face "
                                      "directory with config.json)")
    if is_hf_model_dir(path):
        return "hf"
    if is_orbax_checkpoint(path):
        return "orbax"
    raise CheckpointNotFoundError(f"{path}: neither a Hugging Face model directory (no config.json) nor an Orbax "
                                  f"checkpoint (no '{CHECKPOINTS}' directory)")


def model_config_file(path: str) -> str:
    """Where the architecture of the saved model at `path` is stored (for messages that name it): the Hugging Face
    directory's config.json, or the model_config item of the Orbax checkpoint step that `path` names."""
    if model_format(path) == "hf":
        return join(storage.clean(path), HF_CONFIG_FILE)
    return join(step_dir(*find_checkpoint(path)), MODEL_CONFIG)


def tokenizer_files(directory: str | None) -> list[str]:
    """Names of the tokenizer files in a directory (an HF model directory or a tokenizer directory)."""
    if not directory or not storage.is_dir(directory):
        return []
    return [f for f in storage.listdir(directory) if any(fnmatch.fnmatch(f, p) for p in TOKENIZER_PATTERNS)
            and storage.is_file(join(directory, f))]


def tokenizer_path(model_path: str) -> str | None:
    """The tokenizer stored with a saved model (an HF directory, or `tokenizer/` of a run), if there is one."""
    path = storage.clean(model_path)
    candidates = [path, join(path, TOKENIZER)]
    if _STEP.fullmatch(_base(path)):  # a step directory: the run is two levels up
        candidates.append(join(_parent(_parent(path)), TOKENIZER))
    if _base(path) == CHECKPOINTS:
        candidates.append(join(_parent(path), TOKENIZER))
    for c in candidates:
        if any(storage.exists(join(c, name)) for name in TOKENIZER_MARKERS):
            return c
    return None


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    """Copy the tokenizer files of `src` (see TOKENIZER_PATTERNS) into the directory `dst` (either may be a
    URL)."""
    files = sorted(tokenizer_files(src), key=lambda f: f in TOKENIZER_MARKERS)
    storage.makedirs(dst)
    for f in files:
        if storage.is_url(src) or storage.is_url(dst):
            with storage.open_file(join(src, f), "rb") as a, storage.open_file(join(dst, f), "wb") as b:
                shutil.copyfileobj(a, b)
        else:
            shutil.copy2(os.path.join(src, f), os.path.join(dst, f))
    return files
