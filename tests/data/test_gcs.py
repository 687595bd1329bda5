"""Data on gs:// (a fake-gcs-server emulator, see the `bucket` fixture in tests/conftest.py): the pipeline over
objects, globs, prefixes and mixed lists gives the batches of the same files on disk; the local index cache
is keyed by the object's generation; ranged reads from several threads; `data convert` / `data check` on
URLs; and missing objects or buckets are one error naming the URL, with nothing written."""

import json
import os
import pickle
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np
import pytest

from llada_jax.checkpoints import storage
from llada_jax.cli import main
from llada_jax.config import LLaDAConfig
from llada_jax.data import sources
from llada_jax.data.converters import DatasetConverter
from llada_jax.data.pipeline import make_train_iterator
from llada_jax.data.sources import JsonlSource, resolve_paths
from llada_jax.errors import DataError
from tests.data.datahelpers import tiny_train_config, write_jsonl
from tests.data.test_cli import SHAREGPT

TINY = LLaDAConfig.tiny()
MISSING_BUCKET = "gs://llada-no-such-bucket"


def put(url: str, data: bytes | str) -> str:
    with storage.open_file(url, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return url


def upload_file(path, url: str) -> str:
    storage.upload(str(path), url)
    return url


def shards(tmp_path, bucket):
    """Three JSONL shards of documents of varied lengths, on disk under tmp_path/data and as objects under
    {bucket}/data, whose prefix also holds an object that is not *.jsonl and a "sub-directory"."""
    rng = np.random.default_rng(0)
    local_dir = tmp_path / "data"
    local_dir.mkdir()
    for k in range(3):
        docs = [{"input_ids": rng.integers(1, 500, size=int(rng.integers(1, 30))).tolist()} for _ in range(15)]
        path = write_jsonl(local_dir / f"part{k}.jsonl", docs[:7] + [""] + docs[7:])  # a blank line too
        upload_file(path, f"{bucket}/data/part{k}.jsonl")
    put(f"{bucket}/data/notes.txt", "not data\n")
    put(f"{bucket}/data/sub/ignored.jsonl", '{"input_ids": [1]}\n')
    return str(local_dir), f"{bucket}/data"


def batches(data_path, tmp_path, n=6, **data):
    c = tiny_train_config(data_path, tmp_path, max_length=16, batch_size=4, **data)
    with make_train_iterator(c, TINY) as it:
        return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert np.array_equal(x[key], y[key]), key


# ----------------------------------------------------------------------------------------------------
# (a) the pipeline over gs:// data
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["file", "glob", "directory", "mixed_list"])
def test_pipeline_over_gcs_gives_the_batches_of_the_same_local_files(tmp_path, bucket, form):
    local, remote = shards(tmp_path, bucket)
    local_path, remote_path = {
        "file": (f"{local}/part1.jsonl", f"{remote}/part1.jsonl"),
        "glob": (f"{local}/part*.jsonl", f"{remote}/part*.jsonl"),
        "directory": (local, remote),
        "mixed_list": (f"{local}/part2.jsonl,{local}/part0.jsonl", f"{local}/part2.jsonl,{remote}/part0.jsonl"),
    }[form]
    n_files = {"file": 1, "glob": 3, "directory": 3, "mixed_list": 2}[form]
    assert len(resolve_paths(remote_path)) == n_files
    # several reading threads: the ranged reads of one object run at once
    expected = batches(local_path, tmp_path / "local", read_threads=4)
    got = batches(remote_path, tmp_path / "remote", read_threads=4)
    assert_same_batches(got, expected)
    # the index cache is local, one entry per file; a second run reads it and gives the same batches again
    assert len(os.listdir(tmp_path / "remote" / "index_cache")) == n_files
    assert_same_batches(batches(remote_path, tmp_path / "remote", read_threads=4), expected)


def test_gcs_directory_and_glob_list_objects_in_order(tmp_path, bucket):
    _, remote = shards(tmp_path, bucket)
    parts = [f"{remote}/part{k}.jsonl" for k in range(3)]
    assert resolve_paths(remote) == parts  # *.jsonl directly under the prefix: not notes.txt, not sub/
    assert resolve_paths(remote + "/") == parts
    assert resolve_paths(f"{remote}/*") == [f"{remote}/notes.txt", *parts]  # objects only, not the sub/ prefix
    assert resolve_paths([parts[2], f"{remote}/part[01].jsonl"]) == [parts[2], parts[0], parts[1]]


def test_pipeline_over_gcs_with_worker_processes(tmp_path, bucket):
    """A worker process gets the source pickled (URLs and cache file names) and opens the objects itself."""
    local, remote = shards(tmp_path, bucket)
    expected = batches(local, tmp_path / "local", n=3)
    got = batches(remote, tmp_path / "remote", n=3, num_workers=1)
    assert_same_batches(got, expected)


# ----------------------------------------------------------------------------------------------------
# The source: the index cache, ranged reads, threads, pickling
# ----------------------------------------------------------------------------------------------------

def test_index_cache_is_keyed_by_the_object_generation(tmp_path, bucket, monkeypatch):
    url = f"{bucket}/a.jsonl"
    old = b'{"input_ids": [1]}\n{"input_ids": [2]}\n'
    new_line = b'{"input_ids": [7, 8, 9]}'
    new = new_line + b" " * (len(old) - len(new_line) - 1) + b"\n"  # the same size: only the generation differs
    assert len(new) == len(old)
    put(url, old)
    cache = str(tmp_path / "cache")
    built = []
    real_build = sources.build_line_index
    monkeypatch.setattr(sources, "build_line_index", lambda p: built.append(p) or real_build(p))

    src = JsonlSource(url, index_cache_dir=cache)
    assert built == [url] and len(src) == 2 and len(os.listdir(cache)) == 1
    assert [json.loads(src[i].data) for i in range(2)] == [{"input_ids": [1]}, {"input_ids": [2]}]
    assert src[1].where == f"{url}, line 2"

    # unchanged: read from the cache, not streamed again (also through a glob, which lists the prefix)
    src = JsonlSource(f"{bucket}/*.jsonl", index_cache_dir=cache)
    assert built == [url] and len(src) == 2 and json.loads(src[1].data) == {"input_ids": [2]}

    fsspec.core.url_to_fs(bucket)[0].ls(bucket)  # a listing in between does not stand in for the generation
    put(url, new)  # replaced: a new generation, the same size (not the generation in the listing)
    src = JsonlSource(url, index_cache_dir=cache)
    assert built == [url, url] and len(os.listdir(cache)) == 2
    assert len(src) == 1 and json.loads(src[0].data) == {"input_ids": [7, 8, 9]}
    assert JsonlSource(url, index_cache_dir=cache)[0] == src[0] and built == [url, url]


def test_reads_name_the_indexed_generation(bucket):
    """An object replaced after it was indexed is an error at the next read (its old generation is gone),
    also where the old byte range still exists in the new content."""
    url = put(f"{bucket}/a.jsonl", '{"input_ids": [1]}\n{"input_ids": [2, 3, 4]}\n')
    src = JsonlSource(url, index_cache_dir=None)
    assert json.loads(src[1].data) == {"input_ids": [2, 3, 4]}
    put(url, '{"input_ids": [5]}\n{"input_ids": [6, 7, 8]}\n')
    for i in (0, 1):
        with pytest.raises(DataError, match=rf"{url}, line {i + 1}: the object was replaced or deleted after it "
                                            "was indexed"):
            src[i]
    assert json.loads(JsonlSource(url, index_cache_dir=None)[1].data) == {"input_ids": [6, 7, 8]}


def test_ranged_reads_from_many_threads_and_after_pickling(tmp_path, bucket):
    rng = np.random.default_rng(3)
    records = [{"input_ids": rng.integers(0, 500, size=int(rng.integers(1, 300))).tolist(), "n": i}
               for i in range(200)]
    url = upload_file(write_jsonl(tmp_path / "a.jsonl", records), f"{bucket}/a.jsonl")
    src = JsonlSource(url, index_cache_dir=str(tmp_path / "cache"))
    order = rng.permutation(len(records)).tolist() * 2
    with ThreadPoolExecutor(8) as pool:  # each thread seeks and reads its own file object
        got = list(pool.map(lambda i: json.loads(src[i].data), order))
    assert got == [records[i] for i in order]
    blob = pickle.dumps(src)
    assert len(blob) < 2000  # URLs and the cache file name: no index, no file objects
    clone = pickle.loads(blob)
    assert clone[17] == src[17] and clone[199].where == f"{url}, line 200"


def test_iter_records_streams_a_url(bucket):
    arr = put(f"{bucket}/a.json", "\n [" + json.dumps({"x": 1}) + ",\n" + json.dumps({"x": 2}) + "]\n")
    assert [(r.data, r.where) for r in sources.iter_records(arr)] == [({"x": 1}, f"{arr}, item 0"),
                                                                     ({"x": 2}, f"{arr}, item 1")]
    jl = put(f"{bucket}/b.jsonl", '{"x": 1}\n\n{"x": 2}\n')
    assert [r.where for r in sources.iter_records(jl)] == [f"{jl}, line 1", f"{jl}, line 3"]
    with pytest.raises(DataError, match=f"{bucket}/none.jsonl: no such object"):
        list(sources.iter_records(f"{bucket}/none.jsonl"))


# ----------------------------------------------------------------------------------------------------
# (c) data convert / data check, and a gs:// tokenizer
# ----------------------------------------------------------------------------------------------------

def test_data_convert_and_check_with_urls(tmp_path, bucket, tokenizer_dir, capsys):
    chats = upload_file(write_jsonl(tmp_path / "chats.jsonl", SHAREGPT), f"{bucket}/in/chats.jsonl")
    tok = f"{bucket}/tokenizer"
    storage.upload(tokenizer_dir, tok)
    out = f"{bucket}/out/sft.jsonl"
    assert main(["data", "convert", "--format", "sharegpt", "--tokenizer", tok, chats, out]) == 0
    assert "2 records -> 3 examples" in capsys.readouterr().out
    DatasetConverter(tokenizer_dir).convert("sharegpt", str(tmp_path / "chats.jsonl"), str(tmp_path / "sft.jsonl"))
    assert storage.read_text(out) == (tmp_path / "sft.jsonl").read_text()
    assert storage.listdir(f"{bucket}/out") == ["sft.jsonl"]

    assert main(["data", "check", "--kind", "sft", "--vocab_size", "512", "--mask_token_id", "511", out]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("checked 1 file(s) as sft data: 3 records, 3 examples")
    assert lines[-1] == "OK: no problems"
    assert main(["data", "check", "--kind", "sft", "--tokenizer", tok, f"{bucket}/in/*.jsonl", out]) == 0
    assert capsys.readouterr().out.startswith("checked 2 file(s) as sft data: 5 records, 6 examples")

    # training on the chats with the tokenizer on gs:// gives the rows of the local chats and tokenizer
    rows = []
    for path, tokenizer, where in ((str(tmp_path / "chats.jsonl"), tokenizer_dir, "local"), (chats, tok, "remote")):
        c = tiny_train_config(path, tmp_path / where, task="sft", max_length=96, batch_size=3, shuffle=False,
                              tokenizer=tokenizer, num_shards=1)
        with make_train_iterator(c, TINY) as it:
            rows.append(next(it))
    assert_same_batches([rows[1]], [rows[0]])


# ----------------------------------------------------------------------------------------------------
# (d), (e) errors: one line naming the URL, nothing written
# ----------------------------------------------------------------------------------------------------

def test_missing_object_or_bucket_in_data_path_is_one_error_naming_it(tmp_path, bucket):
    put(f"{bucket}/there.jsonl", '{"input_ids": [1]}\n')
    cases = {
        f"{bucket}/missing.jsonl": "no such object",
        f"{bucket}/there.jsonl,{bucket}/missing.jsonl": "no such object",
        f"{bucket}/*.json": "no object matches this pattern",
        f"{MISSING_BUCKET}/data.jsonl": f"no such bucket {MISSING_BUCKET}",
        f"{MISSING_BUCKET}/*.jsonl": f"no such bucket {MISSING_BUCKET}",
    }
    for data_path, message in cases.items():
        c = tiny_train_config(data_path, tmp_path)
        with pytest.raises(FileNotFoundError) as e:
            make_train_iterator(c, TINY)
        text = str(e.value)
        assert "\n" not in text and message in text, text
        named = data_path.split(",")[-1]
        assert text.startswith(f"{named}: "), text
    assert not os.path.exists(c.data.index_cache_dir)  # nothing indexed, nothing cached
    assert storage.listdir(bucket) == ["there.jsonl"]


def test_data_commands_name_missing_urls_and_write_nothing(tmp_path, bucket, tokenizer_dir, capsys):
    chats = upload_file(write_jsonl(tmp_path / "chats.jsonl", SHAREGPT), f"{bucket}/chats.jsonl")
    convert = ["data", "convert", "--format", "sharegpt", "--tokenizer", tokenizer_dir]
    missing = f"{bucket}/missing.jsonl"
    assert main([*convert, missing, f"{bucket}/out.jsonl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"llada-jax data: error: {missing}: no such object (or no such bucket)"]
    out_in_missing_bucket = f"{MISSING_BUCKET}/out.jsonl"
    assert main([*convert, chats, out_in_missing_bucket]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # found before any record is converted
    assert len(err) == 1 and err[0].startswith(f"llada-jax data: error: {MISSING_BUCKET}: cannot write there"), err
    assert main([*convert[:-1], f"{bucket}/no_tokenizer", chats, f"{bucket}/out.jsonl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bucket}/no_tokenizer" in err[0], err
    assert storage.listdir(bucket) == ["chats.jsonl"]  # nothing written

    # data check lists a missing object or bucket as a problem (exit 1), like a missing local file
    assert main(["data", "check", "--kind", "pretrain", "--vocab_size", "512", missing,
                 f"{MISSING_BUCKET}/x.jsonl"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert f"  {missing}: no such object" in out
    assert f"  {MISSING_BUCKET}/x.jsonl: no such bucket {MISSING_BUCKET} (or no permission to read it)" in out


def test_convert_with_a_bad_record_leaves_no_output_object(tmp_path, bucket, tokenizer_dir, capsys):
    bad = SHAREGPT + [{"conversations": [{"from": "human", "value": "hi"}]}]
    chats = upload_file(write_jsonl(tmp_path / "chats.jsonl", bad), f"{bucket}/chats.jsonl")
    out = f"{bucket}/out/sft.jsonl"
    convert = ["data", "convert", "--format", "sharegpt", "--tokenizer", tokenizer_dir, chats, out]
    assert main(convert) == 1
    assert f"{chats}, line 3: field 'conversations': no assistant turn" in capsys.readouterr().err
    assert not storage.exists(out) and storage.listdir(f"{bucket}/out") == []
    put(out, "previous\n")  # an existing output is left as it was
    assert main(convert) == 1
    assert storage.read_text(out) == "previous\n"
    assert main([*convert[:-2], "--skip_invalid", chats, out]) == 0  # skipping the bad record: written
    assert len(storage.read_text(out).splitlines()) == 3
