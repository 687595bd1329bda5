"""One JAX process of test_data_multiprocess.py: build this process's iterator, assemble the global batch,
compare it with both local batches computed independently, and save / restore the iterator with Orbax.

    python multiprocess_data_check.py PROCESS_ID PORT DATA_PATH WORKDIR
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(process_id: int, port: str, data_path: str, workdir: str) -> None:
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    import grain
    import numpy as np
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    from llada_jax.config import LLaDAConfig, train_config
    from llada_jax.data.pipeline import global_batch, make_train_iterator

    tiny = LLaDAConfig.tiny()
    c = train_config(tiny)
    c.data_path, c.max_length, c.batch_size, c.seed = data_path, 16, 4, 11
    c.data.index_cache_dir = os.path.join(workdir, f"cache{process_id}")
    assert jax.process_count() == 2 and jax.process_index() == process_id and jax.device_count() == 4

    it = make_train_iterator(c, tiny, process_index=jax.process_index(), process_count=jax.process_count())
    local = next(it)
    assert local["input_ids"].shape == (2, 16)
    mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Explicit,))
    batch = global_batch(local, mesh, P("data", None))
    assert batch["input_ids"].shape == (4, 16)
    gathered = multihost_utils.process_allgather(batch["input_ids"], tiled=True)
    expected = np.concatenate([next(make_train_iterator(c, tiny, process_index=i, process_count=2))["input_ids"]
                               for i in range(2)])
    assert np.array_equal(gathered, expected), (gathered, expected)

    mngr = ocp.CheckpointManager(os.path.join(workdir, "ckpt"))
    mngr.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    rest = [next(it)["input_ids"] for _ in range(3)]
    fresh = make_train_iterator(c, tiny, process_index=process_id, process_count=2)
    restored = mngr.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    again = [next(restored.data)["input_ids"] for _ in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(rest, again))
    mngr.close()
    print(f"process {process_id}: OK", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
