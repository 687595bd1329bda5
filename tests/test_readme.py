"""The README and docs/ stay true: CI runs exactly the README's test command, every link and anchor resolves, every
`llada-jax` command line names a real subcommand and only flags its parser accepts, every `--config.a.b` names a
real config field, every Python snippet's imports exist, and the docs site builds with `mkdocs build --strict`."""

from __future__ import annotations

import argparse
import ast
import functools
import glob
import importlib
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
README_MAX_LINES = 260
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}


def readme_commands():
    text = open(README, encoding="utf-8").read()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command():
    main_command, test_command = readme_commands()[:2]
    assert "pytest" in test_command and "llada-jax" in main_command
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert test_command in ci.splitlines()


# ---------------------------------------------------------------------------------------------------------------
# Reading Markdown: fenced code blocks, headings and their GitHub slugs, links
# ---------------------------------------------------------------------------------------------------------------

def doc_pages() -> list[str]:
    return sorted(glob.glob(os.path.join(DOCS, "*.md")))


def all_files() -> list[str]:
    return [README, *doc_pages()]


def rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def split_markdown(text: str):
    """(prose lines, code blocks): prose is a list of (line number, line) outside fences; a code block is
    (language, first line number, its lines). Fences may be indented (inside list items)."""
    prose, blocks, block = [], [], None
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"\s*(```+|~~~+)\s*([\w+-]*)", line)
        if block is None and fence:
            block = (fence.group(2).lower(), number, [], fence.group(1))
        elif block is not None and line.strip().startswith(block[3]) and not line.strip().strip(block[3][0]):
            blocks.append(block[:3])
            block = None
        elif block is not None:
            block[2].append(line)
        else:
            prose.append((number, line))
    assert block is None, f"unclosed code fence at line {block[1]}"
    return prose, blocks


def without_code_spans(line: str) -> str:
    return re.sub(r"(`+).*?\1", "", line)


def code_spans(text: str) -> list[str]:
    return [m.group(2).strip() for m in re.finditer(r"(`+)(.+?)\1", text)]


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading (the site uses the same rule: mkdocs.yml sets pymdownx.slugs.slugify)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = text.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(path: str) -> frozenset[str]:
    prose, _ = split_markdown(open(path, encoding="utf-8").read())
    slugs = [github_slug(m.group(1)) for _, line in prose if (m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line))]
    return frozenset(s for i, s in enumerate(slugs) if s not in slugs[:i])  # a repeated heading gets a suffix


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(path: str) -> list[tuple[int, str]]:
    prose, _ = split_markdown(open(path, encoding="utf-8").read())
    return [(number, m.group(1)) for number, line in prose for m in LINK.finditer(without_code_spans(line))]


def resolve(source: str, target: str) -> tuple[str, str]:
    """The file and the anchor a relative link points to."""
    target, _, anchor = target.partition("#")
    return (os.path.normpath(os.path.join(os.path.dirname(source), target)) if target else source), anchor


def link_problems(path: str, docs: str = DOCS) -> list[str]:
    problems = []
    for number, target in links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        where = f"{rel(path)}:{number}: {target}"
        if target.startswith("/"):
            problems.append(f"{where}: an absolute path (GitHub and the site read it differently)")
            continue
        file, anchor = resolve(path, target)
        if not os.path.exists(file):
            problems.append(f"{where}: no such file")
        elif os.path.dirname(path) == docs and not file.startswith(docs + os.sep):
            problems.append(f"{where}: leaves docs/, which the site does not hold (name the file in `code`)")
        elif anchor and (not file.endswith(".md") or anchor not in anchors(file)):
            problems.append(f"{where}: no heading with the anchor #{anchor} in {rel(file)}")
    return problems


def test_every_link_and_anchor_resolves():
    problems = [p for path in all_files() for p in link_problems(path)]
    assert not problems, "\n".join(problems)


def test_the_link_check_sees_a_broken_file_and_a_broken_anchor(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# A page\n\n## The `step` (fast)\n")
    page = docs / "b.md"
    page.write_text("[ok](a.md#the-step-fast) [file](c.md) [anchor](a.md#the-step) `[not](a link)`\n\n"
                    "```bash\n[inside](code.md)\n```\n")
    problems = link_problems(str(page), docs=str(docs))
    assert len(problems) == 2 and "c.md: no such file" in problems[0] and "#the-step" in problems[1], problems


def test_github_slugs():
    assert github_slug("Storage: gs:// paths") == "storage-gs-paths"
    assert github_slug("Block diffusion (`bench/x.py`, `llada-jax demo --lora`)") == \
        "block-diffusion-benchxpy-llada-jax-demo---lora"
    assert github_slug("The demo's wall time") == "the-demos-wall-time"


# ---------------------------------------------------------------------------------------------------------------
# Commands: every `llada-jax ...` line names a subcommand and only flags its parser accepts
# ---------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def cli_parser() -> argparse.ArgumentParser:
    from llada_jax.cli import build_parser

    return build_parser()  # as `llada-jax` builds it


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    # argparse has no public accessor for its sub-parsers; `_actions` has been stable since Python 2.7.
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


@functools.lru_cache(maxsize=None)
def config_schema(config_file: str | None):
    """The training config a command starts from: the named configs/*.py file, else the default schema."""
    from llada_jax.config import LLaDAConfig, load_config, train_config

    if config_file:
        path = os.path.join(ROOT, config_file.split(".py:", 1)[0] + ".py" if ".py:" in config_file else config_file)
        if os.path.isfile(path) and path.endswith(".py"):
            arg = config_file.split(".py:", 1)[1] if ".py:" in config_file else None
            return load_config(path if arg is None else f"{path}:{arg}")
    return train_config(LLaDAConfig.llada_8b())


def config_field_exists(dotted: str, config=None) -> bool:
    import ml_collections

    node = config_schema(None) if config is None else config
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def is_placeholder(value: str) -> bool:
    return "..." in value or bool(re.fullmatch(r"[A-Z][A-Z0-9_]*", value)) or value.startswith("<")


def command_lines(path: str) -> list[tuple[int, list[str], bool]]:
    """(line number, the tokens after `llada-jax`, whole) for every llada-jax command of a shell code block
    (whole=True) or of an inline code span in prose (whole=False: it may stop at a command group)."""
    prose, blocks = split_markdown(open(path, encoding="utf-8").read())
    found = []
    for language, first, lines in blocks:
        if language not in SHELL_LANGUAGES:
            continue
        joined, start = "", None
        for offset, line in enumerate(lines):
            start = first + 1 + offset if start is None else start
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1] + " "
                continue
            found += [(start, tokens, True) for tokens in llada_jax_commands(joined + line)]
            joined, start = "", None
    for number, line in prose:
        for span in code_spans(line):
            if span.startswith("llada-jax "):
                found += [(number, tokens, False) for tokens in llada_jax_commands(span)]
    return found


def llada_jax_commands(line: str) -> list[list[str]]:
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError as e:
        return [["<unparseable>", str(e), line]]
    commands, current = [], []
    for token in tokens + ["&&"]:
        if token in ("&&", "||", ";", "|"):
            if "llada-jax" in current:
                commands.append(current[current.index("llada-jax") + 1:])
            current = []
        else:
            current.append(token)
    # `[--flag VALUE]` marks optional parts: the brackets are not part of the command
    return [[t.removeprefix("[").removesuffix("]") for t in c if t not in ("[", "]")] for c in commands]


def command_problems(tokens: list[str], whole: bool) -> list[str]:
    parser, words = cli_parser(), list(tokens)
    if words and words[0] == "<unparseable>":
        return [f"cannot split the line: {words[1]}"]
    name = "llada-jax"
    while subcommands(parser):
        choices = subcommands(parser)
        if words and words[0] in ("-h", "--help"):
            return []
        if not words or words[0].startswith("-"):
            return [] if not whole else [f"`{name}` needs one of {sorted(choices)}"]
        if words[0] not in choices:
            return [f"`{name}` has no subcommand {words[0]!r} (it has {sorted(choices)})"]
        name += " " + words[0]
        parser, words = choices[words.pop(0)], words
    known = options(parser)
    takes_overrides = parser.get_default("accepts_config_overrides")
    config_file = next((words[i + 1] for i, w in enumerate(words[:-1]) if w == "--config"), None)
    problems, seen = [], set()
    for i, word in enumerate(words):
        if not word.startswith("-") or word == "-" or word == "--":
            continue
        flag, has_value, value = word.partition("=")
        if flag.startswith("--config."):
            dotted = flag[len("--config."):]
            if not takes_overrides:
                problems.append(f"`{name}` takes no --config.* overrides ({word})")
            elif not config_field_exists(dotted, config_schema(config_file)):
                problems.append(f"`{name}`: {flag} names no config field")
            continue
        if flag not in known:
            problems.append(f"`{name}` has no flag {flag}")
            continue
        action = known[flag]
        seen.add(action.dest)
        if action.choices is not None and action.nargs is None:
            value = value if has_value else (words[i + 1] if i + 1 < len(words) else "")
            for alternative in value.split("|"):
                if alternative and not is_placeholder(alternative) and alternative not in action.choices:
                    problems.append(f"`{name} {flag}`: {alternative!r} is not one of {sorted(action.choices)}")
    if whole and "..." not in words:
        for action in parser._actions:
            if action.required and action.option_strings and action.dest not in seen:
                problems.append(f"`{name}` needs {action.option_strings[0]}")
    return problems


def test_every_command_line_names_real_subcommands_and_flags():
    problems, whole_lines = [], 0
    for path in all_files():
        for number, tokens, whole in command_lines(path):
            whole_lines += whole
            problems += [f"{rel(path)}:{number}: {p}" for p in command_problems(tokens, whole)]
    assert whole_lines > 40, whole_lines  # the scan sees the docs' command lines
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("line, problem", [
    ("llada-jax sampel --model m", "no subcommand 'sampel'"),
    ("llada-jax convert --input a --output b", "needs one of"),
    ("llada-jax sample --model m --input a --output b --gen_lenght 8", "no flag --gen_lenght"),
    ("llada-jax sample --model m --input a --output b --sampling_method semi_ar", "'semi_ar' is not one of"),
    ("llada-jax sample --input a --output b", "needs --model"),
    ("llada-jax pretrain --config.model.dtyp=bfloat16", "--config.model.dtyp names no config field"),
    ("llada-jax sample --model m --input a --output b --config.seed=1", "takes no --config.* overrides"),
    ("launch/tpu_pod.sh --tpu t -- llada-jax data check --kind pretrain|sft2 FILE...", "'sft2' is not one of"),
])
def test_the_command_check_catches(line, problem):
    (tokens,) = llada_jax_commands(line)
    problems = command_problems(tokens, whole=True)
    assert any(problem in p for p in problems), problems


def test_the_command_check_accepts_placeholders_and_continuations(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("```bash\nllada-jax data convert --format sharegpt|alpaca --tokenizer DIR INPUT OUTPUT  # x\n"
                    "pip install . && llada-jax sft --config configs/tiny_sft.py \\\n"
                    "    --config.lora.rank=8 [--seed 1]\n```\n`llada-jax convert`, `llada-jax sample --resume`\n")
    found = command_lines(str(page))
    assert [(n, t[0], w) for n, t, w in found] == [(2, "data", True), (3, "sft", True), (6, "convert", False),
                                                   (6, "sample", False)]
    assert not [p for _, tokens, whole in found for p in command_problems(tokens, whole)]


# ---------------------------------------------------------------------------------------------------------------
# Config fields named anywhere, and Python snippets
# ---------------------------------------------------------------------------------------------------------------

CONFIG_PLACEHOLDERS = {"key"}  # `--config.key=value`: the form, not a field


def config_field_problems(path: str) -> list[str]:
    from llada_jax.config import LLaDAConfig

    model_fields = set(LLaDAConfig.llada_8b().to_dict())
    problems = []
    for number, line in enumerate(open(path, encoding="utf-8").read().splitlines(), 1):
        for m in re.finditer(r"--config\.([A-Za-z_][\w.]*\w)", line):
            if m.group(1) not in CONFIG_PLACEHOLDERS and not config_field_exists(m.group(1)):
                problems.append(f"{rel(path)}:{number}: --config.{m.group(1)} names no config field")
        for span in code_spans(line):  # `config.mesh.logical_axis_rules`, `config.attention_impl` (a model field)
            m = re.fullmatch(r"config\.([A-Za-z_][\w.]*)", span)
            if m and m.group(1).rsplit(".", 1)[-1] not in ("json", "py") and not (
                    config_field_exists(m.group(1)) or m.group(1) in model_fields):
                problems.append(f"{rel(path)}:{number}: `{span}` names no config field")
    return problems


def test_every_config_field_named_exists():
    problems = [p for path in all_files() for p in config_field_problems(path)]
    assert not problems, "\n".join(problems)


def test_the_config_field_check_catches_a_misspelling(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("Set `--config.data.tokenizer=x`, `config.mesh.fsdp`, `config.json`, `--config.key=value`;\n"
                    "not --config.data.tokeniser=x or `config.mesh.fsdq`.\n")
    problems = config_field_problems(str(page))
    assert len(problems) == 2 and "tokeniser" in problems[0] and "fsdq" in problems[1], problems


def test_the_config_schema_page_lists_every_group_and_field():
    """docs/configs.md lists every field of train_config() (the model group's fields are on docs/model.md)."""
    import ml_collections

    text = open(os.path.join(DOCS, "configs.md"), encoding="utf-8").read()
    schema = text.split("## The schema", 1)[1]
    config = config_schema(None)
    missing = []
    for key, value in config.items():
        if key == "model":
            continue
        names = value.keys() if isinstance(value, ml_collections.ConfigDict) else [key]
        for name in names:
            if f"`{name}`" not in schema:
                missing.append(key if name == key else f"{key}.{name}")
    assert not missing, missing


def python_blocks(path: str) -> list[tuple[int, str]]:
    _, blocks = split_markdown(open(path, encoding="utf-8").read())
    return [(first, "\n".join(lines)) for language, first, lines in blocks if language in ("python", "py")]


def test_every_python_snippet_parses_and_its_imports_exist():
    problems, imports = [], 0
    for path in all_files():
        for first, code in python_blocks(path):
            try:
                tree = ast.parse(code)
            except SyntaxError as e:
                problems.append(f"{rel(path)}:{first + (e.lineno or 0)}: {e.msg}")
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llada_jax"):
                    module = importlib.import_module(node.module)
                    for alias in node.names:
                        imports += 1
                        if not hasattr(module, alias.name):
                            problems.append(f"{rel(path)}:{first + node.lineno}: {node.module} has no {alias.name}")
    assert imports > 10, imports
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------------------
# The README is short and reaches every page; the site builds
# ---------------------------------------------------------------------------------------------------------------

def test_the_readme_is_short():
    lines = len(open(README, encoding="utf-8").read().splitlines())
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move reference material into docs/"


def linked_files(path: str) -> set[str]:
    return {resolve(path, target)[0] for _, target in links(path) if not re.match(r"[a-z][a-z0-9+.-]*:", target)}


def test_the_readme_links_every_docs_page_and_every_page_is_reachable():
    pages = set(doc_pages())
    unlinked = sorted(map(rel, pages - linked_files(README)))
    assert not unlinked, f"README.md links no {unlinked}"
    reached, todo = set(), [os.path.join(DOCS, "index.md")]
    while todo:
        page = todo.pop()
        if page not in reached and page in pages:
            reached.add(page)
            todo += linked_files(page)
    unreached = sorted(map(rel, pages - reached))
    assert not unreached, f"no link from docs/index.md leads to {unreached}"  # the site's pages link one another


def test_the_site_nav_lists_every_docs_page_once():
    text = open(os.path.join(ROOT, "mkdocs.yml"), encoding="utf-8").read()
    nav = re.findall(r"^\s*-\s*(?:.*?:\s+)?(\S+\.md)\s*$", text.split("\nnav:", 1)[1], re.M)
    assert sorted(nav) == sorted(os.path.basename(p) for p in doc_pages()), nav


def test_the_docs_site_builds_strictly(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                          os.path.join(ROOT, "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "training" / "index.html").is_file()
