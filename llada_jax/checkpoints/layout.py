"""Where things are in a run directory and in a Hugging Face model directory.

A run directory (what `pretrain`, `sft` and `convert from-hf` write):

    <run>/config.json                 the training config (training runs)
    <run>/metrics.jsonl, tensorboard/ training metrics
    <run>/tokenizer/                  the tokenizer files, when the run has a tokenizer
    <run>/checkpoints/<step>/         one Orbax checkpoint step, a composite of the ITEMS below

A step is finished when Orbax has renamed its temporary directory into place and written its metadata file;
an interrupted save leaves neither, so it is never mistaken for a checkpoint.

A Hugging Face model directory holds `config.json` plus the weights and, usually, the tokenizer files. A
training run directory also holds a `config.json` (the training config), so a directory counts as Hugging
Face only when it is not an Orbax run.

Nothing here imports JAX or Orbax.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil

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

# Files that make up a tokenizer in a Hugging Face model directory.
TOKENIZER_PATTERNS = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "*.tiktoken", "chat_template.jinja",
    "chat_template.json",
)

_STEP = re.compile(r"\d+")


def _clean(path: str) -> str:
    return os.path.abspath(path.rstrip("/"))


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(_clean(run_dir), CHECKPOINTS)


def step_dir(run_dir: str, step: int) -> str:
    return os.path.join(checkpoints_dir(run_dir), str(step))


def is_finished(step_path: str) -> bool:
    """Whether a checkpoint step directory holds a completed save."""
    return os.path.exists(os.path.join(step_path, "_CHECKPOINT_METADATA")) and not re.search(
        r"\.orbax-checkpoint-tmp", step_path)


def finished_steps(run_dir: str) -> list[int]:
    """The steps of `run_dir/checkpoints/` whose save completed, ascending."""
    root = checkpoints_dir(run_dir)
    if not os.path.isdir(root):
        return []
    return sorted(int(name) for name in os.listdir(root)
                  if _STEP.fullmatch(name) and is_finished(os.path.join(root, name)))


def latest_finished_step(run_dir: str) -> int | None:
    steps = finished_steps(run_dir)
    return steps[-1] if steps else None


def is_orbax_checkpoint(path: str) -> bool:
    """A run directory (with checkpoints/), a checkpoints/ directory, or one step of it (with params/)."""
    path = _clean(path)
    return (os.path.isdir(os.path.join(path, CHECKPOINTS)) or os.path.basename(path) == CHECKPOINTS
            or os.path.isdir(os.path.join(path, PARAMS)))


def is_hf_model_dir(path: str) -> bool:
    """A Hugging Face model directory: config.json and no Orbax checkpoint."""
    return os.path.isfile(os.path.join(path, HF_CONFIG_FILE)) and not is_orbax_checkpoint(path)


def find_checkpoint(path: str) -> tuple[str, int]:
    """(run directory, step) that `path` names: a run directory (its latest finished step), its checkpoints/
    directory, or one step directory."""
    path = _clean(path)
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"{path}: no such checkpoint directory")
    if _STEP.fullmatch(os.path.basename(path)) and os.path.isdir(os.path.join(path, PARAMS)):
        root = os.path.dirname(path)
        if os.path.basename(root) != CHECKPOINTS:
            raise CheckpointNotFoundError(f"{path}: a step directory must sit in a '{CHECKPOINTS}' directory")
        if not is_finished(path):
            raise CheckpointNotFoundError(f"{path}: this checkpoint step was not finished (an interrupted save)")
        return os.path.dirname(root), int(os.path.basename(path))
    run_dir = os.path.dirname(path) if os.path.basename(path) == CHECKPOINTS else path
    if not os.path.isdir(checkpoints_dir(run_dir)):
        raise CheckpointNotFoundError(f"{path}: not a checkpoint (no '{CHECKPOINTS}' directory)")
    step = latest_finished_step(run_dir)
    if step is None:
        raise CheckpointNotFoundError(f"{checkpoints_dir(run_dir)}: holds no finished checkpoint step")
    return run_dir, step


def model_format(path: str) -> str:
    """"hf" or "orbax": the kind of saved model at `path` (CheckpointNotFoundError when it is neither)."""
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"{path}: no such model directory (an Orbax checkpoint or a Hugging Face "
                                      "directory with config.json)")
    if is_hf_model_dir(path):
        return "hf"
    if is_orbax_checkpoint(path):
        return "orbax"
    raise CheckpointNotFoundError(f"{path}: neither a Hugging Face model directory (no config.json) nor an Orbax "
                                  f"checkpoint (no '{CHECKPOINTS}' directory)")


def tokenizer_files(directory: str | None) -> list[str]:
    """Names of the tokenizer files in a directory (an HF model directory or a tokenizer directory)."""
    if not directory or not os.path.isdir(directory):
        return []
    return sorted(f for f in os.listdir(directory)
                  if os.path.isfile(os.path.join(directory, f))
                  and any(fnmatch.fnmatch(f, pattern) for pattern in TOKENIZER_PATTERNS))


def tokenizer_path(model_path: str) -> str | None:
    """The tokenizer stored with a saved model (an HF directory, or `tokenizer/` of a run), if there is one."""
    path = _clean(model_path)
    candidates = [path, os.path.join(path, TOKENIZER)]
    if _STEP.fullmatch(os.path.basename(path)):  # a step directory: the run is two levels up
        candidates.append(os.path.join(os.path.dirname(os.path.dirname(path)), TOKENIZER))
    if os.path.basename(path) == CHECKPOINTS:
        candidates.append(os.path.join(os.path.dirname(path), TOKENIZER))
    for c in candidates:
        if os.path.exists(os.path.join(c, "tokenizer.json")) or os.path.exists(os.path.join(c, "tokenizer_config.json")):
            return c
    return None


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    """Copy the tokenizer files of `src` (see TOKENIZER_PATTERNS) into the directory `dst`."""
    files = tokenizer_files(src)
    if files:
        os.makedirs(dst, exist_ok=True)
    for f in files:
        shutil.copy2(os.path.join(src, f), os.path.join(dst, f))
    return files
