"""The Grain pipeline: token streams against naive computations, shuffling, row streams and process-count
independence, exact resume (state dicts and Orbax, across process layouts), worker processes, skipped records,
and the global batch on a device mesh. Tests of one stream's packing set data.num_shards=1 (one row stream)."""

import gc
import json
import logging
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from llada_jax.config import LLaDAConfig
from llada_jax.data.batching import StreamBatcherIterator
from llada_jax.data.pipeline import (
    global_batch,
    make_train_iterator,
    merge_states,
    pipeline_stats,
)
from llada_jax.data.settings import check_config
from llada_jax.errors import DataError
from tests.data.datahelpers import tiny_train_config, write_jsonl

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))

TINY = LLaDAConfig.tiny()
EOS = 510


def docs_file(tmp_path, lengths, name="docs.jsonl"):
    """Document i is the token i+1 repeated lengths[i] times (so a stream can be read back as doc ids)."""
    docs = [[i + 1] * n for i, n in enumerate(lengths)]
    return write_jsonl(tmp_path / name, [{"input_ids": d} for d in docs]), docs


def stream(it, n_batches):
    return np.concatenate([next(it)["input_ids"].ravel() for _ in range(n_batches)])


def doc_sequence(tokens):
    """Doc ids of the complete documents in a concat stream (each doc is one repeated id, then EOS)."""
    out, run = [], []
    for t in tokens.tolist():
        if t == EOS:
            out.append(run[0])
            assert set(run) == {run[0]}
            run = []
        else:
            run.append(t)
    return out


def test_concat_stream_is_documents_joined_with_eos(tmp_path):
    path, docs = docs_file(tmp_path, [3, 1, 7, 20, 2, 5])
    it = make_train_iterator(tiny_train_config(path, tmp_path, shuffle=False, num_shards=1), TINY)
    batch = next(it)
    assert set(batch) == {"input_ids"} and batch["input_ids"].shape == (4, 16) and batch["input_ids"].dtype == np.int32
    epoch = np.concatenate([d + [EOS] for d in docs])  # 44 tokens; three epochs in 3 batches of 64 tokens
    got = np.concatenate([batch["input_ids"].ravel(), stream(it, 2)])
    assert np.array_equal(got, np.tile(epoch, 5)[:len(got)])


def test_shuffle_is_seeded_and_changes_each_epoch(tmp_path):
    n = 20
    path, _ = docs_file(tmp_path, [1 + i % 4 for i in range(n)])  # 70 tokens per epoch
    c = tiny_train_config(path, tmp_path, seed=0, num_shards=1)
    epochs = doc_sequence(stream(make_train_iterator(c, TINY), 4))[:3 * n]
    first, second, third = epochs[:n], epochs[n:2 * n], epochs[2 * n:]
    for e in (first, second, third):
        assert sorted(e) == list(range(1, n + 1))  # every record once per epoch
    assert first != list(range(1, n + 1)) and first != second and second != third
    again = doc_sequence(stream(make_train_iterator(tiny_train_config(path, tmp_path, seed=0, num_shards=1), TINY), 4))
    assert again[:3 * n] == epochs  # deterministic for a seed
    other = doc_sequence(stream(make_train_iterator(tiny_train_config(path, tmp_path, seed=7, num_shards=1), TINY),
                                4))
    assert other[:n] != first


def test_pad_mode_one_document_per_row(tmp_path):
    path, docs = docs_file(tmp_path, [3, 15, 16, 40, 1])
    it = make_train_iterator(tiny_train_config(path, tmp_path, shuffle=False, pretrain_mode="pad", batch_size=3,
                                               num_shards=1), TINY)
    rows = np.concatenate([next(it)["input_ids"] for _ in range(3)])
    expected = []
    for d in docs:  # doc + EOS, cut into rows of 16, the last one EOS-padded
        toks = d + [EOS]
        for start in range(0, len(toks), 16):
            chunk = toks[start:start + 16]
            expected.append(chunk + [EOS] * (16 - len(chunk)))
    assert len(expected) == 8  # 1 + 1 + 2 (16 tokens + EOS) + 3 (40 + EOS) + 1
    assert rows[:8].tolist() == expected and rows[8].tolist() == expected[0]


def test_text_documents_are_tokenized(tmp_path, helper, tokenizer_dir):
    texts = ["The capital of France is Paris.", "Hello world!", "A quick brown fox."]
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in texts])
    c = tiny_train_config(path, tmp_path, shuffle=False, batch_size=2, tokenizer=tokenizer_dir,
                          prefetch_buffer_size=2, num_shards=1)
    it = make_train_iterator(c, TINY)
    epoch = [tok for t in texts for tok in helper.encode(t) + [EOS]]
    got = stream(it, 2).tolist()
    assert got == (epoch * 10)[:len(got)]
    assert pipeline_stats(it)["records"] >= 3  # the stats are found behind the prefetch thread too


def chat_records():
    return [
        {"conversations": [{"from": "human", "value": "What is the capital of France?"},
                           {"from": "gpt", "value": "Paris."},
                           {"from": "human", "value": "And of Italy?"},
                           {"from": "gpt", "value": "Rome."}]},
        {"input_ids": [509, 17, 18, 19, 20], "prompt_length": 2},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                      {"role": "assistant", "content": "Hello world!"}]},
    ]


def test_sft_batches_align_prompt_answer_and_padding_token_by_token(tmp_path, helper, tokenizer_dir):
    path = write_jsonl(tmp_path / "sft.jsonl", chat_records())
    c = tiny_train_config(path, tmp_path, task="sft", max_length=96, batch_size=2, shuffle=False,
                          tokenizer=tokenizer_dir, num_shards=1)
    it = make_train_iterator(c, TINY)
    batches = [next(it) for _ in range(2)]
    e = helper.encode
    head = lambda role, text: [506] + e(role) + [507] + e("\n\n" + text) + [508]  # noqa: E731
    gen = [506] + e("assistant") + [507] + e("\n\n")
    p1 = [509] + head("user", "What is the capital of France?") + gen
    a1 = e("Paris.") + [508]
    p2 = [509] + head("user", "What is the capital of France?") + head("assistant", "Paris.") + head(
        "user", "And of Italy?") + gen
    a2 = e("Rome.") + [508]
    p4 = [509] + head("system", "Be brief.") + head("user", "Hello") + gen
    a4 = e("Hello world!") + [508]
    expected = [(p1, a1), (p2, a2), ([509, 17], [18, 19, 20]), (p4, a4)]
    rows = [r for b in batches for r in b["input_ids"].tolist()]
    pls = [int(x) for b in batches for x in b["prompt_lengths"]]
    als = [int(x) for b in batches for x in b["answer_lengths"]]
    for row, pl, al, (prompt, answer) in zip(rows, pls, als, expected):
        assert pl == len(prompt) and al == 96 - len(prompt)
        assert row[:pl] == prompt  # the prompt, never masked by the SFT objective
        assert row[pl:pl + len(answer)] == answer  # the answer ...
        assert row[pl + len(answer):] == [EOS] * (96 - pl - len(answer))  # ... and its EOS padding
    for b in batches:
        assert b["prompt_lengths"].dtype == np.int32 and b["answer_lengths"].dtype == np.int32


@pytest.mark.parametrize("task,prefetch", [("pretrain", 0), ("pretrain", 2), ("sft", 2)])
def test_exact_resume_mid_epoch_and_mid_record(tmp_path, tokenizer_dir, task, prefetch):
    if task == "pretrain":
        path, _ = docs_file(tmp_path, [5 + (7 * i) % 37 for i in range(30)])
        c = tiny_train_config(path, tmp_path, batch_size=2, seed=3, prefetch_buffer_size=prefetch)
    else:
        path = write_jsonl(tmp_path / "sft.jsonl", chat_records() * 5)
        c = tiny_train_config(path, tmp_path, task="sft", max_length=96, batch_size=3, seed=3,
                              prefetch_buffer_size=prefetch, tokenizer=tokenizer_dir)
    it = make_train_iterator(c, TINY)
    for _ in range(3):
        next(it)
    while it.get_state()["streams"]["0"]["offset"] == 0:  # stream 0 inside a record (a document, or a dialogue)
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    first = state["streams"]["0"]
    assert first["offset"] > 0 and first["record"] < 15  # mid-record, mid-epoch (each stream reads 15 an epoch)
    rest = [next(it) for _ in range(12)]
    fresh = make_train_iterator(c, TINY)
    fresh.set_state(state)
    again = [next(fresh) for _ in range(12)]
    for a, b in zip(rest, again):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_orbax_composite_checkpoint_restores_the_stream(tmp_path):
    import grain
    import orbax.checkpoint as ocp

    path, _ = docs_file(tmp_path, [5 + (3 * i) % 23 for i in range(25)])
    c = tiny_train_config(path, tmp_path, batch_size=2, seed=1, prefetch_buffer_size=2)
    it = make_train_iterator(c, TINY)
    for _ in range(4):
        next(it)
    mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it),
                                         meta=ocp.args.JsonSave({"step": 4})))
    mngr.wait_until_finished()
    rest = [next(it)["input_ids"] for _ in range(10)]
    assert (tmp_path / "ckpt" / "4" / "data" / "process_0-of-1.json").exists()

    fresh = make_train_iterator(c, TINY)
    restored = mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh),
                                                       meta=ocp.args.JsonRestore()))
    assert restored.meta == {"step": 4}
    again = [next(restored.data)["input_ids"] for _ in range(10)]
    assert all(np.array_equal(a, b) for a, b in zip(rest, again))
    mngr.close()


def test_restoring_into_a_different_pipeline(tmp_path, caplog):
    path, _ = docs_file(tmp_path, [3, 4, 5, 6])
    it = make_train_iterator(tiny_train_config(path, tmp_path, batch_size=2), TINY)
    next(it)
    state = it.get_state()
    other = make_train_iterator(tiny_train_config(path, tmp_path, batch_size=2, num_shards=1), TINY)
    with pytest.raises(ValueError, match=r"saved by a pipeline with num_streams=2 \(now 1\)"):
        other.set_state(state)
    with caplog.at_level(logging.WARNING):
        make_train_iterator(tiny_train_config(path, tmp_path, batch_size=2, seed=9), TINY).set_state(state)
    assert "saved with seed=0 (now 9)" in caplog.text
    # the worker layout is not part of the state: a run may change data.num_workers
    with make_train_iterator(tiny_train_config(path, tmp_path, batch_size=2, num_workers=1), TINY) as workers:
        workers.set_state(state)
        np.testing.assert_array_equal(next(workers)["input_ids"], next(it)["input_ids"])


def test_row_streams_partition_each_epoch_over_the_processes(tmp_path):
    n = 10
    path, _ = docs_file(tmp_path, [2 + i % 5 for i in range(n)])  # each document fits one row
    c = tiny_train_config(path, tmp_path, pretrain_mode="pad", batch_size=4, seed=5)  # 4 row streams
    # stream s reads positions s, s + 4, s + 8, ... of the epoch order: in the first epoch (positions 0-9)
    # process 0 (streams 0, 1) reads positions 0, 1, 4, 5, 8, 9 and process 1 (streams 2, 3) 2, 3, 6, 7
    seen = []
    for index, steps in ((0, 3), (1, 2)):
        it = make_train_iterator(c, TINY, process_index=index, process_count=2)
        rows = np.concatenate([next(it)["input_ids"] for _ in range(steps)])
        assert rows.shape == (2 * steps, 16)
        seen.append([int(r[0]) for r in rows])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(1, n + 1))  # each record once in the epoch
    with pytest.raises(ValueError, match="batch_size 5 \\(global\\) must be a multiple of the process count 2"):
        make_train_iterator(tiny_train_config(path, tmp_path, batch_size=5), TINY, process_count=2)


@pytest.mark.parametrize("mode,num_shards", [("concat", 0), ("pad", 0), ("concat", 2)])
def test_global_batches_do_not_depend_on_the_process_count(tmp_path, mode, num_shards):
    path, _ = docs_file(tmp_path, [3 + (5 * i) % 29 for i in range(40)])
    c = tiny_train_config(path, tmp_path, pretrain_mode=mode, batch_size=4, seed=4, num_shards=num_shards)
    one = make_train_iterator(c, TINY)
    two = [make_train_iterator(c, TINY, process_index=i, process_count=2) for i in range(2)]
    four = [make_train_iterator(c, TINY, process_index=i, process_count=4) for i in range(4)] if not num_shards else []
    for _ in range(12):
        expected = next(one)["input_ids"]
        local = [next(it)["input_ids"] for it in two]
        assert local[0].shape == (2, 16)
        np.testing.assert_array_equal(np.concatenate(local), expected)
        if four:
            np.testing.assert_array_equal(np.concatenate([next(it)["input_ids"] for it in four]), expected)
    # the states of two processes together restore one process reading every stream, and vice versa
    merged = merge_states([json.loads(json.dumps(it.get_state())) for it in two])
    again = make_train_iterator(c, TINY)
    again.set_state(merged)
    split = make_train_iterator(c, TINY, process_index=1, process_count=2)
    split.set_state(one.get_state())
    for _ in range(5):
        expected = next(one)["input_ids"]
        np.testing.assert_array_equal(next(again)["input_ids"], expected)
        np.testing.assert_array_equal(next(split)["input_ids"], expected[2:])
    with pytest.raises(ValueError, match="data.num_shards 3 must be a positive multiple of the process count 2"):
        make_train_iterator(tiny_train_config(path, tmp_path, num_shards=3), TINY, process_count=2)


def test_worker_processes_give_the_same_stream_and_resume(tmp_path):
    path, _ = docs_file(tmp_path, [3 + (5 * i) % 17 for i in range(40)])
    base = tiny_train_config(path, tmp_path, batch_size=2, seed=2, prefetch_buffer_size=2)
    reference = [b["input_ids"] for b in (lambda it: [next(it) for _ in range(16)])(make_train_iterator(base, TINY))]
    c = tiny_train_config(path, tmp_path, batch_size=2, seed=2, prefetch_buffer_size=2, num_workers=2)
    it = make_train_iterator(c, TINY)
    try:
        first = [next(it)["input_ids"] for _ in range(8)]
        state = json.loads(json.dumps(it.get_state()))
        later = [next(it)["input_ids"] for _ in range(8)]
        assert all(np.array_equal(a, b) for a, b in zip(first + later, reference))
        it.set_state(state)
        assert all(np.array_equal(next(it)["input_ids"], b) for b in later)
    finally:
        it.close()


def test_bad_record_stops_the_pipeline_naming_file_and_line(tmp_path):
    lines = [json.dumps({"input_ids": [1, 2, 3]})] * 3 + ['{"input_ids": [1, -4]}'] + [json.dumps({"input_ids": [5]})]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    it = make_train_iterator(tiny_train_config(path, tmp_path, shuffle=False, batch_size=1), TINY)
    with pytest.raises(DataError, match=r"bad.jsonl, line 4: field 'input_ids': position 1: negative token id -4"):
        for _ in range(5):
            next(it)


def test_skip_invalid_skips_counts_and_reports(tmp_path, caplog):
    lines = [json.dumps({"input_ids": [1, 2, 3]}), "{oops", json.dumps({"input_ids": [4, 511]}),
             json.dumps({"input_ids": [5, 6]}), "", json.dumps({"ids": [7]})]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    c = tiny_train_config(f"{path},{empty}", tmp_path, shuffle=False, batch_size=1, max_length=7, skip_invalid=True)
    with caplog.at_level(logging.WARNING):
        it = make_train_iterator(c, TINY)
        got = stream(it, 2)
    assert got.tolist() == [1, 2, 3, EOS, 5, 6, EOS] + [1, 2, 3, EOS, 5, 6, EOS]
    stats = pipeline_stats(it)
    # Lines 2, 3, 6 of the first pass and 2, 3 of the second (line 6 comes after the last token read).
    assert stats["skipped"]["invalid"] == 5 and stats["records"] == 9
    assert stats["skip_examples"][:3] == [
        f"[invalid] {path}, line 2: malformed JSON: Expecting property name enclosed in double quotes (column 2)",
        f"[invalid] {path}, line 3: field 'input_ids': position 1: the mask token 511 inside clean data (masks come "
        "from the noising process, never from the data)",
        f"[invalid] {path}, line 6: field 'input_ids': missing (a pretraining record needs 'input_ids' or 'text')"]
    assert f"{path}, line 2" in caplog.text and f"skipped {empty} (no records)" in caplog.text
    assert stats["empty_files"] == [str(empty)]
    # The counts are part of the state: a restored iterator continues them.
    state = it.get_state()
    fresh = make_train_iterator(c, TINY)
    fresh.set_state(state)
    assert pipeline_stats(fresh)["skipped"]["invalid"] == state["streams"]["0"]["report"]["counts"]["invalid"]


def test_sft_too_long_policies_are_counted(tmp_path):
    records = [{"input_ids": [509, 1, 2, 3, 4, 5, 6, 7], "prompt_length": 5}, {"input_ids": [9, 8], "prompt_length": 1}]
    path = write_jsonl(tmp_path / "sft.jsonl", records)
    c = tiny_train_config(path, tmp_path, task="sft", max_length=6, batch_size=2, shuffle=False, too_long="skip",
                          num_shards=1)
    it = make_train_iterator(c, TINY)
    assert next(it)["input_ids"].tolist() == [[9, 8, EOS, EOS, EOS, EOS]] * 2
    assert pipeline_stats(it)["skipped"]["too_long"] == 2  # record 1, read in both epochs
    c.data.too_long = "truncate_prompt"
    b = next(make_train_iterator(c, TINY))
    assert b["input_ids"].tolist() == [[509, 3, 4, 5, 6, 7], [9, 8, EOS, EOS, EOS, EOS]]
    assert b["prompt_lengths"].tolist() == [3, 1] and b["answer_lengths"].tolist() == [3, 5]
    c.data.too_long = "error"
    with pytest.raises(DataError, match="sft.jsonl, line 1: field 'input_ids': example of 8 tokens"):
        next(make_train_iterator(c, TINY))


def test_every_record_invalid_is_an_error_not_a_hang(tmp_path):
    path = write_jsonl(tmp_path / "all_bad.jsonl", ['{"input_ids": [-1]}', '{"input_ids": "x"}'])
    it = make_train_iterator(tiny_train_config(path, tmp_path, skip_invalid=True), TINY)
    with pytest.raises(DataError, match="every record of a whole pass was skipped"):
        next(it)


def test_configuration_errors(tmp_path, tokenizer_dir):
    path, _ = docs_file(tmp_path, [3])
    cases = [
        (dict(task="rl"), "task: expected one of \\('pretrain', 'sft'\\), got 'rl'"),
        (dict(data_path=""), "config.data_path is empty"),
        (dict(max_length=1024), "exceeds the model's max_sequence_length 512"),
        (dict(pretrain_mode="pack"), "data.pretrain_mode: expected one of"),
        (dict(too_long="cut"), "data.too_long: expected one of"),
    ]
    for change, message in cases:
        c = tiny_train_config(path, tmp_path)
        for key, value in change.items():
            (c.data if key in c.data else c)[key] = value
        with pytest.raises(ValueError, match=message):
            make_train_iterator(c, TINY)
    c = tiny_train_config(path, tmp_path, tokenizer=tokenizer_dir)
    with pytest.raises(ValueError, match="does not fit the model config: mask_token_id: tokenizer 511, model 126336"):
        make_train_iterator(c, LLaDAConfig.llada_8b(max_sequence_length=512))


def test_global_batch_on_a_device_mesh(tmp_path):
    import jax
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    path = write_jsonl(tmp_path / "sft.jsonl", [{"input_ids": [509, i + 1, i + 2, 7], "prompt_length": 2}
                                               for i in range(8)])
    it = make_train_iterator(tiny_train_config(path, tmp_path, task="sft", batch_size=8, max_length=8,
                                               shuffle=False), TINY)
    local = next(it)
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Explicit,) * 2)
    batch = global_batch(local, mesh, P(("data", "fsdp"), None))
    assert batch["input_ids"].shape == (8, 8) and batch["prompt_lengths"].shape == (8,)
    for key in local:
        assert np.array_equal(np.asarray(batch[key]), local[key])
    assert batch["input_ids"].sharding.spec == P(("data", "fsdp"), None)
    assert batch["answer_lengths"].sharding.spec == P(("data", "fsdp"))
    assert len({s.device for s in batch["input_ids"].addressable_shards}) == 8
    assert all(s.data.shape == (1, 8) for s in batch["input_ids"].addressable_shards)


def test_bad_record_in_a_worker_process_is_reported_the_same(tmp_path):
    lines = [json.dumps({"input_ids": [1, 2, 3]})] * 6 + ['{"input_ids": [1, -4]}']
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    it = make_train_iterator(tiny_train_config(path, tmp_path, shuffle=False, batch_size=1, num_workers=2), TINY)
    try:
        with pytest.raises(DataError, match=r"bad.jsonl, line 7: field 'input_ids': position 1: negative token id -4"):
            for _ in range(10):
                next(it)
    finally:
        it.close()


def test_check_config_returns_the_shard_count_and_names_the_field(tmp_path):
    c = tiny_train_config("unused.jsonl", tmp_path, batch_size=4)
    assert check_config(c) == 4 and check_config(c, process_count=2) == 4  # one row stream per row
    c.data.num_shards = 2
    assert check_config(c) == 2 and check_config(c, process_count=2) == 2
    c.data.num_shards = 4
    assert check_config(c, process_count=2) == 4
    c.max_length = 1024  # the model of the config (config.model) has max_sequence_length 512
    with pytest.raises(ValueError, match="^max_length 1024 exceeds the model's max_sequence_length 512$"):
        check_config(c)
    assert check_config(c, LLaDAConfig.tiny(max_sequence_length=1024)) == 4
    c.batch_size = 6
    with pytest.raises(ValueError, match="batch_size 6 \\(global\\) must be a positive multiple of the 4 data row streams"):
        check_config(c, LLaDAConfig.tiny(max_sequence_length=1024))


def live_batchers() -> int:
    gc.collect()
    return sum(isinstance(o, StreamBatcherIterator) for o in gc.get_objects())


def prefetch_threads() -> list:
    return [t for t in threading.enumerate() if t.name.startswith("grain-thread-prefetch")]


def test_close_stops_the_prefetch_thread_and_lets_go_of_the_pipeline(tmp_path):
    path, _ = docs_file(tmp_path, [3, 5, 7])
    baseline = live_batchers()
    with make_train_iterator(tiny_train_config(path, tmp_path, prefetch_buffer_size=2), TINY) as it:
        next(it)
        assert live_batchers() == baseline + 1 and prefetch_threads()
        read = pipeline_stats(it)["records"]
    assert not prefetch_threads() and live_batchers() == baseline
    stats = pipeline_stats(it)  # the counts when it was closed
    assert stats["records"] >= read and stats["batches"] >= 1
    it.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        next(it)


EXIT_SCRIPT = """
import sys

sys.path.insert(0, sys.argv[1])
from tests.data.datahelpers import tiny_train_config, write_jsonl

from llada_jax.config import LLaDAConfig
from llada_jax.data.pipeline import make_train_iterator

if __name__ == "__main__":
    tmp, workers = sys.argv[2], int(sys.argv[3])
    path = write_jsonl(f"{tmp}/docs.jsonl", [{"input_ids": [i + 1] * (3 + i % 7)} for i in range(50)])
    config = tiny_train_config(path, tmp, prefetch_buffer_size=2, num_workers=workers)
    it = make_train_iterator(config, LLaDAConfig.tiny())  # a module global, never closed
    print(next(it)["input_ids"].shape, flush=True)
"""


@pytest.mark.parametrize("workers", [0, 1])
def test_exit_without_closing_the_iterator_is_silent(tmp_path, workers):
    """An iterator left open lives until the interpreter shuts down: its prefetch thread and worker processes
    are stopped at exit without an error, a warning or leaked shared memory on stderr."""
    script = tmp_path / "leave_open.py"
    script.write_text(EXIT_SCRIPT)
    env = {**os.environ, "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, str(script), HERE, str(tmp_path), str(workers)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "(4, 16)", r.stdout + r.stderr
    assert r.stderr == "", r.stderr
