"""`llada-jax eval-likelihood`: a model it cannot evaluate (the command end to end is in
tests/eval/test_likelihood.py, beside the estimator it runs)."""

import json
import os

from flax import nnx

from llada_jax import LLaDAConfig, LLaDAForMaskedLM
from llada_jax.cli import main


def test_a_model_without_pad_or_eos_is_one_clear_error(tmp_path, capsys):
    """Issue 28: prompts are left-padded with pad_token_id, else eos_token_id (LLaDA pads with its EOS); a model
    with neither is one line naming the field and the model's config file, exit 2, nothing written."""
    config = LLaDAConfig.tiny(eos_token_id=None, pad_token_id=None, max_sequence_length=64)
    hf = LLaDAForMaskedLM(config, rngs=nnx.Rngs(0)).save_pretrained(str(tmp_path / "hf"))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt_ids": [5, 6], "answer_ids": [7]}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["eval-likelihood", "--model", hf, "--input", str(pairs), "--output", str(out), "--mc_num", "2",
                 "--batch_size", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"llada-jax eval-likelihood: error: --model: {os.path.join(hf, 'config.json')}: "
                          "pad_token_id "), err
    assert not out.exists()
