"""Run `llada-jax` with a process that kills itself (SIGKILL) right after a training step or a sampled batch:
the crashes the resume and peer-failure tests recover from.

    python -m tests.fault STEP [PROCESS] -- pretrain --output_dir ...
    python -m tests.fault STEP [PROCESS] -- sample --model ...

kills the process of index PROCESS (every process when omitted) after step STEP of every training run the
command makes (`llada-jax demo` runs two), or after its STEP-th batch of `sample`. The fault enters through
`train(config, on_step=...)` and the sampler `sample_file` is given; nothing in the package reads a test-only
setting.
"""

import functools
import os
import signal
import sys


def main(argv: list[str]) -> int:
    split = argv.index("--")
    step, *process = (int(a) for a in argv[:split])
    import jax

    from llada_jax import cli
    from llada_jax.sampling import batch
    from llada_jax.train import loop

    def kill_after(done: int) -> None:
        if done == step and (not process or jax.process_index() == process[0]):
            os.kill(os.getpid(), signal.SIGKILL)

    class KillingSampler:
        """The sampler, counting its batches."""

        def __init__(self, sampler):
            self.sampler, self.batches = sampler, 0

        def __getattr__(self, name):
            return getattr(self.sampler, name)

        def __call__(self, *args, **kwargs):
            result = self.sampler(*args, **kwargs)
            self.batches += 1
            kill_after(self.batches)
            return result

    loop.train = functools.partial(loop.train, on_step=kill_after)
    sample_file = batch.sample_file
    batch.sample_file = lambda model, tokenizer, sampler, *a, **k: sample_file(model, tokenizer,
                                                                               KillingSampler(sampler), *a, **k)
    return cli.main(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
