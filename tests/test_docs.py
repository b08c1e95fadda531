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


def test_every_flag_in_the_readme_synopsis_belongs_to_its_command():
    commands = _commands()
    for block in re.split(r"^(?=cogvideox \w)", _synopsis(), flags=re.M):
        name = re.match(r"cogvideox (\w+)", block)
        if not name:
            continue
        have = {option for action in commands[name.group(1)]._actions for option in action.option_strings}
        named = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", block))
        assert named <= have, f"the README gives `cogvideox {name.group(1)}` flags it lacks: {sorted(named - have)}"


PACKAGE = ROOT / "src/cogvideox"


def _map_entries() -> dict[str, str]:
    """docs/architecture.md's map: each entry ("models/", "schedulers.py", ...) with its text, continuation
    lines included (an entry starts on a line indented by two spaces)."""
    block = DOCS["docs/architecture.md"].split("## Map", 1)[1].split("```", 2)[1]
    entries, name = {}, None
    for line in block.splitlines()[2:]:  # after "src/cogvideox/"
        if re.match(r"  \S", line):
            name = line.split()[0]
            entries[name] = ""
        entries[name] += " " + line
    return entries


def test_the_architecture_map_names_every_module():
    entries = _map_entries()
    top = " ".join(entries.values())
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if path.stem in ("__init__", "__main__"):
            continue
        if len(relative.parts) == 1:
            found = re.search(rf"\b{re.escape(path.name)}\b", top)
        else:
            entry = entries.get(f"{relative.parts[0]}/", "")
            found = re.search(rf"\b{re.escape(path.stem)}\b", entry)
        if not found:
            missing.append(relative.as_posix())
    assert not missing, f"docs/architecture.md's map does not name {missing}"


def _is_module(name: str) -> bool:
    path = PACKAGE.joinpath(*name.split(".")[1:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _cogvideox_imports(path: Path) -> set[str]:
    """The cogvideox modules `path` imports, at the top or inside functions, as dotted names."""
    import ast

    package = ["cogvideox", *path.relative_to(PACKAGE).parent.parts]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:  # `from cogvideox import fast` imports a module, `import X` a name
                found.add(f"{module}.{alias.name}" if _is_module(f"{module}.{alias.name}") else module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] == "cogvideox"}


# docs/architecture.md, "Imports point one way": the models import only the bottom tier, and fast/ and
# train/lora.py (which act on a model, not a pipeline) the models and that tier.
_BOTTOM = ("cogvideox.errors", "cogvideox.files", "cogvideox.values")
_ALLOWED_IMPORTS = {
    "models": (*_BOTTOM, "cogvideox.models."),
    "fast": (*_BOTTOM, "cogvideox.models.", "cogvideox.fast"),
    "train/lora.py": (*_BOTTOM, "cogvideox.models."),
}
_ALSO = {"fast/memory_plan.py": ("cogvideox.weights", "cogvideox.request")}


@pytest.mark.parametrize("part", sorted(_ALLOWED_IMPORTS))
def test_imports_point_the_way_the_architecture_says(part):
    paths = [PACKAGE / part] if part.endswith(".py") else sorted((PACKAGE / part).rglob("*.py"))
    for path in paths:
        relative = path.relative_to(PACKAGE).as_posix()
        allowed = _ALLOWED_IMPORTS[part] + _ALSO.get(relative, ())
        wrong = {name for name in _cogvideox_imports(path) if not name.startswith(allowed)}
        assert not wrong, f"{relative} imports {sorted(wrong)}, against docs/architecture.md"


def test_the_readme_names_every_vae_lever():
    from cogvideox import fast

    levers = sorted(name for name in dir(fast) if name.startswith("vae_"))
    missing = [name for name in levers if f"`cogvideox.fast.{name}(pipe.vae)`" not in README]
    assert not missing, f"VAE levers the README does not name: {missing}"
    count = re.search(r"(\w+) VAE levers are opt-in", README).group(1)
    assert count == ["Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine"][len(levers)]


def test_the_model_card_describes_the_shipped_demo_model():
    import json

    from cogvideox.demo import DEMO_MODEL_DIR, world

    card = " ".join((ROOT / "src/cogvideox/demo/MODEL_CARD.md").read_text(encoding="utf-8").split())
    config = {part: json.loads((DEMO_MODEL_DIR / part / "config.json").read_text()) for part in
              ("transformer", "vae", "text_encoder")}
    t, v, text = config["transformer"], config["vae"], config["text_encoder"]
    assert f"Videos of {world.FRAMES} frames at {world.HEIGHT} x {world.WIDTH}" in card
    pairs = set(re.findall(r"\((\w+), (\w+)\)", card.split("direction) pair is", 1)[1].split("held out", 1)[0]))
    assert pairs == set(world.HELD_OUT_PAIRS)
    per_pair = len(world.SHAPES) * len(world.BACKGROUNDS)
    total = len(world.COLOURS) * len(world.DIRECTIONS) * per_pair
    assert f"({len(pairs) * per_pair} of {total} captions)" in card
    assert f"d_model {text['d_model']}, {text['num_layers']} layers, {text['num_heads']} heads" in card
    channels = ", ".join(str(c) for c in v["block_out_channels"])
    assert (f"block channels ({channels}), {v['layers_per_block']} layer per block, {v['norm_num_groups']} groups, "
            f"{v['latent_channels']} latent channels; scaling factor {v['scaling_factor']:.4f}") in card
    assert (f"{t['num_layers']} layers, {t['num_attention_heads']} heads x {t['attention_head_dim']}, time embedding "
            f"{t['time_embed_dim']}, {t['max_text_seq_length']} text tokens") in card
    scheduler = json.loads((DEMO_MODEL_DIR / "scheduler/scheduler_config.json").read_text())
    assert f"SNR shift {scheduler['snr_shift_scale']}" in card
    guidance = json.loads((DEMO_MODEL_DIR / "sampling.json").read_text())["guidance_scale"]
    assert f"recommended guidance {guidance:g}" in card
    size = sum(path.stat().st_size for path in DEMO_MODEL_DIR.rglob("*") if path.is_file())
    assert f"Weights: {size / 1e6:.0f} MB in all" in card


def _app_routes(tmp_path) -> set[tuple[str, str]]:
    """(METHOD, path) of every route the service's app answers, as `cogvideox serve` builds it."""
    pytest.importorskip("fastapi")
    from cogvideox.demo import DEMO_MODEL_DIR
    from cogvideox.serve.app import Settings, create_app
    from cogvideox.serve.jobs import SQLiteStore
    from cogvideox.serve.spec import ModelSpec

    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    try:
        app = create_app(ModelSpec.from_folder(DEMO_MODEL_DIR, "demo"), store, Settings(data_dir=tmp_path))
    finally:
        store.close()
    return {(method, route.path) for route in app.routes for method in getattr(route, "methods", None) or ()}


def _named_endpoints(text: str) -> set[tuple[str, str]]:
    """`GET /v1/videos/{id}`, `GET /healthz, GET /metrics`: the (METHOD, path) pairs a text names, the query
    left out and the path's parameter spelt as the app spells it."""
    named = set()
    for code in re.findall(r"`([^`]+)`", text):
        for method, path in re.findall(r"\b(GET|POST|DELETE|HEAD) (/[^\s`,?]*)", code):
            named.add((method, path.replace("{id}", "{video_id}")))
    return named


def test_every_endpoint_the_docs_name_is_a_route_of_the_service(tmp_path):
    routes = _app_routes(tmp_path)
    for doc in ("README.md", "src/cogvideox/serve/README.md"):
        missing = _named_endpoints(DOCS[doc]) - routes
        assert not missing, f"{doc} names endpoints the service lacks: {sorted(missing)}"


def test_the_service_readme_names_every_route(tmp_path):
    table = DOCS["src/cogvideox/serve/README.md"].split("## API", 1)[1].split("\n\n", 2)[1]
    unnamed = {(method, path) for method, path in _app_routes(tmp_path) - _named_endpoints(table) if path != "/"}
    assert not unnamed, f"routes the service README's API table does not name: {sorted(unnamed)}"


def _default_of(parser: argparse.ArgumentParser, flag: str):
    """The default `flag` takes: argparse's, or where that is None (the model's or another flag's value
    decides), the one its help states ("default: 0.8")."""
    (action,) = [a for a in parser._actions if flag in a.option_strings]
    if action.default is not None:
        return action.default
    stated = re.search(r"default: ([\w.-]+)", " ".join((action.help or "").split()))
    return stated and stated.group(1)


def _has_flag(commands: dict[str, argparse.ArgumentParser], name: str, flag: str) -> bool:
    return name in commands and any(flag in action.option_strings for action in commands[name]._actions)


def _same_value(doc_value: str, default) -> bool:
    try:
        return float(doc_value) == float(default)
    except (TypeError, ValueError):
        return doc_value == str(default)


def test_the_defaults_the_docs_state_are_the_commands_defaults():
    """`[--steps 50]` in the README's synopsis, and in prose "`--max-queue` queued or running videos (100)" or
    "(`--lease-seconds`, 60)": the flag of the command the text last named with it (`cogvideox serve`) defaults so."""
    commands = _commands()
    checked, wrong = 0, []
    claims = []
    for block in re.split(r"^(?=cogvideox \w)", _synopsis(), flags=re.M):
        name = re.match(r"cogvideox (\w+)", block)
        for flag, value in re.findall(r"\[(--[a-z][\w-]*) (\d[\d.]*)\]", block) if name else ():
            claims.append(("README.md synopsis", name.group(1), flag, value))
    prose = re.compile(r"`(--[a-z][\w-]*)`[^`()]{0,40}\((\d[\d.]*)[;,)]|\(`(--[a-z][\w-]*)`, (\d[\d.]*)\)")
    for doc, text in DOCS.items():
        text = " ".join(text.split())
        for match in prose.finditer(text):
            flag, value = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
            named = [c for c in re.findall(r"cogvideox (\w+)", text[: match.start()]) if _has_flag(commands, c, flag)]
            assert named, f"{doc}: {match.group(0)!r} follows no command that has {flag}"
            claims.append((doc, named[-1], flag, value))
    for doc, name, flag, value in claims:
        default = _default_of(commands[name], flag)
        checked += 1
        if not _same_value(value, default):
            wrong.append(f"{doc}: cogvideox {name} {flag} {value}, but it defaults to {default}")
    assert checked >= 10 and not wrong, wrong


def _literal(text: str):
    """A default as the settings table writes it (`1000`, `1e-4`, `false`, `none`, `[0.9, 0.95]`, `adamw`,
    `0 (off)`), or None for words that are not a value (`the model's`, `DATA/cache`)."""
    import json

    text = re.sub(r"\s*\(.*\)$", "", text.strip())
    try:
        return json.loads({"none": "null"}.get(text, text))
    except ValueError:
        return text if re.fullmatch(r"[a-z][\w-]*", text) and text not in ("rank", "required") else None


def test_the_finetune_settings_table_states_the_defaults():
    """Each default the table writes as a value is FinetuneConfig's; a setting whose default is decided at
    run time (None: the model's, a resumed run's record) is left to the words beside it."""
    from cogvideox.train.config import FinetuneConfig

    config = FinetuneConfig(data="d", output="o")
    table = DOCS["docs/finetune.md"].split("## Settings", 1)[1].split("Example", 1)[0]
    checked, wrong = 0, []
    for row in table.splitlines():
        if not row.startswith("| `"):
            continue
        names, defaults = re.findall(r"`(\w+)`", row.split("|")[1]), row.split("|")[2].strip()
        if len(names) == 1 and isinstance(getattr(config, names[0]), list) and not defaults.startswith("["):
            stated = {names[0]: re.split(r",\s*", defaults)}  # `targets`: the list written out bare
        else:
            values = re.split(r",\s*(?![^\[]*\])", defaults)  # commas inside [0.9, 0.95] do not split
            stated = dict(zip(names, map(_literal, values))) if len(values) == len(names) else {}
        for name, value in stated.items():
            if value is None or getattr(config, name) is None:
                continue
            checked += 1
            if value != getattr(config, name):
                wrong.append(f"{name}: the table says {value!r}, FinetuneConfig has {getattr(config, name)!r}")
    assert checked >= 25 and not wrong, (checked, wrong)


ALL_DOCS = DOCS | {"BENCHMARKS.md": (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")}


@pytest.mark.parametrize("doc", sorted(ALL_DOCS))
def test_the_files_and_variables_the_docs_name_exist(doc):
    """`scripts/ci-services.sh`, `benchmarks/memory.py`, `models/host_saves.py` are files of the repository;
    `COGVIDEOX_ENHANCER_API_KEY` is read by the code (or the tests)."""
    text = ALL_DOCS[doc]
    top = r"(?:scripts|benchmarks|tests|docs|src/cogvideox)"
    path = rf"(?<![\w/.])({top}/[\w/-]*(?:\.(?:py|sh|md|js|json))?)(?!\.?[\w/-])"
    paths = set(re.findall(path, text))  # not tests/test_fast_fuse.tiny_transformer, a Python name
    modules = re.findall(r"`(?:cogvideox/)?((?:models|fast|parallel|train|serve|demo)/\w+\.py)`", text)
    paths |= {f"src/cogvideox/{module}" for module in modules}
    missing = sorted(path for path in paths if not (ROOT / path).exists())
    assert not missing, f"{doc} names files that are not there: {missing}"
    code = " ".join(path.read_text(encoding="utf-8") for folder in ("src", "tests", "scripts")
                    for path in (ROOT / folder).rglob("*") if path.suffix in (".py", ".sh", ".js"))
    unread = sorted(name for name in set(re.findall(r"COGVIDEOX_[A-Z_]+", text)) if name not in code)
    assert not unread, f"{doc} names environment variables nothing reads: {unread}"


def test_the_architecture_names_the_commands_that_share_flags():
    """docs/architecture.md's "Command line": the modules that add sub-parsers, and the commands that take
    `add_memory_arguments`' and `add_speed_arguments`' flags."""
    text = " ".join(DOCS["docs/architecture.md"].split("### Command line", 1)[1].split())
    adders = {path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")
              if ".add_parser(" in path.read_text(encoding="utf-8")} - {"cli.py"}
    listed = re.search(r"sub-parsers from their own modules \(([^)]*)\)", text).group(1)
    assert set(re.findall(r"`([\w/]+\.py)`", listed)) == adders
    commands = _commands()
    for helper, flag in (("add_memory_arguments", "--offload"), ("add_speed_arguments", "--quantize")):
        listed = re.search(rf"`{helper}`[^(]*\(([^)]*)\)", text).group(1).split(":", 1)[1]
        having = {name for name in commands if _has_flag(commands, name, flag)}
        assert set(re.findall(r"`(\w+)`", listed)) == having, f"{helper}: {sorted(having)} take {flag}"


def test_every_flag_of_every_command_is_named_in_a_doc():
    """A flag no doc names is one a user finds only by chance; `--no-X` counts as named with `--X`, and a
    train flag with its setting in docs/finetune.md's table (`--grad-accum`: `grad_accum`)."""
    text = " ".join(DOCS.values())
    unnamed = []
    for name, parser in _commands().items():
        for option in (o for action in parser._actions for o in action.option_strings):
            stem = option.removeprefix("--no-").removeprefix("--")
            if option.startswith("--") and option != "--help" and not (
                re.search(rf"(?<![\w-])--{re.escape(stem)}\b", text) or f"`{stem.replace('-', '_')}`" in text
            ):
                unnamed.append(f"cogvideox {name} {option}")
    assert not unnamed, f"flags no doc names: {unnamed}"


@pytest.mark.parametrize("doc", sorted(ALL_DOCS))
def test_the_docs_give_no_value_to_a_flag_that_takes_none(doc):
    """`--compile reduce-overhead` reads as a command line, but --compile is a switch: argparse would take
    `reduce-overhead` for the prompt. Checked in code spans and blocks that are a command or start with a flag."""
    actions = [action for parser in _commands().values() for action in parser._actions]
    switches = {o for a in actions if a.nargs == 0 for o in a.option_strings}
    switches -= {o for a in actions if a.nargs != 0 for o in a.option_strings}
    text = ALL_DOCS[doc]
    pieces = re.findall(r"`([^`\n]+)`", text)
    pieces += [line for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S) for line in block.splitlines()]
    given = [
        match.group(0)
        for piece in pieces
        if piece.startswith("--") or "cogvideox " in piece
        for match in re.finditer(r"(?<![\w-])(--[a-z][\w-]*)[ =]([a-z0-9][\w.:/-]*)", piece)
        if match.group(1) in switches
    ]
    assert not given, f"{doc} gives switches a value: {given}"


@pytest.mark.parametrize("doc", sorted(ALL_DOCS))
def test_the_flags_the_docs_give_scripts_are_theirs(doc):
    """`python benchmarks/memory.py --tiny --check`, `python -m cogvideox.demo.teach --concept orange`: each
    flag is one the script defines (read from its source: the benchmarks import what the CPU may lack)."""
    text = ALL_DOCS[doc]
    pieces = re.findall(r"`([^`\n]+)`", text)
    pieces += [line for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S) for line in block.splitlines()]
    wrong = []
    for piece in pieces:
        for match in re.finditer(r"(benchmarks/\w+\.py|-m (cogvideox\.demo\.\w+))((?:(?!benchmarks/|-m ).)*)", piece):
            script = match.group(2) or match.group(1)
            path = ROOT / (f"src/{script.replace('.', '/')}.py" if match.group(2) else script)
            defined = set(re.findall(r"[\"'](--[a-z][\w-]*)[\"']", path.read_text(encoding="utf-8")))
            given = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", match.group(3).split("#")[0]))
            wrong += [f"{script} {flag}" for flag in sorted(given - defined)]
    assert not wrong, f"{doc} gives scripts flags they lack: {wrong}"


def test_the_service_readme_names_every_field_of_a_request():
    """The API table's rows for `POST /v1/videos` and its remix name the request's fields: every field of
    the body's schema (and the files of the form), and no other."""
    pytest.importorskip("fastapi")
    from cogvideox.serve.app import IMAGE, LAST
    from cogvideox.serve.schemas import VideoCreate, VideoRemix

    readme = DOCS["src/cogvideox/serve/README.md"]
    rows = {row.split("`")[1]: row for row in readme.splitlines() if row.startswith("| `")}
    for route, schema, files in (("POST /v1/videos", VideoCreate, {IMAGE, LAST}),
                                 ("POST /v1/videos/{id}/remix", VideoRemix, set())):
        asked = rows[route].split("|")[2].split("The answer carries")[0]  # the request's part of the row
        named = set(re.findall(r"`([a-z_]+)`", asked))
        assert named == set(schema.model_fields) | files, f"{route}: the README's row names {sorted(named)}"


def test_the_readme_python_snippet_runs_on_the_demo_model(tmp_path, monkeypatch):
    code = _python_block(README, "## Python")
    for real, demo in (('"THUDM/CogVideoX-5b"', "None"), ('device="cuda"', 'device="cpu"'),
                       ("seed=42)", "seed=42, num_inference_steps=2, progress=False)")):
        assert real in code, f"the README's Python snippet no longer has {real}"
        code = code.replace(real, demo)
    monkeypatch.chdir(tmp_path)
    exec(code, {})
    from cogvideox.video import read_frames

    assert read_frames(tmp_path / "panda.mp4", None, 100).shape == (17, 64, 96, 3)


def test_every_flag_has_its_help_as_the_readme_promises():
    """"`cogvideox COMMAND --help` explains every flag of each command": no argument without a help text."""
    assert "`cogvideox COMMAND --help` explains every flag of each command" in " ".join(README.split())
    bare = [f"cogvideox {name} {'/'.join(action.option_strings) or action.dest}"
            for name, parser in _commands().items() for action in parser._actions
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS]
    assert not bare, f"arguments --help does not explain: {bare}"


@pytest.mark.parametrize("doc", sorted(ALL_DOCS))
def test_the_extras_the_docs_install_are_in_pyproject(doc):
    """`pip install -e ".[train]"`, `pip install 'cogvideox[fast]'`: pyproject.toml defines each extra."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    groups = re.findall(r"(?:cogvideox|\.)\[([a-z,-]+)\]", ALL_DOCS[doc])
    named = {extra for group in groups for extra in group.split(",")}
    assert named <= set(extras), f"{doc} installs extras pyproject.toml lacks: {sorted(named - set(extras))}"
