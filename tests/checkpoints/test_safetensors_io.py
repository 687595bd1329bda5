"""The streaming safetensors writer and the reader, against the safetensors package."""

import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from llada_jax.checkpoints.safetensors_io import ShardedWriter, TensorReader, parse_size


def test_safetensors_writer_and_reader_agree_with_the_safetensors_package(tmp_path):
    rng = np.random.RandomState(0)
    import ml_dtypes

    arrays = {"a": rng.randn(3, 5).astype(np.float32), "b": rng.randn(7).astype(ml_dtypes.bfloat16),
              "c": rng.randn(2, 2, 2).astype(np.float16), "d": np.zeros((0, 4), np.float32)}
    names = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16"}
    writer = ShardedWriter(str(tmp_path), [(k, names[v.dtype], v.shape) for k, v in arrays.items()],
                           max_shard_size=1000)
    for k in ("c", "a", "d", "b"):  # any order
        writer.write(k, arrays[k])
    writer.close()
    back = load_file(str(tmp_path / "model.safetensors"))
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and back[k].tobytes() == v.tobytes()
    save_file(arrays, str(tmp_path / "lib.safetensors"))
    os.replace(tmp_path / "lib.safetensors", tmp_path / "model.safetensors")
    reader = TensorReader(str(tmp_path))
    for k, v in arrays.items():
        assert reader.read(k).tobytes() == v.tobytes() and reader.read(k).dtype == v.dtype
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123
    with pytest.raises(ValueError, match="cannot parse size"):
        parse_size("five gigs")
