"""JSONL and TFDS sources: the line index against a naive read, caching, pickling, paths, TFDS."""

import json
import os
import pickle

import numpy as np
import pytest

from llada_jax.config import LLaDAConfig
from llada_jax.data import sources
from llada_jax.data.sources import (
    JsonlSource,
    build_line_index,
    iter_records,
    open_source,
    resolve_paths,
)
from llada_jax.errors import DataError
from tests.data.datahelpers import tiny_train_config, write_jsonl


def naive_records(path):
    """(line number, text) of every non-blank line, read the obvious way."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    return [(i + 1, line) for i, line in enumerate(lines) if line.strip()]


def messy_file(path, rng, n=300):
    """Blank lines, whitespace-only lines, CRLF endings, unicode, long lines, and no trailing newline."""
    parts = []
    for i in range(n):
        ids = rng.integers(0, 500, size=int(rng.integers(1, 200))).tolist()
        rec = json.dumps({"input_ids": ids, "text": f"d\u00e9j\u00e0 {i}"}, ensure_ascii=False)
        parts.append(rec + ("\r" if i % 7 == 0 else ""))
        if i % 5 == 0:
            parts.append("")
        if i % 11 == 0:
            parts.append("   \t ")
    with open(path, "wb") as f:
        f.write("\n".join(parts).encode())  # the last record has no newline
    return path


@pytest.mark.parametrize("chunk", [7, 4096, 16 << 20])
def test_index_matches_a_naive_read(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(sources, "_CHUNK", chunk)  # tiny chunks put line ends on every chunk boundary
    path = messy_file(tmp_path / "a.jsonl", np.random.default_rng(0))
    expected = naive_records(path)
    assert not open(path, "rb").read().endswith(b"\n")
    src = JsonlSource(str(path), index_cache_dir=None)
    assert len(src) == len(expected) == 300
    rng = np.random.default_rng(1)
    for i in list(rng.integers(0, len(src), size=60)) + [0, len(src) - 1]:
        rec = src[int(i)]
        line_no, text = expected[i]
        assert rec.data.rstrip(b"\r") == text.rstrip(b"\r")
        assert rec.position == line_no and rec.path == str(path)
        assert json.loads(rec.data) == json.loads(text)
    assert src[len(src) - 1].where == f"{path}, line {expected[-1][0]}"


def test_index_edge_cases(tmp_path):
    cases = {
        "only_newlines.jsonl": b"\n\n\n",
        "one_no_newline.jsonl": b'{"a": 1}',
        "leading_blank.jsonl": b'\n  \n{"a": 1}\n\n{"a": 2}\n',
        "empty.jsonl": b"",
    }
    for name, content in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        index = build_line_index(str(p))
        assert [(int(s), int(e), int(n)) for s, e, n in index] == [
            (content.index(text), content.index(text) + len(text), n) for n, text in naive_records(p)], name


def test_multiple_files_globs_directories(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    for k in range(3):
        write_jsonl(d / f"part{k}.jsonl", [{"input_ids": [k, j]} for j in range(k + 2)])
    (d / "notes.txt").write_text("not data")
    extra = write_jsonl(tmp_path / "extra.jsonl", [{"input_ids": [9]}])
    assert resolve_paths(str(d)) == [str(d / f"part{k}.jsonl") for k in range(3)]
    assert resolve_paths(f"{d}/part*.jsonl,{extra}") == [str(d / f"part{k}.jsonl") for k in range(3)] + [extra]
    src = JsonlSource([str(d), extra], index_cache_dir=None)
    got = [json.loads(src[i].data)["input_ids"] for i in range(len(src))]
    assert got == [[0, 0], [0, 1], [1, 0], [1, 1], [1, 2], [2, 0], [2, 1], [2, 2], [2, 3], [9]]
    assert src.locate(4) == (1, 2)
    with pytest.raises(IndexError):
        src[len(src)]
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        resolve_paths(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="none\\*: no such file"):
        resolve_paths(str(d / "none*"))
    (tmp_path / "void").mkdir()
    with pytest.raises(FileNotFoundError, match="void: directory holds no \\*.jsonl files"):
        resolve_paths(str(tmp_path / "void"))


def test_index_cache_is_keyed_by_path_size_and_mtime(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", [{"input_ids": [1]}, {"input_ids": [2]}])
    cache = str(tmp_path / "cache")
    src = JsonlSource(path, index_cache_dir=cache)
    assert len(os.listdir(cache)) == 1 and len(src) == 2

    def fail(_):
        raise AssertionError("the index was rebuilt although the file did not change")

    monkeypatch.setattr(sources, "build_line_index", fail)
    assert [json.loads(JsonlSource(path, index_cache_dir=cache)[i].data) for i in range(2)] == [
        {"input_ids": [1]}, {"input_ids": [2]}]
    monkeypatch.undo()
    with open(path, "a") as f:  # a changed file (size and mtime) is indexed again
        f.write(json.dumps({"input_ids": [3]}) + "\n")
    src = JsonlSource(path, index_cache_dir=cache)
    assert len(src) == 3 and json.loads(src[2].data) == {"input_ids": [3]}
    assert len(os.listdir(cache)) == 2
    # the same size with a new mtime (a record rewritten in place) is indexed again too
    built = []
    real_build = sources.build_line_index
    monkeypatch.setattr(sources, "build_line_index", lambda p: built.append(p) or real_build(p))
    size = os.path.getsize(path)
    with open(path, "r+") as f:
        f.write(json.dumps({"input_ids": [7]}))
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    assert os.path.getsize(path) == size
    src = JsonlSource(path, index_cache_dir=cache)
    assert built == [path] and json.loads(src[0].data) == {"input_ids": [7]}


def test_a_file_changed_while_it_is_indexed_is_not_cached(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", [{"input_ids": [1]}, {"input_ids": [2]}])
    cache = str(tmp_path / "cache")
    real_build = sources.build_line_index

    def build_then_append(p):
        index = real_build(p)
        with open(p, "a") as f:  # another writer appends while the index is being built
            f.write(json.dumps({"input_ids": [3]}) + "\n")
        return index

    monkeypatch.setattr(sources, "build_line_index", build_then_append)
    assert len(JsonlSource(path, index_cache_dir=cache)) == 2  # the index of what was read
    assert not os.path.exists(cache) or os.listdir(cache) == []  # ... but not cached under any key
    monkeypatch.undo()
    assert len(JsonlSource(path, index_cache_dir=cache)) == 3 and len(os.listdir(cache)) == 1


def test_source_pickles_small_and_reads_after_unpickling(tmp_path):
    path = messy_file(tmp_path / "a.jsonl", np.random.default_rng(2))
    src = JsonlSource(str(path), index_cache_dir=str(tmp_path / "cache"))
    first = src[5]  # opens the file
    blob = pickle.dumps(src)
    assert len(blob) < 2000  # the cached index travels as its file name, no open descriptors
    clone = pickle.loads(blob)
    assert clone._fds == {} and clone[5] == first and clone[len(src) - 1] == src[len(src) - 1]
    uncached = JsonlSource(str(path), index_cache_dir=None)
    assert pickle.loads(pickle.dumps(uncached))[7] == src[7]


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    good = write_jsonl(tmp_path / "good.jsonl", [{"input_ids": [1]}])
    with pytest.raises(DataError, match=r"empty.jsonl: the file holds no records"):
        JsonlSource(str(empty), index_cache_dir=None)
    src = JsonlSource([str(empty), good], index_cache_dir=None, skip_empty_files=True)
    assert len(src) == 1 and src.empty_files == [str(empty)]
    with pytest.raises(DataError, match="no records in any file"):
        JsonlSource(str(empty), index_cache_dir=None, skip_empty_files=True)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        open_source(str(tmp_path / "missing.jsonl"))


def test_iter_records_reads_jsonl_and_json_arrays(tmp_path):
    arr = tmp_path / "a.json"
    arr.write_text("\n  [" + json.dumps({"x": 1}) + ",\n" + json.dumps({"x": 2}) + "]\n")
    assert [(json.loads(r.data) if isinstance(r.data, bytes) else r.data, r.where) for r in iter_records(str(arr))] == [
        ({"x": 1}, f"{arr}, item 0"), ({"x": 2}, f"{arr}, item 1")]
    jl = write_jsonl(tmp_path / "b.jsonl", [{"x": 1}, "", {"x": 2}])
    assert [r.where for r in iter_records(jl)] == [f"{jl}, line 1", f"{jl}, line 3"]
    bad = tmp_path / "bad.json"
    bad.write_text('[{"x": 1},\n {"x": }]')
    with pytest.raises(DataError, match=r"bad.json, line 2: malformed JSON: Expecting value \(column 8\)"):
        list(iter_records(str(bad)))
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="e.jsonl: the file holds no records"):
        list(iter_records(str(tmp_path / "e.jsonl")))


# ----------------------------------------------------------------------------------------------------
# TFDS (array_record), built locally
# ----------------------------------------------------------------------------------------------------

TFDS_DOCS = [list(range(10 * i + 1, 10 * i + 1 + (i % 5) + 1)) for i in range(12)]


def build_tiny_tfds(data_dir):
    import tensorflow_datasets as tfds

    class LladaTinyTokens(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"input_ids": tfds.features.Sequence(np.int32), "doc": np.int32}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, doc in enumerate(TFDS_DOCS):
                yield i, {"input_ids": doc, "doc": i}

    LladaTinyTokens(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return "llada_tiny_tokens"


def test_tfds_data_path_names_dataset_config_and_split():
    assert sources.parse_tfds_path("tfds:c4/en:train") == ("c4/en", "train")
    assert sources.parse_tfds_path("tfds:my_data:train[:90%]") == ("my_data", "train[:90%]")
    for bad in ("tfds:c4", "tfds::train", "tfds:c4:"):
        with pytest.raises(ValueError, match="tfds:NAME\\[/CONFIG\\]:SPLIT"):
            sources.parse_tfds_path(bad)


def test_tfds_source_and_pipeline(tmp_path):
    import gc

    gc.collect()  # finalizers of earlier tests' objects must not run inside TFDS's lazy-import context
    name = build_tiny_tfds(tmp_path / "tfds")
    src = open_source(f"tfds:{name}:train", tfds_data_dir=str(tmp_path / "tfds"))
    assert isinstance(src, sources.TfdsSource) and len(src) == len(TFDS_DOCS)
    for i in range(len(src)):
        rec = src[i]
        assert list(np.asarray(rec.data["input_ids"])) == TFDS_DOCS[int(rec.data["doc"])]
        assert rec.where == f"tfds:{name}:train, record {i}"
    clone = pickle.loads(pickle.dumps(src))
    assert list(clone[3].data["input_ids"]) == list(src[3].data["input_ids"])
    head = open_source(f"tfds:{name}:train[:3]", tfds_data_dir=str(tmp_path / "tfds"))  # TFDS split slicing
    assert len(head) == 3 and [list(head[i].data["input_ids"]) for i in range(3)] == [
        list(src[i].data["input_ids"]) for i in range(3)]

    # The pipeline over it: with shuffling off, the token stream is the documents in storage order + EOS.
    c = tiny_train_config(f"tfds:{name}:train", tmp_path, max_length=8, batch_size=2, shuffle=False, num_shards=1,
                          tfds_data_dir=str(tmp_path / "tfds"))
    from llada_jax.data.pipeline import make_train_iterator

    it = make_train_iterator(c, LLaDAConfig.tiny())
    stream = np.concatenate([next(it)["input_ids"].ravel() for _ in range(4)])
    order = [int(src[i].data["doc"]) for i in range(len(src))]
    epoch = np.concatenate([TFDS_DOCS[d] + [510] for d in order])  # 45 tokens: the stream wraps around
    assert len(stream) == 64 and np.array_equal(stream, np.tile(epoch, 2)[:64])
    with pytest.raises(ValueError, match="tfds:NAME\\[/CONFIG\\]:SPLIT"):
        open_source("tfds:nosplit")
    with pytest.raises(FileNotFoundError, match="tfds:not_a_dataset:train: cannot open"):
        open_source("tfds:not_a_dataset:train", tfds_data_dir=str(tmp_path / "tfds"))
