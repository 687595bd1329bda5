"""Run `llada-jax` with a process that kills itself (SIGKILL) right after a training step: the crash the
resume tests recover from.

    python -m tests.fault STEP [PROCESS] -- pretrain --output_dir ...

kills the process of index PROCESS (every process when omitted) after step STEP of every training run the
command makes (`llada-jax demo` runs two). The fault enters through `train(config, on_step=...)`; nothing in
the package reads a test-only setting.
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
    from llada_jax.train import loop

    def kill_after(done: int) -> None:
        if done == step and (not process or jax.process_index() == process[0]):
            os.kill(os.getpid(), signal.SIGKILL)

    loop.train = functools.partial(loop.train, on_step=kill_after)
    return cli.main(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
