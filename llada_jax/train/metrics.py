"""Training metrics: `metrics.jsonl`, TensorBoard event files and (optionally) Weights & Biases, process 0 only.

An output_dir in object storage (gs://...) cannot be appended to: the files are then written in a local staging
directory and uploaded, each as a whole object, at most every `SYNC_SECONDS`, after every checkpoint save and at
the end (`sync`), so the bucket's copy is never more than a checkpoint behind and never a partial line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time

from llada_jax.checkpoints import storage
from llada_jax.checkpoints.atomic import atomic_file

log = logging.getLogger("llada_jax")

METRICS_FILE = "metrics.jsonl"
TENSORBOARD = "tensorboard"
SYNC_SECONDS = 60.0


class MetricsLogger:
    """Appends one JSON object per logged step; on resume, entries after the restored step are dropped so
    the file reads as if the run had never stopped."""

    def __init__(self, output_dir: str, *, enabled: bool, wandb_config=None, run_config: dict | None = None):
        self.enabled = enabled
        self.output_dir = output_dir
        self._remote = storage.is_url(output_dir)
        self._local = tempfile.mkdtemp(prefix="llada_jax_metrics_") if self._remote and enabled else output_dir
        self.path = os.path.join(self._local, METRICS_FILE)
        self._file = None
        self._tb = None
        self._wandb = None
        self._synced = time.monotonic()
        if not enabled:
            return
        remote_metrics = storage.join(output_dir, METRICS_FILE)
        if self._remote and storage.exists(remote_metrics):  # a resumed run continues the bucket's file
            storage.download(remote_metrics, self.path)
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(self._local, TENSORBOARD))
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            log.warning("tensorboardX is not installed: no TensorBoard events")
        if wandb_config is not None and wandb_config.enabled:
            try:
                import wandb

                self._wandb = wandb.init(project=wandb_config.project, name=wandb_config.run_name or None,
                                         config=run_config, dir=self._local, resume="allow")
            except ImportError:
                log.warning("wandb.enabled is set but wandb is not installed: logging to files only")

    def truncate_after(self, step: int) -> None:
        """Drop logged entries with step > `step` (they belong to steps that will be run again)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line)
                except (ValueError, KeyError):
                    break  # a line cut short by a crash ends the file
        with atomic_file(self.path) as f:
            f.writelines(kept)
        self.sync()

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"train/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._remote and time.monotonic() - self._synced > SYNC_SECONDS:
            self.sync()

    def sync(self) -> None:
        """Upload the staged files to an output_dir in object storage (nothing to do for a local one)."""
        if not (self.enabled and self._remote):
            return
        if self._tb is not None:
            self._tb.flush()
        if os.path.exists(self.path):
            storage.upload(self.path, storage.join(self.output_dir, METRICS_FILE))
        board = os.path.join(self._local, TENSORBOARD)
        if os.path.isdir(board):
            storage.upload(board, storage.join(self.output_dir, TENSORBOARD))
        self._synced = time.monotonic()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        self.sync()
        if self._remote and self.enabled:
            shutil.rmtree(self._local, ignore_errors=True)


def read_metrics(output_dir: str) -> list[dict]:
    text = storage.read_text(storage.join(output_dir, METRICS_FILE))
    return [json.loads(line) for line in text.splitlines() if line.strip()]
