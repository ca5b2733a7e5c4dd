"""The README's and the docs pages' code blocks run: the Python example builds its model on 8 CPU
ranks, and every shell example's flags are known to the parser of the command they are given to.
The README stays short, and every relative link of the README and the docs pages resolves."""

import argparse
import re
import shlex
from collections import Counter
from pathlib import Path

import pytest

from tests.cases.readme import run_python_example
from tests.launch import REPO

# The README and every docs page: the examples moved from the README into docs/ stay checked.
PAGES = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
TEXTS = {page: page.read_text() for page in PAGES}
README_MAX_LINES = 250


def code_blocks(language: str):
    return [block for text in TEXTS.values()
            for block in re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)]


def commands():
    """Each shell command of the bash blocks of the README and the docs pages, continuation lines
    joined, comments dropped."""
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                yield shlex.split(line)


@pytest.mark.uses_pool
def test_python_example_builds_the_grid_model(request):
    (example,) = [b for b in code_blocks("python") if "initialize_mxn_parallel" in b]  # README
    pool = request.getfixturevalue("pool8")
    for r in pool.run(run_python_example, code=example):
        # 4 layers over PP 2; 12 heads / n = 2 head groups; d = 64 / m = 2 dims per slice
        assert r["grid_layers"] == 2
        assert (r["heads_per_rank"], r["slice_dim"]) == (6, 32)
        # rank (i, j): q, k, v rows of 6 query heads + 2 KV heads, 32 dims each
        assert r["qkv_shape"] == ((6 + 2 * 2) * 32, 768)
        assert r["proj_shape"] == (768, 6 * 32)


def _options(parser: argparse.ArgumentParser) -> set:
    """Every option string of the parser and of its sub-commands' parsers."""
    out = set()
    for action in parser._actions:
        out |= set(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out |= _options(sub)
    return out


def _known_flags():
    from torch.distributed.run import get_args_parser

    from megatron_mxn.tools import ab_compare
    from megatron_mxn.convert.__main__ import build_parser as convert_parser
    from megatron_mxn.megatron_lm.run_configs import megatron_option_strings
    from megatron_mxn.inference.generate_flags import GENERATE
    from megatron_mxn.megatron_lm import add_mxn_args

    config = {"--config", "--layout"}
    megatron = megatron_option_strings(add_mxn_args) | config
    generate = megatron | _options(GENERATE)
    ab = set(re.findall(r'add_argument\("(--[a-z-]+)"', Path(ab_compare.__file__).read_text()))
    return {"torchrun": _options(get_args_parser()), "pretrain_gpt": megatron,
            "generate": generate, "ab_compare": ab | generate,
            "convert": _options(convert_parser())}


SCRIPTS = {"scripts/pretrain_gpt_mxn.py": "pretrain_gpt",
           "scripts/pretrain_hybrid_mxn.py": "pretrain_gpt", "megatron_mxn.megatron_lm.pretrain_gpt":
           "pretrain_gpt", "scripts/generate_mxn.py": "generate",
           "megatron_mxn.inference.generate": "generate", "scripts/ab_compare.py": "ab_compare",
           "megatron_mxn.convert": "convert"}


def test_shell_examples_use_known_flags():
    known = _known_flags()
    makefile = (REPO / "Makefile").read_text()
    checked = 0
    for argv in commands():
        while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):  # VAR=value prefixes
            var = argv.pop(0).split("=")[0]
            scripts = [a for a in argv if a.endswith(".sbatch")]
            for script in scripts:  # a variable the sbatch script really reads
                assert var in (REPO / script).read_text(), (var, script)
        if not argv:
            continue
        tool = Path(argv[0]).name
        if tool == "make":
            for target in argv[1:]:
                assert re.search(rf"^{target}:", makefile, flags=re.M), target
            continue
        if tool in ("sbatch", "cd") or argv[:3] == [".venv/bin/python", "-m", "pytest"]:
            for path in argv[1:]:
                if path.endswith((".sbatch", ".py")):
                    assert (REPO / path).exists(), path
            continue
        kind = "torchrun" if tool == "torchrun" else None
        assert kind or tool == "python", argv
        for k, arg in enumerate(argv[1:], 1):
            target = arg if arg.endswith(".py") else (argv[k + 1] if arg == "-m" else None)
            if target in SCRIPTS:
                kind = SCRIPTS[target]
                checked += 1
            elif arg.startswith("--"):
                flag = arg.split("=")[0]
                assert flag in known[kind], f"{' '.join(argv)}: {flag} is not a {kind} flag"
    assert checked >= 5  # the pretraining, generation and A/B examples were all checked


def test_no_merge_conflict_markers_in_tracked_files():
    """A merge left `<<<<<<<` / `>>>>>>>` blocks in the README once; never again."""
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    marked = [f for f in files if Path(REPO, f).suffix in (".py", ".md", ".yaml", ".sh", ".txt")
              and re.search(r"^(<{7}|>{7}) ", Path(REPO, f).read_text(errors="replace"), re.M)]
    assert marked == []


def test_readme_is_short():
    """The README is the front page (what, install, two commands, one example, one table, the
    test command, links); everything else lives in docs/ and results/."""
    lines = len(TEXTS[REPO / "README.md"].splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code (whose brackets are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`]*`", "", text)


def _anchors(text: str) -> set:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -1, -2, ...
    for repeats."""
    seen, anchors = Counter(), set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", re.sub(r"^```.*?^```", "", text,
                                                           flags=re.S | re.M), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
        seen[slug] += 1
    return anchors


def test_relative_links_resolve():
    """Every relative link (and image) of the README and the docs pages names an existing file or
    folder, and an anchor into a Markdown page names one of its headings."""
    broken, checked = [], 0
    for page, text in TEXTS.items():
        for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", _prose(text)):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            checked += 1
            if not file.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text()):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert broken == [], "\n".join(broken)
    assert checked >= len(PAGES)  # the README links every docs page
