"""The documentation is tested like code (tier 1, no distributed processes).

- Every fenced ``python`` block of README.md, docs/*.md and examples/README.md compiles.
- Complete blocks run, all in one fresh CPU process, each in a directory of its own: they build
  strategies, read and write recipes and construct TrainingArguments, and never train (a script's
  training sits under ``if __name__ == "__main__":``, which the run does not enter).
- A block whose first line is ``# fragment`` belongs to a larger script: it only compiles, and each
  name it uses is imported in the block, a builtin, or one of PLACEHOLDERS.
- Every relative link leads to a file that exists (and to a heading there, when it names one).
- Every ``meshplan SUBCOMMAND --flag`` in a shell block or inline code is one the command accepts.
- docs/reference.md is what scripts/reference.py writes, and .ci/run installs as the README says.
"""

from __future__ import annotations

import ast
import builtins
import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [page for page in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "examples" / "README.md")
         if page.exists()]
FRAGMENT_MARK = "# fragment"
# Names a fragment may use without defining them: the objects of the user's own script.
PLACEHOLDERS = {"model", "optimizer", "loader", "dataset", "module", "my_lightning_module", "trainer", "accelerator",
                "Regression", "data"}  # the last two: the guide's Lightning script, which its fragments extend
SHELL_LANGUAGES = {"bash", "sh", "shell", "console", "zsh"}
# Variables that would make a block's process look like one a launcher started.
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "GROUP_RANK", "NODE_RANK", "MESHPLAN_RECIPE")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str

    @property
    def label(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def is_fragment(self) -> bool:
        return self.code.lstrip().startswith(FRAGMENT_MARK)


def code_blocks(page: Path) -> list[Block]:
    """The fenced blocks of a Markdown page, in order."""
    blocks, opening, language, body = [], None, "", []
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if opening is None and line.startswith("```"):
            opening, language, body = number, line[3:].strip().lower(), []
        elif opening is not None and line.strip() == "```":
            blocks.append(Block(page, opening, language, "\n".join(body) + "\n"))
            opening = None
        elif opening is not None:
            body.append(line)
    assert opening is None, f"{page.relative_to(ROOT)}:{opening}: a code block is never closed"
    return blocks


PYTHON_BLOCKS = [block for page in PAGES for block in code_blocks(page) if block.language in ("python", "py")]
FRAGMENTS = [block for block in PYTHON_BLOCKS if block.is_fragment]
COMPLETE_BLOCKS = [block for block in PYTHON_BLOCKS if not block.is_fragment]


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda block: block.label)
def test_python_block_compiles(block: Block) -> None:
    compile(block.code, block.label, "exec")


@pytest.mark.parametrize("block", FRAGMENTS, ids=lambda block: block.label)
def test_fragment_imports_every_name_it_uses(block: Block) -> None:
    undefined = sorted(_free_names(block.code) - PLACEHOLDERS)
    assert not undefined, (f"{block.label}: the fragment uses {', '.join(undefined)} without importing or defining "
                           f"them; import them in the block (placeholders allowed: {', '.join(sorted(PLACEHOLDERS))})")


def _free_names(code: str) -> set[str]:
    """Names the code reads but never binds (anywhere in the block: scopes are not told apart)."""
    read, bound = set(), set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return read - bound - set(dir(builtins))


def test_fragment_mark_is_the_first_line() -> None:
    # The marker is the first line, exactly: a "# fragment" further down would not be seen.
    misplaced = [block.label for block in PYTHON_BLOCKS
                 if not block.is_fragment and re.search(r"^\s*# fragment\b", block.code, re.MULTILINE)]
    assert not misplaced, f"'{FRAGMENT_MARK}' must be the first line of the block: {', '.join(misplaced)}"


_RUNNER = r'''
import json, os, sys, traceback
blocks, report = json.load(open(sys.argv[1])), sys.argv[2]
failures = []
for index, block in enumerate(blocks):
    folder = os.path.join(os.path.dirname(report), f"block-{index}")
    os.makedirs(folder)
    os.chdir(folder)
    environment = dict(os.environ)
    try:
        exec(compile(block["code"], block["label"], "exec"), {"__name__": "__docs__"})
    except BaseException:
        failures.append(block["label"] + ":\n" + traceback.format_exc())
    finally:
        os.environ.clear()
        os.environ.update(environment)
with open(report, "w") as file:
    json.dump(failures, file)
'''


@pytest.mark.slow
def test_complete_blocks_run_on_cpu(tmp_path: Path) -> None:
    blocks = tmp_path / "blocks.json"
    blocks.write_text(json.dumps([{"label": block.label, "code": block.code} for block in COMPLETE_BLOCKS]))
    report = tmp_path / "run" / "failures.json"
    report.parent.mkdir()
    environment = {name: value for name, value in os.environ.items()
                   if name not in LAUNCHER_VARIABLES and not name.startswith(("ACCELERATE_", "TORCHELASTIC_"))}
    environment.update(CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-c", _RUNNER, str(blocks), str(report)], capture_output=True, text=True,
                            env=environment, timeout=300)
    assert result.returncode == 0 and report.exists(), f"the block runner failed:\n{result.stderr[-3000:]}"
    failures = json.loads(report.read_text())
    assert not failures, ("these code blocks fail when run (mark a block '# fragment' if it needs a script around "
                          "it, GPUs or a launcher):\n\n" + "\n\n".join(failures))


# Links: [text](target), outside code. Images too.
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCED = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")


def _prose(page: Path) -> str:
    return _INLINE_CODE.sub("", _FENCED.sub("", page.read_text()))


def _relative_links() -> list:
    return [pytest.param(page, target, id=f"{page.relative_to(ROOT)}->{target}")
            for page in PAGES for target in _LINK.findall(_prose(page)) if not re.match(r"[a-z][a-z+.-]*:", target)]


@pytest.mark.parametrize("page, target", _relative_links())
def test_relative_link_resolves(page: Path, target: str) -> None:
    path, _, anchor = target.partition("#")
    destination = (page.parent / path).resolve() if path else page
    where = f"{page.relative_to(ROOT)}: link {target}"
    assert destination.exists(), f"{where} leads to {destination}, which does not exist"
    if anchor and destination.suffix == ".md":
        assert anchor in _anchors(destination), f"{where}: {destination.name} has no heading with the anchor #{anchor}"


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the headings of a page: lower case, punctuation dropped, spaces as hyphens."""
    anchors: set[str] = set()
    for line in _FENCED.sub("", page.read_text()).splitlines():
        heading = re.match(r"#{1,6}\s+(.*)", line)
        if heading is None:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        candidate, count = slug, 0
        while candidate in anchors:  # a repeated heading gets -1, -2, ...
            count += 1
            candidate = f"{slug}-{count}"
        anchors.add(candidate)
    return anchors


def _reference_module():
    """scripts/reference.py, imported without writing a bytecode cache into the checkout."""
    spec = importlib.util.spec_from_file_location("reference", ROOT / "scripts" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    writes_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = writes_bytecode
    return module


# `meshplan NAME ...` where a command starts: after a space, a quote, "$(", a path or a shell operator.
_COMMAND = re.compile(r"(?:^|[\s\"'(/;|&`])meshplan[ \t]+([a-z][\w-]*)([^\n`]*)")


def _commands_in_docs() -> list[tuple[str, str, str]]:
    """(where, subcommand, its flags) for every `meshplan` command in shell blocks and inline code."""
    found = []
    for page in PAGES:
        texts = [(f"{block.label}", block.code) for block in code_blocks(page) if block.language in SHELL_LANGUAGES]
        texts += [(f"{page.relative_to(ROOT)}", span) for span in _INLINE_CODE.findall(_FENCED.sub("", page.read_text()))
                  if _is_a_command(span.strip("`"))]
        for where, text in texts:
            for line in text.splitlines():
                line = re.sub(r"(^|\s)#.*$", "", line)  # a shell comment
                for name, rest in _COMMAND.findall(line):
                    rest = re.split(r"[);|&]", rest)[0]
                    rest = re.split(r"(?:^|\s)--(?:\s|$)", rest)[0]  # after a lone --: the training script's own
                    found.append((where, name, " ".join(re.findall(r"(?<![\w-])--?[a-zA-Z][\w-]*", rest))))
    return found


def _is_a_command(span: str) -> bool:
    """Whether inline code is a command line (`meshplan recipes`, `X=1 .venv/bin/meshplan ...`, "$(meshplan ...)"),
    not a quoted message that happens to contain the word."""
    return re.match(r"(\w+=\S*\s+)*(\S*/)?meshplan\s", span) is not None or "$(meshplan " in span


def test_every_meshplan_command_in_the_docs_exists() -> None:
    commands = _reference_module().cli_commands()
    problems = []
    for where, name, flags in _commands_in_docs():
        if name not in commands:
            problems.append(f"{where}: `meshplan {name}` is no subcommand (there are {', '.join(commands)})")
            continue
        accepted = {option for action in commands[name]._actions for option in action.option_strings}
        problems += [f"{where}: `meshplan {name}` has no option {flag}" for flag in flags.split() if flag not in accepted]
    assert not problems, "\n".join(problems)


def test_reference_page_is_what_the_script_writes() -> None:
    written = (ROOT / "docs" / "reference.md").read_text()
    assert written == _reference_module().render(), (
        "docs/reference.md differs from the docstrings and the command's --help: run `python scripts/reference.py`")


def test_ci_installs_with_the_readme_commands() -> None:
    test_command = next(line for block in code_blocks(ROOT / "README.md") if block.language == "bash"
                        for line in block.code.splitlines() if line.endswith("python -m pytest"))
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines(), (
        "`.ci/run` must run the README's test command verbatim")
