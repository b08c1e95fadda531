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


def _python_block(text: str, heading: str) -> str:
    section = text.split(heading, 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_using_a_lora_snippet_runs_on_the_demo_model(tmp_path, monkeypatch):
    from cogvideox import Pipeline
    from cogvideox.train import lora

    pipe = Pipeline.from_pretrained()
    for seed, folder in ((1, "style"), (2, "motion")):
        lora.inject_lora(pipe.transformer, 2, 2.0, name=folder, seed=seed)
        lora.save_lora(pipe.transformer, tmp_path / "runs" / folder, name=folder)
    code = _python_block(DOCS["docs/finetune.md"], "## Using a LoRA")
    assert '"THUDM/CogVideoX-5b"' in code
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(code.replace('"THUDM/CogVideoX-5b"', "None"), scope)
    assert lora.adapter_names(scope["pipe"].transformer) == []  # the snippet ends with unload_lora()


def test_a_lora_is_named_after_its_folder_even_with_a_dot_in_it(tmp_path):
    from cogvideox import Pipeline
    from cogvideox.train import lora

    pipe = Pipeline.from_pretrained()
    lora.inject_lora(pipe.transformer, 2, 2.0, name="x")
    lora.save_lora(pipe.transformer, tmp_path / "style-v1.5", name="x")
    file = lora.save_lora(pipe.transformer, tmp_path / "motion.safetensors", name="x")
    lora.remove_lora(pipe.transformer)
    assert pipe.load_lora(tmp_path / "style-v1.5") == "style_v1_5"
    assert pipe.load_lora(file) == "motion"


def test_the_model_card_counts_the_demo_tokenizer_words():
    import sentencepiece

    from cogvideox.demo import build

    card = (ROOT / "src/cogvideox/demo/MODEL_CARD.md").read_text(encoding="utf-8")
    words = int(re.search(r"over the (\d+) caption words \(\+ pad, eos, unk\)", card).group(1))
    tokenizer = sentencepiece.SentencePieceProcessor(
        model_file=str(ROOT / "src/cogvideox/demo/weights/tokenizer/spiece.model")
    )
    assert words == len(build.vocabulary()) == tokenizer.get_piece_size() - 3


def test_the_finetune_settings_table_names_every_setting():
    import dataclasses

    from cogvideox.train.config import FinetuneConfig

    table = DOCS["docs/finetune.md"].split("## Settings", 1)[1].split("Example", 1)[0]
    named = {name for row in table.splitlines() if row.startswith("| `") for name in re.findall(r"`(\w+)`", row.split("|")[1])}
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    assert named == fields, f"missing from the table: {fields - named}; not settings: {named - fields}"


def test_finetune_names_the_settings_a_resumed_run_must_keep():
    from cogvideox.train.config import FinetuneConfig

    text = " ".join(DOCS["docs/finetune.md"].split())
    listed = re.search(r"a checkpoint from other settings \(([^)]*)\) is refused", text).group(1)
    assert re.findall(r"`(\w+)`", listed) == list(FinetuneConfig(data="d", output="o").run_identity)


def _help_texts() -> dict[str, str]:
    return {"cogvideox": build_parser().format_help()} | {
        f"cogvideox {name}": parser.format_help() for name, parser in _commands().items()
    }


def test_help_texts_show_no_doubled_percent_signs():
    """argparse %-formats each flag's help but not a description, so "%%" is right in the first only."""
    doubled = [name for name, text in _help_texts().items() if "%%" in text]
    assert not doubled, f"--help of {doubled} prints '%%'"

