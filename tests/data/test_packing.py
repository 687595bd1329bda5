"""Packed rows (data.pack): documents and SFT examples packed into rows with segment ids (first fit over a
lookahead), against a naive packing of the same stream; exact resume mid-epoch and mid-record; process-count independence; bad settings."""

import json

import numpy as np
import pytest

from llada_jax.config import LLaDAConfig
from llada_jax.data.batching import PACK_LOOKAHEAD
from llada_jax.data.pipeline import make_train_iterator, merge_states
from llada_jax.data.settings import check_config, pad_multiple
from llada_jax.errors import ConfigError
from tests.data.datahelpers import tiny_train_config, write_jsonl

TINY = LLaDAConfig.tiny()
EOS, L = 510, 16


def docs_file(tmp_path, lengths):
    docs = [[i + 1] * n for i, n in enumerate(lengths)]
    return write_jsonl(tmp_path / "docs.jsonl", [{"input_ids": d} for d in docs]), docs


def first_fit(units, rows):
    """The naive packing: (input_ids, segment_ids, prompt_mask) of `rows` rows from units (tokens, prompt length):
    each row takes, in order, every waiting unit that fits, until it is full or PACK_LOOKAHEAD units did not fit."""
    ids, segments, prompt = np.full((rows, L), EOS), np.zeros((rows, L), int), np.zeros((rows, L), int)
    waiting = list(units)
    for row in range(rows):
        fill, misses, k = 0, 0, 0
        while k < len(waiting) and fill < L and misses < PACK_LOOKAHEAD:
            tokens, p = waiting[k]
            if fill + len(tokens) > L:
                misses, k = misses + 1, k + 1
                continue
            del waiting[k]
            ids[row, fill:fill + len(tokens)], segments[row, fill:fill + len(tokens)] = tokens, segments[row].max() + 1
            prompt[row, fill:fill + p] = 1
            fill += len(tokens)
    return ids, segments, prompt


def test_pad_mode_packs_whole_documents_and_splits_long_ones(tmp_path):
    path, docs = docs_file(tmp_path, [3, 15, 16, 40, 1, 5, 2, 2, 9])
    it = make_train_iterator(tiny_train_config(path, tmp_path, shuffle=False, pretrain_mode="pad", batch_size=2,
                                               num_shards=1, pack=True), TINY)
    batches = [next(it) for _ in range(5)]
    assert set(batches[0]) == {"input_ids", "segment_ids"} and batches[0]["segment_ids"].dtype == np.int32
    pieces = [(d[start:start + L], 0) for d in (doc + [EOS] for doc in docs * 3) for start in range(0, len(d), L)]
    ids, segments, _ = first_fit(pieces, 10)
    np.testing.assert_array_equal(np.concatenate([b["input_ids"] for b in batches]), ids)
    np.testing.assert_array_equal(np.concatenate([b["segment_ids"] for b in batches]), segments)
    assert segments.max() >= 3  # several documents share rows


def test_concat_mode_rows_are_unchanged_and_each_document_a_segment(tmp_path):
    path, _ = docs_file(tmp_path, [3, 1, 7, 20, 2, 5])
    plain = make_train_iterator(tiny_train_config(path, tmp_path, shuffle=False, num_shards=1), TINY)
    packed = make_train_iterator(tiny_train_config(path, tmp_path, shuffle=False, num_shards=1, pack=True), TINY)
    for _ in range(3):
        a, b = next(plain), next(packed)
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        for row, seg in zip(b["input_ids"], b["segment_ids"]):  # a new segment after every EOS, 1 at a row's start
            expected = 1 + np.concatenate([[0], np.cumsum(row[:-1] == EOS)])
            np.testing.assert_array_equal(seg, expected)


def test_sft_examples_are_padded_to_the_multiple_and_packed(tmp_path):
    examples = [([509, 5, 6, 7, 8], 2), ([509, 9, 10], 1), (list(range(1, 13)), 4), ([509, 3], 1), ([1] * 14, 6)]
    path = write_jsonl(tmp_path / "sft.jsonl", [{"input_ids": ids, "prompt_length": p} for ids, p in examples])
    it = make_train_iterator(tiny_train_config(path, tmp_path, task="sft", shuffle=False, batch_size=2, num_shards=1,
                                               pack=True, pad_multiple=4), TINY)
    batches = [next(it) for _ in range(3)]
    assert set(batches[0]) == {"input_ids", "segment_ids", "prompt_mask"}
    # each answer EOS-padded to the next multiple of 4 above its length (at least one EOS), never past L
    padded = [(ids + [EOS] * (min(-(-(len(ids) - p + 1) // 4) * 4, L - p) - (len(ids) - p)), p)
              for ids, p in examples]
    assert [len(u) for u, _ in padded] == [6, 5, 16, 5, 16]  # the last two capped at L
    ids, segments, prompt = first_fit(padded * 3, 6)
    for key, want in (("input_ids", ids), ("segment_ids", segments), ("prompt_mask", prompt)):
        np.testing.assert_array_equal(np.concatenate([b[key] for b in batches]), want)
    # the default multiple: a block_causal model's block size (whole answer blocks), else 1
    c = tiny_train_config(path, tmp_path, task="sft")
    assert pad_multiple(c, TINY) == 1
    assert pad_multiple(c, LLaDAConfig.tiny(attention_type="block_causal", block_size=8)) == 8


def chats():
    turn = lambda role, text: {"role": role, "content": text}  # noqa: E731
    return [{"messages": [turn("user", "What is the capital of France?"), turn("assistant", "Paris."),
                          turn("user", "And of Italy?"), turn("assistant", "Rome.")]},
            {"input_ids": [509, 17, 18, 19, 20], "prompt_length": 2},
            {"messages": [turn("user", "Hello"), turn("assistant", "Hello world!")]}]


@pytest.mark.parametrize("task", ["pretrain", "sft"])
def test_exact_resume_with_packing_mid_epoch_and_mid_record(tmp_path, tokenizer_dir, task):
    if task == "pretrain":
        path, _ = docs_file(tmp_path, [5 + (11 * i) % 37 for i in range(30)])
        c = tiny_train_config(path, tmp_path, pretrain_mode="pad", batch_size=2, seed=3, pack=True,
                              prefetch_buffer_size=2)
    else:
        path = write_jsonl(tmp_path / "sft.jsonl", chats() * 10)
        c = tiny_train_config(path, tmp_path, task="sft", max_length=128, batch_size=2, seed=3, pack=True,
                              tokenizer=tokenizer_dir)
    it = make_train_iterator(c, TINY)
    next(it)
    # stream 0 inside a record (a document, a dialogue), and units emitted ahead of the first one waiting
    while it.get_state()["streams"]["0"]["offset"] == 0 or not any(
            stream["ahead"] for stream in it.get_state()["streams"].values()):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["streams"]["0"]["record"] < 15  # mid-epoch (each of the 2 streams reads 15 records an epoch)
    rest = [next(it) for _ in range(10)]
    fresh = make_train_iterator(c, TINY)
    fresh.set_state(state)
    for a, b in zip(rest, [next(fresh) for _ in range(10)]):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_packed_batches_do_not_depend_on_the_process_count(tmp_path):
    path, _ = docs_file(tmp_path, [3 + (5 * i) % 29 for i in range(40)])
    c = tiny_train_config(path, tmp_path, pretrain_mode="pad", batch_size=4, seed=4, pack=True)
    one = make_train_iterator(c, TINY)
    two = [make_train_iterator(c, TINY, process_index=i, process_count=2) for i in range(2)]
    for _ in range(6):
        expected = next(one)
        local = [next(it) for it in two]
        for key in expected:
            np.testing.assert_array_equal(np.concatenate([batch[key] for batch in local]), expected[key])
    again = make_train_iterator(c, TINY)  # the two processes' states restore one process, and the other way round
    again.set_state(merge_states([json.loads(json.dumps(it.get_state())) for it in two]))
    split = make_train_iterator(c, TINY, process_index=1, process_count=2)
    split.set_state(one.get_state())
    for _ in range(3):
        expected = next(one)
        np.testing.assert_array_equal(next(again)["segment_ids"], expected["segment_ids"])
        np.testing.assert_array_equal(next(split)["input_ids"], expected["input_ids"][2:])


def test_bad_packing_settings_are_one_line_naming_the_field(tmp_path):
    from llada_jax.train.loop import validate

    path, _ = docs_file(tmp_path, [3])
    c = tiny_train_config(path, tmp_path, task="sft", pack=True, pad_multiple=-2)
    with pytest.raises(ValueError, match=r"^data.pad_multiple: expected an integer in \[0, max_length 16\]"):
        check_config(c)
    for task, pack, why in (("sft", False, "data.pack is false"), ("pretrain", True, "task is 'pretrain'")):
        c = tiny_train_config(path, tmp_path, task=task, pack=pack, pad_multiple=8)
        c.output_dir, c.random_length_prob = str(tmp_path / "run"), 0.01 if task == "pretrain" else 0.0
        with pytest.raises(ConfigError, match=f"^data.pad_multiple is set, but {why}") as error:
            validate(c)
        assert "\n" not in str(error.value)
