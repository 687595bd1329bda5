"""Training checkpoints: what a run resumes from, and a damaged one."""

import glob
import os
import re

import pytest

from llada_jax.train.metrics import read_metrics
from tests.runs import TINY, cli


def test_resume_needs_a_training_checkpoint(tmp_path):
    from flax import nnx

    from llada_jax import LLaDAConfig, LLaDAForMaskedLM
    from llada_jax.checkpoints.orbax_model import save_model
    from llada_jax.errors import ResumeError
    from llada_jax.train.checkpoint import check_resumable

    assert check_resumable(str(tmp_path), seed=0) is None  # an empty output_dir: a new run
    save_model(LLaDAForMaskedLM(LLaDAConfig.tiny(), rngs=nnx.Rngs(0)), str(tmp_path), step=3)
    with pytest.raises(ResumeError, match="is a model checkpoint, not a training run's .* --model_name_or_path"):
        check_resumable(str(tmp_path), seed=0)


def test_a_damaged_newest_checkpoint_is_one_clear_error_and_an_older_step_resumes(tmp_path, pretrain_data):
    """Truncated data files of the newest step (bit rot, a partial copy between buckets): one line naming the
    step, what is wrong and the readable older steps, a clean exit; `checkpoint.restore_step` then resumes from
    an older step and gives the uninterrupted run's losses."""
    straight, damaged = str(tmp_path / "straight"), str(tmp_path / "damaged")
    cli(*run(pretrain_data, straight, 9))
    assert cli(*run(pretrain_data, damaged, 9), kill_after_step=6, check=False).returncode == -9  # saved 3, 6
    files = glob.glob(os.path.join(damaged, "checkpoints", "6", "*", "ocdbt.process_0", "d", "*"))
    assert files
    for path in files:
        os.truncate(path, os.path.getsize(path) // 2)
    proc = cli(*run(pretrain_data, damaged, 9), check=False)
    assert proc.returncode == 2
    error = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"llada-jax pretrain: error: {re.escape(damaged)}/checkpoints/6: this checkpoint cannot be "
                        r"read \(OUT_OF_RANGE: .*\); readable older steps: 3\. To resume from one, run the same "
                        r"command with --config\.checkpoint\.restore_step=3 \(the later steps are deleted\)", error), error
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr  # nothing else, no shutdown noise
    cli(*run(pretrain_data, damaged, 9, "--config.checkpoint.restore_step=3"))
    rows = [(m["step"], m["loss"], m["batch_checksum"]) for m in read_metrics(damaged)]
    assert rows == [(m["step"], m["loss"], m["batch_checksum"]) for m in read_metrics(straight)]
    assert sorted(int(d) for d in os.listdir(os.path.join(damaged, "checkpoints"))) == [3, 6, 9]
    proc = cli(*run(pretrain_data, damaged, 12, "--config.checkpoint.restore_step=5"), check=False)
    assert proc.returncode == 2 and "checkpoint.restore_step 5: " in proc.stderr and "it has 3, 6, 9" in proc.stderr


def run(data, out, steps, *extra):
    return ["pretrain", "--config", TINY, "--data_path", data, "--output_dir", out, "--max_steps", str(steps),
            "--batch_size", "8", "--max_length", "32", "--save_steps", "3", "--logging_steps", "1",
            "--warmup_steps", "1", "--config.checkpoint.async_save=false", *extra]
