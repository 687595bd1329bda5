"""Training checkpoints: what a run resumes from."""

import pytest


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
