"""The documentation says what the code does: commands, flags and Python names it mentions exist."""

import argparse
import importlib
import re
from pathlib import Path

import pytest

from cogvideox.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = {
    path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8")
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "src/cogvideox/serve/README.md"]
}


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _synopsis() -> str:
    """The code block of the README's "Command line" section."""
    section = README.split("## Command line", 1)[1]
    return section.split("```", 2)[1]


def test_the_readme_names_every_command():
    synopsis = _synopsis()
    for name in _commands():
        assert re.search(rf"^cogvideox {name}\b", synopsis, re.M), f"`cogvideox {name}` is not in the README"


def test_the_readme_synopsis_lists_every_flag_of_generate():
    synopsis = _synopsis()
    flags = [
        option
        for action in _commands()["generate"]._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    ]
    missing = [flag for flag in flags if not re.search(rf"\[{re.escape(flag)}\b", synopsis)
               and not re.search(rf"\| {re.escape(flag)}\b", synopsis)]
    assert not missing, f"generate flags missing from the README's synopsis: {missing}"


# "`name(...)` from `cogvideox.module`": every name called there (or the bare name) lives in that module.
_FROM = re.compile(r"`([^`]+)`\s+from\s+`(cogvideox[\w.]*)`")


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_python_names_the_docs_import_from_a_module_exist_there(doc):
    found = _FROM.findall(DOCS[doc])
    for code, module_name in found:
        module = importlib.import_module(module_name)
        names = re.findall(r"([A-Za-z_]\w*)\(", code) or [code.strip()]
        for name in names:
            assert hasattr(module, name), f"{doc}: `{code}` from `{module_name}`: {module_name} has no {name}"
