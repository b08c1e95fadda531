"""Fine-tuning settings: TOML and YAML files, flags over files, and mistakes named in one message."""

import pytest

from cogvideox import InputError
from cogvideox.train.config import FinetuneConfig, make_config, read_config_file


def test_toml_and_yaml_give_the_same_config(tmp_path):
    (tmp_path / "run.toml").write_text(
        'data = "clips"\noutput = "runs/a"\nrank = 32\n'
        'buckets = ["49x480x720", "49x720x480"]\nvalidation-prompts = ["a cat"]\nvalidation_every = 100\n'
    )
    (tmp_path / "run.yaml").write_text(
        "data: clips\noutput: runs/a\nrank: 32\nbuckets: [49x480x720, 49x720x480]\n"
        "validation-prompts:\n  - a cat\nvalidation_every: 100\n"
    )
    a, b = make_config(tmp_path / "run.toml"), make_config(tmp_path / "run.yaml")
    assert a == b
    assert a.rank == 32 and a.buckets == ["49x480x720", "49x720x480"] and a.validation_prompts == ["a cat"]
    assert a.alpha is None and a.learning_rate == 1e-4 and not a.full


@pytest.mark.parametrize("toml_key, name", [("offload-activations", "offload_activations"), ("compile", "compile")])
def test_switches_from_a_file_or_a_flag(tmp_path, toml_key, name):
    (tmp_path / "run.toml").write_text(f'data = "d"\noutput = "o"\n{toml_key} = true\n')
    (tmp_path / "run.yaml").write_text(f"data: d\noutput: o\n{name}: true\n")
    assert make_config(tmp_path / "run.toml") == make_config(tmp_path / "run.yaml")
    assert getattr(make_config(tmp_path / "run.toml"), name)
    assert not getattr(make_config(tmp_path / "run.toml", **{name: False}), name)
    assert not getattr(FinetuneConfig(data="d", output="o"), name)  # off unless asked for


def test_offloaded_activations_need_gradient_checkpointing(tmp_path):
    (tmp_path / "run.yaml").write_text("data: d\noutput: o\noffload_activations: true\n")
    with pytest.raises(InputError, match="turn gradient_checkpointing on or offload_activations off"):
        make_config(tmp_path / "run.yaml", gradient_checkpointing=False)


def test_flags_override_the_file(tmp_path):
    (tmp_path / "run.toml").write_text('data = "clips"\noutput = "out"\nrank = 32\nfull = false\n')
    c = make_config(tmp_path / "run.toml", rank=8, output="elsewhere", steps=None)
    assert (c.rank, c.output, c.full, c.steps) == (8, "elsewhere", False, 1000)
    (tmp_path / "run.toml").write_text('data = "clips"\noutput = "out"\nfull = false\n')
    c = make_config(tmp_path / "run.toml", full=True)
    assert c.full and c.learning_rate == 1e-5  # the full fine-tuning default


@pytest.mark.parametrize(
    "text, flags, named",
    [
        ('full = true\n', dict(rank=8), "rank"),
        ('full = true\n', dict(alpha=16.0), "alpha"),
        ('rank = 32\n', dict(full=True), "rank"),
        ('full = true\nalpha = 8.0\ntargets = ["to_q"]\n', {}, "alpha, targets"),
    ],
)
def test_lora_settings_for_a_full_run_are_refused_by_name(tmp_path, text, flags, named):
    # Full fine-tuning has no LoRA: a rank or alpha given to it would be ignored without a word.
    (tmp_path / "run.toml").write_text('data = "d"\noutput = "o"\n' + text)
    with pytest.raises(InputError) as info:
        make_config(tmp_path / "run.toml", **flags)
    assert str(info.value).startswith(f"{named}: LoRA setting(s), but full is on"), info.value
    assert make_config(tmp_path / "run.toml", **flags | {"full": False}).rank  # without full, the same is a LoRA run


@pytest.mark.parametrize(
    "text, message",
    [
        ('data = "d"\noutput = "o"\nranks = 4\n', "unknown setting(s) ranks"),
        ('data = "d"\noutput = "o"\nrank = 0\n', "rank must be a positive integer, got 0"),
        ('data = "d"\noutput = "o"\noptimizer = "sgd"\n', "optimizer must be one of adamw, adamw-8bit, adamw-cpu"),
        ('data = "d"\noutput = "o"\ncaption_dropout = 1.5\n', "caption_dropout must be in [0, 1)"),
        ('data = "d"\noutput = "o"\nmask_weight = 0\n', "mask_weight must be a positive number, got 0"),
        ('data = "d"\noutput = "o"\nmask-weight = "10"\n', "mask_weight must be a positive number, got '10'"),
        ('data = "d"\noutput = "o"\nvalidation_every = 10\n', "no validation_prompts"),
        ('data = "d"\noutput = "o"\nbuckets = "49x480x720"\n', "buckets must be a list"),
        ('data = "d"\noutput = "o"\nbuckets = [49]\n', "buckets must be a list such as [\"49x480x720\"], got [49]"),
        # A string where a list belongs would be read as one prompt (or layer name) per character.
        ('data = "d"\noutput = "o"\nvalidation_prompts = "a single string"\nvalidation_every = 1\n',
         "validation_prompts must be a list of prompts such as [\"a cat on a mat\"], got 'a single string'"),
        ('data = "d"\noutput = "o"\ntargets = "to_q"\n', "targets must be a list of layer names"),
        ('data = "d"\noutput = "o"\nbetas = 0.9\n', "betas must be a list of two numbers in [0, 1)"),
        ('data = "d"\noutput = "o"\nbetas = ["a", "b"]\n', "betas must be a list of two numbers in [0, 1)"),
        ('data = "d"\noutput = "o"\nvalidation_guidance = -1.0\n',
         "validation_guidance must be a finite number >= 0, got -1.0"),
        ('data = "d"\noutput = "o"\nvalidation_guidance = nan\n', "validation_guidance must be a finite number >= 0, got nan"),
        ('data = "d"\noutput = "o"\nvalidation_guidance = "6"\n', "validation_guidance must be a finite number >= 0, got '6'"),
        ('data = "d"\noutput = "o"\nweight_decay = "x"\n', "weight_decay must be a finite number >= 0, got 'x'"),
        ('data = "d"\noutput = "o"\neps = 0.0\n', "eps must be a finite number > 0, got 0.0"),
        ('data = "d"\noutput = "o"\noffload-activations = true\ngradient_checkpointing = false\n',
         "offload_activations needs gradient_checkpointing"),
        # A string is true whatever it says: "no" would turn the setting on.
        ('data = "d"\noutput = "o"\ngradient_checkpointing = "no"\n',
         "gradient_checkpointing must be true or false, got 'no'"),
        ('data = "d"\noutput = "o"\nfull = "yes"\n', "full must be true or false, got 'yes'"),
        ('data = "d"\noutput = "o"\ncompile = 1\n', "compile must be true or false, got 1"),
        # An infinite learning rate would train the weights into NaN without a word.
        ('data = "d"\noutput = "o"\nlr = inf\n', "lr must be a positive number, got inf"),
        ('data = "d"\noutput = "o"\nmask_weight = inf\n', "mask_weight must be a positive number, got inf"),
        ('data = "d"\noutput = "o"\nfps = 1e308\n', "fps must be a frame rate from 1/1001 to 1000, got 1e+308"),
        ('data = "d"\noutput = "o"\nseed = 18446744073709551616\n', "seed must be an integer in [0, 2**64), got 1844"),
        # torch cannot even be asked for such sizes: a traceback deep in a run, after the data is encoded
        ('data = "d"\noutput = "o"\nrank = 100000\n', "rank must be at most 16384, got 100000"),
        ('data = "d"\noutput = "o"\nbatch_size = 18446744073709551616\n',
         "batch_size must be at most 4096, got 18446744073709551616"),
        ('data = "d"\noutput = "o"\nmin_lr_ratio = true\n', "min_lr_ratio must be in [0, 1], got True"),
        ('data = "d"\noutput = "o"\nmax_sequence_length = -3\n',
         "max_sequence_length must be a positive integer, got -3"),
        ('data = "d"\noutput = "o"\nvalidation_seed = "x"\n',
         "validation_seed must be a non-negative integer, got 'x'"),
        ('data = "d"\noutput = "o"\nmodel = 5\n',
         "model must be a text such as \"THUDM/CogVideoX-5b\" (or unset), got 5"),
        ('data = "d"\noutput = "o"\ndtype = 16\n', "dtype must be a text such as \"bf16\" (or unset), got 16"),
        ('data = "d"\noutput = "o"\ncache_dir = ""\n', "cache_dir must be a text such as"),
        ('output = "o"\n', "missing setting(s): data"),
        ("data = [\n", "is not valid TOML"),
    ],
)
def test_mistakes_are_named(tmp_path, text, message):
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(InputError) as info:
        make_config(tmp_path / "bad.toml")
    assert message in str(info.value)


def test_a_yaml_string_where_a_list_belongs_is_refused(tmp_path):
    (tmp_path / "run.yaml").write_text("data: d\noutput: o\nvalidation_prompts: a single string\n")
    with pytest.raises(InputError, match="validation_prompts must be a list of prompts"):
        make_config(tmp_path / "run.yaml")


def test_yaml_reads_exponents_as_numbers_and_one_setting_spelled_twice_is_refused(tmp_path):
    (tmp_path / "run.yaml").write_text("data: d\noutput: o\nlr: 1e-4\nweight_decay: 1E-2\n")
    config = make_config(tmp_path / "run.yaml")
    assert (config.lr, config.weight_decay) == (1e-4, 1e-2)
    (tmp_path / "twice.toml").write_text('data = "d"\noutput = "o"\ngrad-accum = 2\ngrad_accum = 3\n')
    with pytest.raises(InputError, match="grad-accum and grad_accum are the same setting"):
        make_config(tmp_path / "twice.toml")


def test_file_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_config_file(tmp_path / "missing.toml")
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(InputError, match="must end in .toml, .yaml or .yml"):
        read_config_file(tmp_path / "run.json")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(InputError, match="table of settings"):
        read_config_file(tmp_path / "list.yaml")


def test_direct_construction_checks_values():
    with pytest.raises(InputError, match="lr must be a positive number"):
        FinetuneConfig(data="d", output="o", lr=-1.0)
    with pytest.raises(InputError, match="schedule must be one of constant, cosine"):
        FinetuneConfig(data="d", output="o", schedule="linear")
    with pytest.raises(InputError, match="mask_weight must be a positive number, got -2.0"):
        FinetuneConfig(data="d", output="o", mask_weight=-2.0)
    assert FinetuneConfig(data="d", output="o").mask_weight == 1.0  # masks ignored unless asked for
    with pytest.raises(InputError, match="validation_guidance must be a finite number >= 0, got -0.5"):
        FinetuneConfig(data="d", output="o", validation_guidance=-0.5)
    with pytest.raises(InputError, match="validation_guidance must be a finite number >= 0, got inf"):
        FinetuneConfig(data="d", output="o", validation_guidance=float("inf"))
    # No guidance given: the model's recommendation (filled in by the run); 0 and 1 (guidance off) are fine.
    assert FinetuneConfig(data="d", output="o").validation_guidance is None
    assert FinetuneConfig(data="d", output="o", validation_guidance=0).validation_guidance == 0


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
@pytest.mark.parametrize(
    "text, why",
    [(b'output = "\xff"\n', r"is not UTF-8 text \(byte (9|10)\)"),
     (b"rank = " + b"[" * 100_000 + b"]" * 100_000 + b"\n", "is not valid (TOML|YAML): nested too deep"),
     (b"rank = " + b"1" * 5000 + b"\n", "is not valid (TOML|YAML): Exceeds the limit")],
    ids=["latin-1", "nested", "huge integer"],
)
def test_a_config_file_its_parser_cannot_read_is_an_input_error_naming_it(tmp_path, suffix, text, why):
    """A UnicodeDecodeError, RecursionError or ValueError traceback before."""
    path = tmp_path / f"run{suffix}"
    path.write_bytes(text.replace(b" = ", b": ") if suffix == ".yaml" else text)
    with pytest.raises(InputError, match=f"{path} {why}"):
        read_config_file(path)
