"""The README's promise: CI runs exactly the README's test command."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(__file__))


def readme_commands():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command():
    main_command, test_command = readme_commands()[:2]
    assert "pytest" in test_command and "llada-jax" in main_command
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert test_command in ci.splitlines()
