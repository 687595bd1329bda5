"""Batch sampling to a JSONL file: length-grouped batches, lines in input order."""

import json

import numpy as np


def test_sample_file_groups_prompts_by_length_and_writes_in_input_order(tmp_path):
    """Within a window, prompts are sorted by length before batching (less padding); lines come out in input
    order with each prompt's own generation."""
    from types import SimpleNamespace

    from llada_jax.sampling.batch import sample_file

    lengths = [3, 40, 4, 37, 5, 35, 2]
    encoded = [[7] * n for n in lengths]
    records = [{"id": i} for i in range(len(lengths))]
    batches = []

    def sampler(model, ids, mask, rng, return_stats):
        real = np.asarray(mask).sum(1)
        batches.append(real.tolist())
        generated = np.repeat(real[:, None], 4, axis=1)  # "generate" each row's prompt length
        return np.concatenate([np.asarray(ids), generated], axis=1), SimpleNamespace(nfe=np.full(len(real), 4))

    sampler.options = SimpleNamespace(gen_length=4)
    model = SimpleNamespace(config=SimpleNamespace(max_sequence_length=96, pad_token_id=0))
    out = str(tmp_path / "out.jsonl")
    assert sample_file(model, None, sampler, records, encoded, out, batch_size=2, seed=0, progress=False) == 7
    # sorted lengths 2 3 | 4 5 | 35 37 | 40 and a filler row (one real token)
    assert batches == [[2, 3], [4, 5], [35, 37], [40, 1]]
    lines = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert [line["id"] for line in lines] == list(range(7))
    assert [line["output_ids"] for line in lines] == [[n] * 4 for n in lengths]
