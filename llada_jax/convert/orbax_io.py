"""Orbax checkpoints read and written one parameter at a time (host numpy arrays, no device copies).

Writes produce the layout of `llada_jax.train.checkpoint.save_model` (`<run>/checkpoints/<step>/` with the
items `params` and `model_config`, read back by `load_model`), plus an optional `hf_config` item: the
config.json a model was imported from, so that exporting it again writes the same file. Reads restore one
parameter (a stacked [layers, ...] array in the scanned layout) at a time with Orbax's partial restore.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from llada_jax.config import LLaDAConfig
from llada_jax.train import checkpoint as ckpt

HF_CONFIG_ITEM = "hf_config"


def save_params(run_dir: str, params: dict, config: LLaDAConfig, *, step: int = 0,
                hf_config: dict | None = None) -> None:
    """Write a pure-dict pytree of host numpy parameters (in `config`'s layout) as a model checkpoint.

    Two Orbax defaults would double peak memory, so the `params` item is written by a PyTree handler that
    (1) writes the numpy arrays in place (the default numpy handler deep-copies every array before its
    asynchronous write, a guard against the caller mutating it; this save is synchronous), and (2) stores
    the arrays uncompressed (with compression, the OCDBT writer holds the compressed chunks of every array
    until the save completes). `load_model` restores the item like any other checkpoint.
    """
    from orbax.checkpoint import type_handlers

    registry = type_handlers.create_type_handler_registry(
        (np.ndarray, type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
    handlers = {"params": ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry),
                "model_config": ocp.JsonCheckpointHandler()}
    items: dict[str, Any] = dict(params=ocp.args.PyTreeSave(params),
                                 model_config=ocp.args.JsonSave(config.to_dict()))
    if hf_config is not None:
        handlers[HF_CONFIG_ITEM] = ocp.JsonCheckpointHandler()
        items[HF_CONFIG_ITEM] = ocp.args.JsonSave(hf_config)
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True)
    manager = ocp.CheckpointManager(os.path.abspath(os.path.join(run_dir, ckpt.CHECKPOINTS)), options=options,
                                    item_handlers=handlers)
    manager.save(step, args=ocp.args.Composite(**items), force=True)
    manager.wait_until_finished()
    manager.close()


class ParamReader:
    """The parameters of an Orbax model checkpoint (run dir, checkpoints/ dir or step dir), one at a time."""

    def __init__(self, path: str):
        self.run_dir, self.step = ckpt.find_checkpoint(path)
        self.config = ckpt.read_model_config(path)
        self.step_dir = os.path.join(self.run_dir, ckpt.CHECKPOINTS, str(self.step))
        self.params_dir = os.path.join(self.step_dir, "params")
        if not os.path.isdir(self.params_dir):
            raise ckpt.CheckpointNotFoundError(f"{self.step_dir}: has no 'params' item")
        self._handler = ocp.PyTreeCheckpointHandler()
        self.metadata = self._handler.metadata(epath.Path(self.params_dir)).tree

    def leaves(self) -> Iterator[tuple[tuple, Any]]:
        """(key path, ArrayMetadata) of every stored parameter."""
        def walk(tree, prefix):
            if isinstance(tree, dict):
                for k, v in tree.items():
                    yield from walk(v, prefix + (k,))
            else:
                yield prefix, tree

        yield from walk(self.metadata, ())

    def read(self, path: tuple) -> np.ndarray:
        """One stored parameter as a host numpy array (only this one is read)."""
        item: Any = np.zeros(())
        restore_args: Any = ocp.RestoreArgs(restore_type=np.ndarray)
        for key in reversed(path):
            item, restore_args = {key: item}, {key: restore_args}
        restored = self._handler.restore(
            epath.Path(self.params_dir),
            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
        for key in path:
            restored = restored[key]
        return np.asarray(restored)

    def hf_config(self) -> dict | None:
        """The config.json this checkpoint was imported from, when it was converted from Hugging Face."""
        if not os.path.isdir(os.path.join(self.step_dir, HF_CONFIG_ITEM)):
            return None
        restored = ckpt.restore_items(self.run_dir, self.step, **{HF_CONFIG_ITEM: ocp.args.JsonRestore()})
        return dict(restored[HF_CONFIG_ITEM])
