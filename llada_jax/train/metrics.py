"""Training metrics: `metrics.jsonl`, TensorBoard event files and (optionally) Weights & Biases, process 0 only."""

from __future__ import annotations

import json
import logging
import os

from llada_jax.checkpoints.atomic import atomic_file

log = logging.getLogger("llada_jax")

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Appends one JSON object per logged step; on resume, entries after the restored step are dropped so
    the file reads as if the run had never stopped."""

    def __init__(self, output_dir: str, *, enabled: bool, wandb_config=None, run_config: dict | None = None):
        self.enabled = enabled
        self.path = os.path.join(output_dir, METRICS_FILE)
        self._file = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            log.warning("tensorboardX is not installed: no TensorBoard events")
        if wandb_config is not None and wandb_config.enabled:
            try:
                import wandb

                self._wandb = wandb.init(project=wandb_config.project, name=wandb_config.run_name or None,
                                         config=run_config, dir=output_dir, resume="allow")
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

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, METRICS_FILE), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
