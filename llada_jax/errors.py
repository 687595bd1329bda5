"""The exceptions every layer raises, and how the command line reports them.

Each is a one-line message that names what is wrong and where (a flag, a config field, a file and line, a
checkpoint step). The `llada-jax` command prints it without a traceback and exits with the class's
`exit_code`: 2 for what the user can fix in the command or its inputs before any work is done, 1 for a run
that started and then had to stop.

    LLaDAError
      UsageError                 a bad flag or input, found before any work                      exit 2
      ConfigError                a training config that cannot run (field named)                  exit 2
        MeshError                mesh sizes or logical-axis rules that do not fit the devices     exit 2
        ResumeError              the checkpoint in output_dir cannot be continued with this config exit 2
      CheckpointError            a saved model that cannot be read                                exit 2
        CheckpointNotFoundError  no checkpoint (or no finished step) where one was named
        HFConfigError            a config.json this project cannot load (field named)
        WeightsError             weights that do not match the config (missing, unexpected, shapes)
        SafetensorsError         a malformed safetensors file or index
      DataError                  a bad training record (file, line and field named)               exit 1
      TokenizerRequired          records that need a tokenizer and none is configured             exit 1
      TrainingStopped            training stopped itself (e.g. too many non-finite steps)         exit 1

They also subclass the built-in exception a caller would expect (`ValueError`, `FileNotFoundError`,
`RuntimeError`), so library users can catch either.
"""

from __future__ import annotations


class LLaDAError(Exception):
    """Base class: an error reported as one line by the command line."""

    exit_code = 2


class UsageError(LLaDAError, ValueError):
    """A bad flag or input detected before any work."""


class ConfigError(LLaDAError, ValueError):
    """A problem with a run's configuration, found before any work."""


class MeshError(ConfigError):
    """Mesh sizes or logical-axis rules that do not fit the devices."""


class ResumeError(ConfigError):
    """The checkpoint in output_dir cannot be continued with this configuration."""


class CheckpointError(LLaDAError, ValueError):
    """A saved model (Orbax run or Hugging Face directory) that cannot be read."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint, or no finished step, where one was named."""


class HFConfigError(CheckpointError):
    """config.json describes something this project cannot load."""


class WeightsError(CheckpointError):
    """The weight files do not match the config (missing, unexpected or mis-shaped tensors)."""


class SafetensorsError(CheckpointError):
    """A malformed or inconsistent safetensors file or index."""


def describe(where: str, field: str, message: str) -> str:
    """"where: field 'f': message", or "where: message" without a field."""
    return f"{where}: field '{field}': {message}" if field else f"{where}: {message}"


class DataError(LLaDAError, ValueError):
    """A bad record or file. `where` is "path, line N" (or "tfds:NAME:SPLIT, record N"); `field` may be ''."""

    exit_code = 1

    def __init__(self, where: str, field: str, message: str):
        self.where, self.field, self.message = where, field, message
        super().__init__(describe(where, field, message))

    def __reduce__(self):  # exceptions cross process boundaries (Grain workers) by pickling
        return (DataError, (self.where, self.field, self.message))


class TokenizerRequired(LLaDAError, ValueError):
    """Records that need a tokenizer (text, chats) and none configured: a set-up problem, never skipped."""

    exit_code = 1


class TrainingStopped(LLaDAError, RuntimeError):
    """Training stopped itself (e.g. too many non-finite steps in a row)."""

    exit_code = 1
