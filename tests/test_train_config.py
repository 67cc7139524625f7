"""Training options that would be silently dropped or ignored are refused with a message that says what to do."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from pipelines.train.config import ConfigError, TrainConfig, load_train_config
from workbench.cli import app

runner = CliRunner()


def toml(tmp_path, text: str):
    path = tmp_path / "train.toml"
    path.write_text(text)
    return path


def flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long messages


# --- the TOML file ----------------------------------------------------------------------


def test_top_level_options_beside_a_train_table_are_refused_not_dropped(tmp_path):
    """A top-level `resolution = 64` before [train] trained at 512 without a word."""
    mixed = toml(tmp_path, "resolution = 64\nresolutoin = 32\n[train]\nmax_train_steps = 2\n")
    with pytest.raises(ConfigError, match=r"both at top level and in its \[train\] table: move resolution, resolutoin into \[train\]"):
        load_train_config(mixed)
    # all at top level, or all in [train], is read as before
    for text in ("resolution = 64\nmax_train_steps = 2\n", "[train]\nresolution = 64\nmax_train_steps = 2\n"):
        config = load_train_config(toml(tmp_path, text))
        assert (config.resolution, config.max_train_steps) == (64, 2)


@pytest.mark.parametrize("text, table", [
    ("[train]\nmax_train_steps = 2\n[data]\nresolution = 64\n", r"\[data\]"),  # dropped beside [train]
    ("[lora]\nrank = 8\n", r"\[lora\]"),
    ("data = {resolution = 64}\n", r"\[data\]"),
])
def test_unknown_tables_are_refused(tmp_path, text, table):
    with pytest.raises(ConfigError, match=rf"Unknown table {table} in .*top level or in one \[train\] table"):
        load_train_config(toml(tmp_path, text))


def test_a_project_file_with_filter_rules_and_the_flag_names_are_read(tmp_path):
    """A review: one workbench.toml could not hold [filter] and [train] (`Unknown table [filter]`), and the keys of
    `--prior-preservation` and `--concept` were refused in a file ("did you mean with_prior_preservation?")."""
    for text in ("[filter]\nmin_side = 384\n[train]\nresolution = 64\nprior-preservation = true\nconcept = \"sks dog\"\n",
                 "resolution = 64\nprior_preservation = true\nconcept = \"sks dog\"\n[filter]\nmin_side = 384\n"):
        config = load_train_config(toml(tmp_path, text))
        assert (config.resolution, config.with_prior_preservation, config.concepts) == (64, True, ["sks dog"])
    with pytest.raises(ConfigError, match=r"'prior_preservation' and 'with_prior_preservation' in .* are the same option"):
        load_train_config(toml(tmp_path, "prior_preservation = true\nwith_prior_preservation = false\n"))


def test_train_that_is_not_a_table_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"'train' in .* must be a \[train\] table"):
        load_train_config(toml(tmp_path, "train = 5\n"))


def test_the_same_option_written_twice_is_refused(tmp_path):
    """learning-rate and learning_rate are one option: one of them was dropped."""
    with pytest.raises(ConfigError, match="'learning-rate' and 'learning_rate' in .* are the same option: keep one"):
        load_train_config(toml(tmp_path, "[train]\nlearning-rate = 1e-3\nlearning_rate = 1e-4\n"))


def test_a_toml_mode_other_than_the_commands_is_refused(tmp_path):
    """The command always passes its mode; a file's other mode was overridden without a word."""
    finetune = toml(tmp_path, "mode = 'finetune'\n")
    with pytest.raises(ConfigError, match=r"sets mode = 'finetune', but this is `workbench train lora`: remove mode .* "
                                          r"or run `workbench train finetune`"):
        load_train_config(finetune, {"mode": "lora"})
    assert load_train_config(finetune, {"mode": "finetune"}).mode == "finetune"
    assert load_train_config(finetune).mode == "finetune"  # no command mode: the file's


# --- options this run would ignore ------------------------------------------------------


@pytest.mark.parametrize("mode", ["dreambooth", "finetune"])
@pytest.mark.parametrize("option, value, named", [
    ("rank", 8, "--rank"), ("lora_alpha", 8.0, "--lora-alpha"), ("lora_target_modules", ["to_q"], "lora_target_modules"),
    ("text_encoder_target_modules", ["q_proj"], "text_encoder_target_modules"),
])
def test_lora_options_are_refused_where_the_full_unet_trains(mode, option, value, named):
    options = {"mode": mode, option: value}
    if option == "text_encoder_target_modules":
        options["train_text_encoder"] = True  # trains the whole text encoder: still no LoRA targets
    with pytest.raises(ConfigError, match=f"{mode} trains the full UNet, not a LoRA: remove {named}, or use `workbench train lora`"):
        load_train_config(None, options)


def test_defaults_never_trip_the_checks_so_a_shared_toml_works_in_every_mode(tmp_path):
    """The TUI sends its rank in every mode; a TOML shared between modes may spell out defaults."""
    shared = toml(tmp_path, "[train]\nrank = 4\nema_decay = 0.9999\nprior_loss_weight = 1.0\nuse_ema = false\n")
    for mode in ("lora", "dreambooth", "finetune"):
        assert load_train_config(shared, {"mode": mode}).mode == mode
        assert TrainConfig(mode=mode).validate().mode == mode
    with pytest.raises(ConfigError, match="remove --rank"):
        load_train_config(shared, {"mode": "dreambooth", "rank": 8})


def test_dreambooth_lora_and_text_encoder_training_keep_their_options():
    """lora with priors is DreamBooth-LoRA; the full modes train the whole text encoder with its own rate."""
    dbl = load_train_config(None, {"mode": "lora", "with_prior_preservation": True, "rank": 8, "lora_alpha": 16.0,
                                   "prior_loss_weight": 0.5, "train_text_encoder": True, "text_encoder_lr": 5e-5,
                                   "text_encoder_target_modules": ["q_proj", "v_proj"]})
    assert (dbl.rank, dbl.prior_loss_weight, dbl.text_encoder_lr) == (8, 0.5, 5e-5)
    full = load_train_config(None, {"mode": "dreambooth", "train_text_encoder": True, "text_encoder_lr": 5e-6,
                                    "use_ema": True, "ema_decay": 0.999})
    assert (full.text_encoder_lr, full.ema_decay) == (5e-6, 0.999)
    # without --train-text-encoder the text encoder is frozen: its rate and targets would be ignored
    for mode, option, value in (("lora", "text_encoder_lr", 5e-5), ("finetune", "text_encoder_lr", 5e-5),
                                ("lora", "text_encoder_target_modules", ["q_proj"])):
        with pytest.raises(ConfigError, match=f"only trains with --train-text-encoder: add it, or remove {option}"):
            load_train_config(None, {"mode": mode, option: value})


def test_ema_options_are_refused_in_lora_and_ema_decay_needs_use_ema():
    with pytest.raises(ConfigError, match="EMA is for dreambooth and finetune, not lora: remove ema_decay"):
        load_train_config(None, {"mode": "lora", "ema_decay": 0.99})
    with pytest.raises(ConfigError, match="not lora: remove --use-ema and ema_decay"):
        load_train_config(None, {"mode": "lora", "use_ema": True, "ema_decay": 0.99})
    with pytest.raises(ConfigError, match="ema_decay is only used with --use-ema: add --use-ema, or remove ema_decay"):
        load_train_config(None, {"mode": "finetune", "ema_decay": 0.99})


@pytest.mark.parametrize("mode, options, named", [
    ("lora", {"prior_loss_weight": 0.5}, "--prior-loss-weight"),
    ("finetune", {"sample_batch_size": 2, "max_class_images": 10}, "max_class_images and sample_batch_size"),
    ("dreambooth", {"with_prior_preservation": False, "prior_inference_steps": 5}, "prior_inference_steps"),
])
def test_class_prior_options_are_refused_without_class_priors(mode, options, named):
    with pytest.raises(ConfigError, match=f"This {mode} run has no class priors: remove {named}, or"):
        load_train_config(None, {"mode": mode, **options})


@pytest.mark.parametrize("options, message", [
    ({"ema_decay": 2}, "ema_decay must be between 0 and 1"),
    ({"ema_decay": 1}, "ema_decay must be between 0 and 1"),
    ({"ema_decay": 0}, "ema_decay must be between 0 and 1"),
    ({"text_encoder_lr": 0, "train_text_encoder": True}, "text_encoder_lr must be positive"),
    ({"lr_warmup_steps": -1, "lr_scheduler": "linear"}, "--lr-warmup-steps must be 0 or more"),
    ({"lr_num_cycles": 0, "lr_scheduler": "cosine_with_restarts"}, "lr_num_cycles must be at least 1"),
    ({"lr_power": -1.0, "lr_scheduler": "polynomial"}, "lr_power must be positive"),
    ({"adam_beta1": 1.0}, "adam_beta1 and adam_beta2 must be at least 0 and below 1"),
    ({"adam_beta2": -0.1}, "adam_beta1 and adam_beta2 must be at least 0 and below 1"),
    ({"adam_weight_decay": -0.01}, "adam_weight_decay must be 0 or more"),
    ({"adam_epsilon": 0}, "adam_epsilon must be positive"),
    ({"max_grad_norm": -1.0}, "max_grad_norm must be 0 or more"),
    ({"dataloader_num_workers": -1}, "dataloader_num_workers must be 0 or more"),
    ({"sample_batch_size": 0}, "sample_batch_size must be at least 1"),
    ({"validation_inference_steps": 0}, "validation_inference_steps must be at least 1"),
    # accelerate's set_seed raised after the model loaded; A1111 users type -1 for "random"
    ({"seed": -1}, r"--seed must be between 0 and 4294967295 \(got -1\)"),
    ({"seed": 2**32}, "--seed must be between 0 and 4294967295"),
    ({"prior_loss_weight": 0}, "--prior-loss-weight 0 is not above 0, so it trains without the class images it makes: use --no-prior-preservation"),
    ({"prior_loss_weight": -1}, "--prior-loss-weight -1 is not above 0"),  # it said "--prior-loss-weight 0"
])
def test_out_of_range_options_are_refused_before_training(options, message):
    """Each would otherwise fail in torch after the model loads, or train silently wrong."""
    mode = "finetune" if "ema_decay" in options else "dreambooth"
    with pytest.raises(ConfigError, match=message):
        load_train_config(None, {"mode": mode, **({"use_ema": True} if "ema_decay" in options else {}), **options})


@pytest.mark.parametrize("options, message", [
    # kohya refuses warm-up on `constant`; diffusers' get_scheduler drops it: a run that asked for warm-up got none
    ({"lr_warmup_steps": 3}, "--lr-scheduler constant does not use --lr-warmup-steps, which applies to constant_with_warmup, "
                             "linear, cosine, cosine_with_restarts or polynomial"),
    ({"lr_scheduler": "cosine", "lr_num_cycles": 3}, "--lr-scheduler cosine does not use lr_num_cycles, which applies to "
                                                     "cosine_with_restarts"),
    ({"lr_scheduler": "linear", "lr_power": 2.0}, "--lr-scheduler linear does not use lr_power, which applies to polynomial"),
    ({"lr_scheduler": "linear", "lr_warmup_steps": 10, "max_train_steps": 4},
     "--lr-warmup-steps 10 is not below --max-train-steps 4: the learning rate would never reach --learning-rate"),
])
def test_schedule_settings_the_schedule_ignores_are_refused(options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_train_config(None, {"mode": "lora", **options})
    assert load_train_config(None, {"mode": "lora", "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 3}).lr_warmup_steps == 3


# --- what a user sees -------------------------------------------------------------------


def test_cli_refuses_a_mixed_toml_and_another_mode_with_exit_2(tmp_path):
    catalog = ["--catalog", str(tmp_path / "none.duckdb")]  # options are checked before the catalog is opened
    mixed = toml(tmp_path, "resolution = 64\n[train]\nmax_train_steps = 2\n")
    result = runner.invoke(app, ["train", "lora", "--config", str(mixed), *catalog])
    assert result.exit_code == 2 and "move resolution into [train]" in flat(result.output)
    (tmp_path / "ft.toml").write_text("mode = 'finetune'\n")
    result = runner.invoke(app, ["train", "lora", "--config", str(tmp_path / "ft.toml"), *catalog])
    assert result.exit_code == 2
    assert "sets mode = 'finetune', but this is `workbench train lora`" in flat(result.output)


def test_cli_refuses_options_the_mode_ignores_with_exit_2(tmp_path):
    catalog = ["--catalog", str(tmp_path / "none.duckdb")]
    rank = runner.invoke(app, ["train", "dreambooth", "--rank", "8", "--lora-alpha", "8", *catalog])
    assert rank.exit_code == 2
    assert "dreambooth trains the full UNet, not a LoRA: remove --rank and --lora-alpha" in flat(rank.output)
    ema = runner.invoke(app, ["train", "lora", "--set", "ema_decay=0.99", *catalog])
    assert ema.exit_code == 2 and "not lora: remove ema_decay" in flat(ema.output)
    decay = runner.invoke(app, ["train", "finetune", "--use-ema", "--set", "ema_decay=2", *catalog])
    assert decay.exit_code == 2 and "ema_decay must be between 0 and 1" in flat(decay.output)
    # the defaults of every mode pass the checks: the run gets as far as the (missing) catalog
    plain = runner.invoke(app, ["train", "dreambooth", *catalog])
    assert plain.exit_code == 2 and "No catalog at" in flat(plain.output)


# --- list options, resolution and kohya names ------------------------------------------


@pytest.mark.parametrize("value", ["to_q,to_k", " to_q , to_k ", "to_q,to_k,", "[to_q, to_k]", ["to_q", "to_k"]])
def test_target_modules_given_as_text_are_split_on_commas(value):
    """--set lora_target_modules=to_q,to_k trained a LoRA on no layer named 'to_q,to_k'; a list still works."""
    config = load_train_config(None, {"lora_target_modules": value})
    assert config.lora_target_modules == ["to_q", "to_k"]
    text = load_train_config(None, {"train_text_encoder": True, "text_encoder_target_modules": value})
    assert text.text_encoder_target_modules == ["to_q", "to_k"]


def test_target_modules_from_toml_text_are_split(tmp_path):
    config = load_train_config(toml(tmp_path, "lora_target_modules = 'to_q, to_v'\n"))
    assert config.lora_target_modules == ["to_q", "to_v"]


def test_prompts_and_concepts_keep_their_commas():
    """A prompt is a sentence and a concept name may hold a comma: text is one item, a list gives several."""
    config = load_train_config(None, {"validation_prompt": "a dog, sitting", "concepts": "sks dog, large"})
    assert config.validation_prompt == ["a dog, sitting"] and config.concepts == ["sks dog, large"]
    several = load_train_config(None, {"validation_prompt": ["a dog, sitting", "a cat"]})
    assert several.validation_prompt == ["a dog, sitting", "a cat"]
    with pytest.raises(ConfigError, match=r"validation_prompt must be list \(one as text, several as a list"):
        load_train_config(None, {"validation_prompt": 3})
    with pytest.raises(ConfigError, match=r"lora_target_modules must be list \(names separated by commas"):
        load_train_config(None, {"lora_target_modules": 5})


@pytest.mark.parametrize("option, extra", [("lora_target_modules", {}),
                                           ("text_encoder_target_modules", {"train_text_encoder": True})])
def test_empty_target_modules_are_refused(option, extra):
    """`--set lora_target_modules=` would leave the LoRA no layer to train."""
    with pytest.raises(ConfigError, match=f"{option} is empty: name the layers to train"):
        load_train_config(None, {option: "", **extra})


@pytest.mark.parametrize("text", ["64,64", "64", " 64 , 64 "])
def test_a_kohya_resolution_of_one_size_is_read(tmp_path, text):
    assert load_train_config(toml(tmp_path, f"resolution = '{text}'\n")).resolution == 64


def test_a_kohya_resolution_of_width_and_height_names_the_size_to_use(tmp_path):
    with pytest.raises(ConfigError, match=r'resolution = "512,768" in .* trains at one size: .*bucket area.* '
                                          r"Use resolution = 624, the nearest square area \(624² = 389,376 px against 393,216\)"):
        load_train_config(toml(tmp_path, "resolution = '512,768'\n"))
    with pytest.raises(ConfigError, match=r"resolution must be int, got 'big'"):
        load_train_config(toml(tmp_path, "resolution = 'big'\n"))


KOHYA_TOML = """\
pretrained_model_name_or_path = "runwayml/stable-diffusion-v1-5"
network_dim = 8
network_alpha = 4
shuffle_caption = true
caption_dropout_rate = 0.1
save_every_n_steps = 100
output_name = "my_lora"
optimizer_type = "Lion"
resolution = "64,64"
train_batch_size = 2
max_train_steps = 10
learning_rate = 1e-4
keep_tokens = 1
lerning_rate = 1e-3
"""


def test_a_kohya_toml_is_refused_once_with_every_unknown_key_and_its_workbench_name(tmp_path):
    """A kohya train.toml took 10 runs: one unknown key each."""
    with pytest.raises(ConfigError) as error:
        load_train_config(toml(tmp_path, KOHYA_TOML))
    message = str(error.value)
    assert message.startswith("Unknown training options in ")
    for key, hint in [("pretrained_model_name_or_path", "workbench: model"), ("network_dim", "workbench: rank"),
                      ("network_alpha", "workbench: lora_alpha"), ("shuffle_caption", "workbench: shuffle_tags"),
                      ("caption_dropout_rate", "workbench: caption_dropout"),
                      ("save_every_n_steps", "workbench: checkpointing_steps"),
                      ("output_name", "no workbench counterpart"),
                      ("optimizer_type", "no workbench counterpart for 'Lion'"),
                      ("lerning_rate", "did you mean learning_rate")]:
        assert f"'{key}' ({hint}" in message
    for known in ("resolution", "train_batch_size", "max_train_steps", "'learning_rate'", "keep_tokens"):
        assert known not in message
    # kohya trains a text-encoder LoRA by default: a converted file would drop it without a word (a review)
    assert "kohya's train_network.py trains the text encoder's LoRA as well" in message
    renamed = KOHYA_TOML.replace("pretrained_model_name_or_path = \"runwayml/stable-diffusion-v1-5\"", "model = 'tiny'")
    for kohya, ours in [("network_dim", "rank"), ("network_alpha", "lora_alpha"), ("shuffle_caption", "shuffle_tags"),
                        ("caption_dropout_rate", "caption_dropout"), ("save_every_n_steps", "checkpointing_steps"),
                        ("lerning_rate", "text_encoder_lr"), ("optimizer_type", "report_to")]:
        renamed = renamed.replace(kohya, ours)
    renamed = renamed.replace('output_name = "my_lora"\n', "").replace('"Lion"', '"none"')
    config = load_train_config(toml(tmp_path, renamed + "train_text_encoder = true\n"))
    assert (config.rank, config.lora_alpha, config.shuffle_tags, config.resolution, config.keep_tokens) == (8, 4, True, 64, 1)


@pytest.mark.parametrize("key, value, hint", [
    ("optimizer_type", "'AdamW'", "not needed: workbench trains with AdamW"),
    ("optimizer_type", "'AdamW8bit'", "workbench: use_8bit_adam = true"),
    ("v_parameterization", "true", 'workbench: prediction_type = "v_prediction"'),
    ("network_train_unet_only", "false", "workbench: train_text_encoder = true"),
    ("min_snr_gamma", "5.0", "workbench: snr_gamma"),
    ("flip_aug", "true", "workbench: random_flip"),
    ("network_module", "'networks.lora'", "no workbench counterpart"),
])
def test_a_kohya_key_alone_names_what_to_write_instead(tmp_path, key, value, hint):
    with pytest.raises(ConfigError, match=rf"Unknown training option '{key}' in .* \({re.escape(hint)}"):
        load_train_config(toml(tmp_path, f"{key} = {value}\n"))


def test_the_kohya_table_names_only_real_workbench_options():
    from pipelines.train.config import FIELD_NAMES, KOHYA_NONE, KOHYA_OPTIONS

    assert set(KOHYA_OPTIONS.values()) <= FIELD_NAMES
    assert not (set(KOHYA_OPTIONS) | set(KOHYA_NONE)) & FIELD_NAMES  # a workbench name is never refused
    assert not set(KOHYA_OPTIONS) & set(KOHYA_NONE)


# --- caption options that need another -------------------------------------------------


def test_keep_tokens_without_tag_shuffle_is_refused(tmp_path):
    """keep_tokens only keeps tags in front of shuffled ones: without --shuffle-tags it trained as if unset."""
    with pytest.raises(ConfigError, match="--keep-tokens only applies when tags are shuffled .* add --shuffle-tags, "
                                          "or remove --keep-tokens"):
        load_train_config(None, {"keep_tokens": 1})
    assert load_train_config(None, {"keep_tokens": 2, "shuffle_tags": True}).keep_tokens == 2
    # the default never trips it (the TUI and a shared TOML spell out every value)
    assert load_train_config(toml(tmp_path, "keep_tokens = 0\nshuffle_tags = false\n")).keep_tokens == 0


def test_cli_splits_set_lists_and_refuses_keep_tokens_alone(tmp_path, monkeypatch):
    import pipelines.train as train

    seen = {}

    def captured(path, overrides):
        seen["config"] = load_train_config(path, overrides)
        raise ConfigError("stop here")  # what a run does with the options is not this test's

    monkeypatch.setattr(train, "load_train_config", captured)
    catalog = ["--catalog", str(tmp_path / "none.duckdb")]
    result = runner.invoke(app, ["train", "lora", "--set", "lora_target_modules=to_q, to_k", "--set",
                                 "validation_prompt=a dog, sitting", *catalog])
    assert result.exit_code == 2 and "stop here" in result.output
    assert seen["config"].lora_target_modules == ["to_q", "to_k"]
    assert seen["config"].validation_prompt == ["a dog, sitting"]
    monkeypatch.undo()
    keep = runner.invoke(app, ["train", "lora", "--keep-tokens", "1", *catalog])
    assert keep.exit_code == 2 and "add --shuffle-tags, or remove --keep-tokens" in flat(keep.output)
    kohya = runner.invoke(app, ["train", "lora", "--set", "network_dim=8", "--set", "save_every_n_steps=5", *catalog])
    assert kohya.exit_code == 2
    assert all(s in flat(kohya.output) for s in ("'network_dim' (workbench: rank, with lora_alpha = 1 for kohya's default scale",
                                                 "'save_every_n_steps' (workbench: checkpointing_steps)"))


def test_resuming_a_run_of_another_mode_names_the_command_that_continues_it(tmp_path):
    """It said "Leave them out": the mode is the command, which cannot be left out."""
    import json

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "dataset.json").write_text(json.dumps({"config": {"mode": "finetune", "resolution": 64}}))
    with pytest.raises(ConfigError, match=r"It is a finetune run: continue it with `workbench train finetune --resume …`, or start"):
        load_train_config(None, {"mode": "lora", "resume": "latest", "output_dir": str(tmp_path / "run")})
    with pytest.raises(ConfigError, match=r"continue it with `workbench train finetune --resume …`; leave the other options out"):
        load_train_config(None, {"mode": "lora", "resolution": 32, "resume": "latest", "output_dir": str(tmp_path / "run")})
    with pytest.raises(ConfigError, match=r"resolution 64 \(saved\) vs 32.*Leave them out, or start"):
        load_train_config(None, {"mode": "finetune", "resolution": 32, "resume": "latest", "output_dir": str(tmp_path / "run")})


def test_resume_takes_the_alpha_a_run_trained_with_when_given_again(tmp_path):
    """`--resume latest --set lora_alpha=4` of a rank-4 run whose alpha was left out was refused: "lora_alpha None
    (saved) vs 4", though its alpha was 4."""
    import json

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "dataset.json").write_text(json.dumps({"config": {"mode": "lora", "rank": 4, "lora_alpha": None}}))
    given = {"mode": "lora", "resume": "latest", "output_dir": str(tmp_path / "run")}
    assert load_train_config(None, {**given, "lora_alpha": 4}).effective_lora_alpha == 4
    with pytest.raises(ConfigError, match=r"lora_alpha 4 \(saved\) vs 8"):
        load_train_config(None, {**given, "lora_alpha": 8})


def test_a_run_length_on_the_command_line_wins_over_the_other_one_in_the_file(tmp_path):
    """A TOML with num_train_epochs = 3 and `--max-train-steps 50` were refused as two lengths, where the command
    line had won; two given in one place are still refused."""
    toml = tmp_path / "train.toml"
    toml.write_text("num_train_epochs = 3\n")
    config = load_train_config(toml, {"mode": "lora", "max_train_steps": 50})
    assert (config.max_train_steps, config.num_train_epochs) == (50, 1)
    with pytest.raises(ConfigError, match="a run has one length"):
        load_train_config(None, {"mode": "lora", "max_train_steps": 50, "num_train_epochs": 2})


def test_a_config_nested_too_deeply_is_refused_by_name(tmp_path):
    """A security review: a deeply nested TOML gave a RecursionError traceback."""
    deep = toml(tmp_path, "x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match="nests its tables or arrays too deeply"):
        load_train_config(deep)


def test_a_runs_config_toml_holds_only_the_options_the_run_uses_and_reads_back(tmp_path):
    """A review: a dreambooth run's config.toml listed rank and the LoRA target modules (and ema_decay without EMA),
    so editing one of them in the file was refused as an option dreambooth ignores."""
    from pipelines.train.config import run_config_text

    config = load_train_config(None, {"mode": "dreambooth", "class_prompt": "a photo of a dog", "resolution": 64})
    text = run_config_text(config, max_train_steps=7, buckets={"min_bucket_reso": 32, "max_bucket_reso": 128,
                                                              "bucket_reso_steps": 8, "no_upscale": False})
    for absent in ("rank", "lora_target_modules", "ema_decay", "keep_tokens", "text_encoder_lr"):
        assert not re.search(rf"^{absent} =", text, re.M), (absent, text)
    again = load_train_config(toml(tmp_path, text), {"mode": "dreambooth", "rank": None})
    assert (again.max_train_steps, again.class_prompt, again.bucket_reso_steps) == (7, "a photo of a dog", 8)
    edited = load_train_config(toml(tmp_path, text.replace("resolution = 64", "resolution = 128")))
    assert edited.resolution == 128


def test_a_config_made_in_python_takes_one_text_as_one_item_and_refuses_numbers_as_text():
    """A Python-API review: TrainConfig(validation_prompt="a cat") sampled five prompts, "a", " ", "c", "a", "t";
    concepts="wbk cat" named concepts 'w', 'b', …; resolution="64" failed deep in the run with a TypeError."""
    config = TrainConfig(mode="lora", validation_prompt="a cat", concepts="wbk cat").validate()
    assert (config.validation_prompt, config.concepts) == (["a cat"], ["wbk cat"])
    with pytest.raises(ConfigError, match=r"resolution must be int, got '64'; learning_rate must be float or none, got '1e-4'"):
        TrainConfig(mode="lora", resolution="64", learning_rate="1e-4").validate()
    with pytest.raises(ConfigError, match=r"train_text_encoder must be bool.*got 'false'"):  # "false" was true
        TrainConfig(mode="lora", train_text_encoder="false").validate()
    assert TrainConfig(mode="lora", validation_prompt=("a", "b")).validate().validation_prompt == ["a", "b"]


def test_a_config_validated_for_one_mode_takes_the_next_modes_defaults():
    """A Python-API review: a TrainConfig validated for lora, then set to dreambooth, kept LoRA's learning rate
    (20 times DreamBooth's) and no prior preservation, silently."""
    config = TrainConfig(mode="lora").validate()
    assert (config.learning_rate, config.with_prior_preservation) == (1e-4, False)
    config.mode = "dreambooth"
    assert (config.validate().learning_rate, config.with_prior_preservation) == (5e-6, True)
    config.learning_rate = 2e-6  # set by hand: kept
    config.mode = "lora"
    assert (config.validate().learning_rate, config.with_prior_preservation) == (2e-6, False)
