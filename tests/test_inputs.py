"""Every command against bad input: one line `error: ...`, exit code 2, no traceback, and nothing written where it
must not be (a checkpoint directory above all)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from accelerate import Accelerator

from tests.conftest import REPO, tiny_config, tiny_flags
from vaegan_dist.checkpoint import output_paths as guard
from vaegan_dist.checkpoint.layout import checkpoints_dir
from vaegan_dist.checkpoint.reading import newest_complete, verify
from vaegan_dist.cli.train import parse_args
from vaegan_dist.config import ConfigError, TrainConfig
from vaegan_dist.exits import EXIT_BAD_INPUT
from vaegan_dist.training.loop import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run's output directory with two checkpoints."""
    output_dir = tmp_path_factory.mktemp("run")
    assert train(tiny_config(output_dir=str(output_dir), max_steps=2, save_every=1), Accelerator(cpu=True)) == 0
    return output_dir


@pytest.fixture
def checkpoint(run_dir):
    return newest_complete(checkpoints_dir(run_dir), report=pytest.fail)


def snapshot(directory):
    """Every file under directory with its SHA-256: what a command must leave untouched."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def command(module, *args, timeout=300):
    result = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                            cwd=REPO, timeout=timeout, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                                                            "WANDB_MODE": "disabled"})
    return result


def main_of(module, *args, capfd):
    """The module's main (what `python -m module` runs) called here, its exit as command() reports a process's:
    for errors in the arguments, which the tests of command() show to be one line from a fresh process too."""
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main([str(a) for a in args])
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess([module, *args], exit_info.value.code, out, err)


def assert_one_line_error(result, code, *fragments):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ------------------------------------------------------------------------- no command writes into a checkpoint

def test_export_into_its_own_checkpoint_is_refused_and_writes_nothing(checkpoint, run_dir):
    before = snapshot(run_dir)
    result = command("vaegan_dist.cli.export", checkpoint, checkpoint)
    assert_one_line_error(result, 2, "is inside the checkpoint directory", "never writes into a checkpoint")
    assert snapshot(run_dir) == before and verify(checkpoint) is None


@pytest.mark.parametrize("where", ["other checkpoint", "subfolder", "checkpoints folder", "run", "tmp save"])
def test_export_anywhere_in_a_run_s_checkpoints_or_over_the_run_is_refused(checkpoint, run_dir, tmp_path, where,
                                                                           capsys):
    from vaegan_dist.cli.export import main

    older = sorted(checkpoints_dir(run_dir).glob("step_*"))[0]
    out = {"other checkpoint": older, "subfolder": checkpoint / "export", "run": run_dir,
           "checkpoints folder": checkpoints_dir(run_dir) / "exports",
           "tmp save": checkpoints_dir(run_dir) / ".tmp-step_0000009"}[where]
    before = snapshot(run_dir)
    with pytest.raises(SystemExit) as exit_info:
        main([str(checkpoint), str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert snapshot(run_dir) == before
    assert out in (older, run_dir) or not out.exists()


def test_export_over_its_source_export_or_into_another_run_is_refused(exported, run_dir, tmp_path, capsys):
    from vaegan_dist.cli.export import main

    before = snapshot(exported)
    with pytest.raises(SystemExit) as exit_info:
        main([str(exported), str(exported / ".." / exported.name)])  # the same, spelt otherwise
    assert exit_info.value.code == 2 and "is the directory it reads" in capsys.readouterr().err
    assert snapshot(exported) == before
    other_run = tmp_path / "other_run"
    (other_run / "checkpoints" / "step_0000001").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        main([str(exported), str(other_run)])
    assert exit_info.value.code == 2 and "is a run's output directory" in capsys.readouterr().err
    main([str(run_dir), str(tmp_path / "fine")])  # elsewhere: fine
    assert (tmp_path / "fine" / "model.safetensors").is_file()


def test_sample_eval_and_report_never_write_into_a_checkpoint(checkpoint, run_dir, exported):
    before = snapshot(run_dir)
    assert_one_line_error(command("vaegan_dist.cli.sample", exported, "--out", checkpoint / "grid.png"), 2,
                          "--out", "is inside the checkpoint directory")
    assert_one_line_error(command("vaegan_dist.cli.eval", exported, "--out", checkpoint / "eval.json",
                                  "--samples", 4), 2, "--out", "is inside the checkpoint directory")
    assert_one_line_error(command("vaegan_dist.cli.report", checkpoint), 2, "is inside the checkpoint directory")
    assert snapshot(run_dir) == before


def test_training_never_writes_into_a_checkpoint(checkpoint):
    for flag in ("--output-dir", "--data-dir"):
        with pytest.raises(ConfigError, match=f"{flag} .* is inside the checkpoint directory"):
            parse_args([flag, str(checkpoint)])
    with pytest.raises(ConfigError, match="is inside the checkpoint directory"):
        parse_args(["--output-dir", str(checkpoint.parent)])  # the checkpoints/ folder itself


def test_outputs_that_cannot_be_written_are_one_line_errors(exported, tmp_path, capfd):
    (tmp_path / "a_file").write_text("")
    blocked = tmp_path / "a_file" / "sub"
    assert_one_line_error(main_of("vaegan_dist.cli.sample", exported, "--out", blocked / "grid.png", capfd=capfd), 2,
                          "cannot write --out")
    assert_one_line_error(main_of("vaegan_dist.cli.eval", exported, "--out", blocked / "eval.json",
                                  capfd=capfd), 2, "cannot write --out")
    assert_one_line_error(main_of("vaegan_dist.cli.export", exported, blocked, capfd=capfd), 2,
                          "cannot write the export to")
    assert json.loads((exported / "config.json").read_text())  # untouched


# ------------------------------------------------------------------------------------------- settings

HINTS = typing.get_type_hints(TrainConfig)

FLOAT_SETTINGS = [f.name for f in dataclasses.fields(TrainConfig)
                  if float in (HINTS[f.name], *typing.get_args(HINTS[f.name]))]


@pytest.mark.parametrize("key", FLOAT_SETTINGS)
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_settings_are_errors_naming_the_setting_from_flags_and_files(key, value, tmp_path):
    message = f"setting '{key}' is {value}: it must be a finite number"
    with pytest.raises(ConfigError, match=message):
        parse_args([f"--{key.replace('_', '-')}={value}", "--output-dir", str(tmp_path)])
    yaml_value = {"inf": ".inf", "nan": ".nan", "-inf": "-.inf"}[value]
    (tmp_path / "run.yaml").write_text(f"{key}: {yaml_value}\n")
    json_value = {"inf": "Infinity", "nan": "NaN", "-inf": "-Infinity"}[value]
    (tmp_path / "run.json").write_text(f'{{"{key}": {json_value}}}')
    for config_file in ("run.yaml", "run.json"):
        with pytest.raises(ConfigError, match=message):
            parse_args(["--config", str(tmp_path / config_file), "--output-dir", str(tmp_path)])


@pytest.mark.parametrize(("flags", "message"), [
    (["--seed", "-1"], r"setting 'seed' must be in \[0, 4294967295\]"),
    (["--seed", str(2**32)], r"setting 'seed' must be in \[0, 4294967295\]"),
    (["--cpu-threads", "100000"], "setting 'cpu_threads' must be at most 1024"),
    (["--wandb-timeout", "1e300"], "setting 'wandb_timeout' must be at most 86400 s"),
    (["--output-dir", ""], "setting 'output_dir' cannot be empty"),
    (["--resume", ""], "setting 'resume' cannot be empty"),
    (["--data-dir", ""], "setting 'data_dir' cannot be empty"),
])
def test_settings_that_would_fail_later_with_a_traceback_are_errors_now(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(flags)


@pytest.mark.parametrize(("contents", "message"), [
    (b"\x1f\x8b\x08\x00\xff\xfe", "is not text: give a YAML or JSON file"),
    (b"1: 2\ngama: 3\n", "unknown setting 'gama'|unknown setting 1"),
])
def test_config_files_that_are_not_settings(tmp_path, contents, message):
    (tmp_path / "bad.yaml").write_bytes(contents)
    with pytest.raises(ConfigError, match=message):
        parse_args(["--config", str(tmp_path / "bad.yaml")])


# ------------------------------------------------------------------------------------ command lines

@pytest.mark.parametrize(("module", "args", "fragments"), [
    ("vaegan_dist.train", ["--gama", "3"], ["unrecognized arguments: --gama 3", "did you mean --gamma"]),
    ("vaegan_dist.train", ["--preset", "sed"], ["invalid choice: 'sed'", "did you mean seed?"]),
    ("vaegan_dist.train", ["--lr", "fast"], ["argument --lr: invalid float value: 'fast'"]),
    ("vaegan_dist.cli.export", ["a", "b", "--dtype", "float8"], ["did you mean float32 or float16?"]),
    ("vaegan_dist.cli.sample", ["a", "--out", "x.png", "--mode", "sample"], ["did you mean samples?"]),
    ("vaegan_dist.cli.eval", ["a", "--seeed", "3"], ["did you mean --seed?"]),
    ("vaegan_dist.cli.report", [], ["the following arguments are required: output_dir"]),
])
def test_a_command_line_mistake_is_one_line_with_the_close_matches_and_help(module, args, fragments, capfd):
    result = main_of(module, *args, capfd=capfd)
    assert_one_line_error(result, 2, *fragments, "--help lists the flags")
    assert "usage:" not in result.stderr


def test_a_command_line_mistake_is_printed_by_the_first_process_only(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--gama", "3"])
    assert exit_info.value.code == 2 and capsys.readouterr().err == ""


# ------------------------------------------------------------------ vaegan-sample, -eval and -report inputs

@pytest.mark.parametrize(("main_module", "flags", "message"), [
    ("sample", ["--device", "foo"], "unknown device 'foo'"),
    ("sample", ["--seed", str(2**70)], "seed 1180591620717411303424 is not in [0, 4294967295]"),
    ("sample", ["--seed", "-1"], "seed -1 is not in [0, 4294967295]"),
    ("eval", ["--device", "cuda:99"], "device 'cuda:99'"),
    ("eval", ["--seed", "x"], "invalid seed 'x'"),
    ("eval", ["--samples", "60001"], "--samples must be at most 60000"),
])
def test_devices_seeds_and_sample_counts_are_checked_first(exported, tmp_path, capsys, main_module, flags, message):
    import importlib

    main = importlib.import_module(f"vaegan_dist.cli.{main_module}").main
    with pytest.raises(SystemExit) as exit_info:
        main([str(exported), "--out", str(tmp_path / "out.png" if main_module == "sample" else "out.json"), *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert message in err
    assert not list(tmp_path.iterdir())


def test_eval_samples_beyond_the_training_set_are_an_error():
    with pytest.raises(ConfigError, match=r"setting 'eval_samples' must be 0 .* from 4 to 60000"):
        tiny_config(eval_samples=60001)


@pytest.mark.parametrize(("write", "message"), [
    (lambda d: (d / "metrics.jsonl").write_text('{"step": 1, "enc_loss": 1}\n[1]\n{"step": 3}\n'),
     "line 2 is not a record with a step"),
    (lambda d: (d / "metrics.jsonl").write_text('{"step": 1}\n{"loss": 1}\n{"step": 3}\n'),
     "line 2 is not a record with a step"),
    (lambda d: (d / "metrics.jsonl").write_bytes(b"\xff\xfe\x00\x01"), "is not text"),
    (lambda d: ((d / "samples").mkdir(), (d / "samples" / "epoch_001.png").write_bytes(b"junk")),
     "epoch_001.png is not a readable picture (UnidentifiedImageError): delete or restore it"),
])
def test_report_inputs_that_are_not_a_run_s_are_one_line_errors(tmp_path, capsys, write, message):
    from vaegan_dist.cli.report import main

    write(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert message in err


def test_report_draws_records_that_lack_a_series_with_a_gap(tmp_path):
    pytest.importorskip("matplotlib")
    from vaegan_dist.evaluation.report import write_report

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "enc_loss": 1.0}\n{"step": 2, "dec_loss": 2.0}\n')
    assert {p.name for p in write_report(tmp_path)} == {"loss_curves.png", "discriminator_outputs.png"}


def test_a_gz_data_file_damaged_inside_its_compressed_stream_is_a_one_line_error(tmp_path):
    import shutil

    from vaegan_dist.data.mnist import BUNDLED_DIR, DataError, load_mnist

    for file in BUNDLED_DIR.glob("t10k-*.gz"):
        shutil.copy(file, tmp_path)
    damaged = tmp_path / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(damaged.read_bytes())
    for i in range(100, 400):
        data[i] ^= 0x5A
    damaged.write_bytes(bytes(data))
    with pytest.raises(DataError, match="it is truncated or damaged; replace it with a fresh copy"):
        load_mnist(tmp_path, "test")


def test_an_export_with_non_finite_weights_or_a_config_that_is_not_text_is_refused(exported, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from vaegan_dist.hub.network_files import ExportError, load_networks

    nan = shutil.copytree(exported, tmp_path / "nan")
    weights = load_file(nan / "model.safetensors")  # the Hub format: encoder.* and decoder.* in one file
    key = sorted(k for k in weights if k.startswith("decoder."))[0]
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, nan / "model.safetensors")
    reported = key.removeprefix("decoder.")
    with pytest.raises(ExportError, match=f"the decoder in .* has non-finite weights \\({reported}\\)"):
        load_networks(nan)
    binary = shutil.copytree(exported, tmp_path / "binary")
    (binary / "config.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ExportError, match=r"config\.json is not a usable config"):
        load_networks(binary)


def test_a_copied_checkpoint_is_still_guarded_and_a_stray_complete_file_is_not_one(checkpoint, tmp_path):
    import shutil

    copy = shutil.copytree(checkpoint, tmp_path / "saved")
    with pytest.raises(guard.OutputError, match="is inside the checkpoint directory"):
        guard.refuse_output(copy / "x.png", "--out")
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "COMPLETE").write_text("done\n")
    guard.refuse_output(tmp_path / "project" / "x.png", "--out")


@pytest.mark.parametrize(("suffix", "text"), [(".yaml", "lr: 0.001\nlr: 0.01\n"),
                                              (".json", '{"lr": 0.001, "lr": 0.01}')])
def test_a_setting_given_twice_in_a_config_file_is_an_error(tmp_path, suffix, text):
    (tmp_path / f"twice{suffix}").write_text(text)
    with pytest.raises(ConfigError, match=r"twice\.\w+: setting 'lr' is given twice: keep one"):
        parse_args(["--config", str(tmp_path / f"twice{suffix}")])


@pytest.mark.parametrize(("command", "shown"), [
    ("sample", ["(default: samples)", "(default: 0)", "(default: 10)", "(default: ema)"]),
    ("eval", ["(default: 10000)", "(default: evaluation.json)", "(default: the run's seed; 0 for an export)"]),
    ("export", ["(default: float16)", "(default: apache-2.0)", "(default: ema)"]),
    ("report", []),
    ("train", ["(default: 0.0003)", "(default: outputs)"]),
])
def test_every_command_shows_its_defaults_and_examples(command, shown, capsys):
    with pytest.raises(SystemExit):
        importlib.import_module(f"vaegan_dist.cli.{command}").main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "examples: " in text and all(fragment in text for fragment in shown), text


def test_the_usage_line_names_the_command_that_runs():
    result = subprocess.run([str(Path(sys.executable).parent / "vaegan-train"), "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.startswith("usage: vaegan-train "), result.stdout[:200]


# ------------------------------------------------------------------------- reading checkpoints verifies them

def damaged_copies(checkpoint, tmp_path):
    """A copy with one flipped byte in the decoder, and one without its COMPLETE marker (a half-written save)."""
    import shutil

    flipped = shutil.copytree(checkpoint, tmp_path / "flipped")
    data = bytearray((flipped / "decoder.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (flipped / "decoder.safetensors").write_bytes(bytes(data))
    unsealed = shutil.copytree(checkpoint, tmp_path / "unsealed")
    (unsealed / "COMPLETE").unlink()
    return {"flipped": (flipped, "decoder.safetensors does not match its SHA-256"),
            "unsealed": (unsealed, "it has no COMPLETE marker")}


@pytest.mark.parametrize("damage", ["flipped", "unsealed"])
def test_sample_export_and_from_pretrained_refuse_a_checkpoint_that_fails_verification(checkpoint, tmp_path, capfd,
                                                                                         damage):
    from vaegan_dist import VAEGAN

    path, problem = damaged_copies(checkpoint, tmp_path)[damage]
    for module, args in (("vaegan_dist.cli.sample", [path, "--out", tmp_path / "s.png"]),
                         ("vaegan_dist.cli.export", [path, tmp_path / "export"])):
        assert_one_line_error(main_of(module, *args, capfd=capfd), EXIT_BAD_INPUT,
                              f"{path} is not a usable checkpoint: {problem}")
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "export").exists()
    with pytest.raises(RuntimeError, match=f"is not a usable checkpoint: {problem}"):
        VAEGAN.from_pretrained(path)


def test_a_fallback_to_an_older_checkpoint_is_said(run_dir, tmp_path, capfd):
    import shutil

    run = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns(".lock"))
    newest = newest_complete(checkpoints_dir(run), report=pytest.fail)
    (newest / "COMPLETE").write_text("{}")
    importlib.import_module("vaegan_dist.cli.sample").main([str(run), "--out", str(tmp_path / "s.png")])
    assert (tmp_path / "s.png").exists()
    assert f"warning: skipping checkpoint {newest}: its COMPLETE marker" in capfd.readouterr().err


def test_networks_too_big_for_memory_and_absurd_sample_counts_are_one_line(exported, tmp_path, capfd):
    result = main_of("vaegan_dist.cli.train", *tiny_flags(hidden_dim=10**12, output_dir=tmp_path / "run"), capfd=capfd)
    assert_one_line_error(result, EXIT_BAD_INPUT, "the networks do not fit in memory", "lower --hidden-dim")
    result = main_of("vaegan_dist.cli.sample", exported, "--count", "1000000000", "--out", tmp_path / "s.npy",
                     capfd=capfd)
    assert_one_line_error(result, EXIT_BAD_INPUT, "--count must be from 1 to 100,000")


def test_an_eval_out_that_cannot_be_written_fails_before_the_evaluation(exported, capfd, monkeypatch):
    def evaluated(*args):
        raise AssertionError("the evaluation ran")

    monkeypatch.setattr("vaegan_dist.cli.eval.mnist_report", evaluated)
    result = main_of("vaegan_dist.cli.eval", exported, "--out", "/proc/evaluation.json", "--device", "cpu", capfd=capfd)
    assert_one_line_error(result, EXIT_BAD_INPUT, "cannot write --out /proc/evaluation.json")
