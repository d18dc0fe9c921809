"""Bad configs at the CLI door, and help texts that show only keys the loader accepts.

A wrong config is a usage error: one line naming the key and the file, exit code 2 (argparse's
convention), no traceback, and nothing started or written.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from faceops import config
from faceops.cli import get_args_parser, main

README = Path(__file__).resolve().parents[1] / "README.md"
SET_EXAMPLE = re.compile(r"--set\s+([a-z_][\w.]*=[^\s,;)\]]+)")


def _parsers(parser: argparse.ArgumentParser, prog: tuple[str, ...] = ()):
    """Every (sub)command's parser, with its command words."""
    yield " ".join(prog), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*prog, name))


def _lookup(tree: dict, path: list[str]):
    for part in path:
        tree = tree[part]
    return tree


def _check_example(section: str | None, example: str) -> None:
    """``example`` loads the way its command loads it, and lands on the key it names."""
    path, value = config.parse_override(example)
    if section is None:  # whole-document commands (faceops run)
        typed = config.check_document(config.apply_overrides({}, [example]), "--help")
        got = _lookup(config.to_dict(typed[path[0]]), path[1:])
    else:
        cfg = config.load(config.section_class(section), overrides=[example], section=section)
        got = _lookup(config.to_dict(cfg), path[1:] if path[0] == section else path)
    assert got == value, f"--set {example} did not set {'.'.join(path)}"


def test_every_help_example_of_set_is_a_key_the_loader_accepts():
    checked = []
    for prog, parser in _parsers(get_args_parser()):
        if not any(a.dest == "overrides" for a in parser._actions):
            continue
        examples = SET_EXAMPLE.findall(parser.format_help())
        assert examples, f"faceops {prog} --help shows no --set example"
        for example in examples:
            _check_example(parser.get_default("config_section"), example)
            checked.append(f"{prog}: {example}")
    assert any(c.startswith("train recognizer") for c in checked) and any(c.startswith("run") for c in checked)


def test_readme_set_examples_load():
    code = "\n".join(re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)).replace("\\\n", " ")
    faceops_lines = [ln for ln in code.splitlines() if not ln.lstrip().startswith(("helm ", "#"))]  # helm's --set
    examples = SET_EXAMPLE.findall("\n".join(faceops_lines))
    assert examples
    for example in examples:  # the README's commands pass --set to scripts/demo.sh (faceops run)
        _check_example(None, example)


def test_train_tasks_read_their_sections_class():
    from faceops.train.registry import TASKS, get_task

    assert TASKS.names() == ["dsr", "finetune", "recognizer"]
    for task in map(get_task, TASKS.names()):
        assert task.config_cls is config.section_class(task.section)
        assert task.section == task.name  # `faceops train NAME` reads the section `NAME:`


# -- bad configs -----------------------------------------------------------------------------------
def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return str(path)


BAD = {  # case -> (config text or None for a missing file, extra args, what the one line must say)
    "unknown key": ("recognizer:\n  engine:\n    epoch: 3\n", [],
                    ["{file}, section 'recognizer': unknown key 'engine.epoch' (did you mean 'engine.epochs'?)"]),
    "unknown section": ("recogniser:\n  engine: {epochs: 3}\n", [],
                        ["unknown section 'recogniser'", "did you mean 'recognizer'?", "{file}"]),
    "unknown key in another section": ("synth:\n  identites: 5\nrecognizer: {}\n", [],
                                       ["{file}, section 'synth': unknown key 'identites' "
                                        "(did you mean 'identities'?)"]),
    "wrong type": ("recognizer:\n  engine:\n    epochs: ten\n", [],
                   ["{file}, section 'recognizer': 'engine.epochs' = 'ten' is not an int"]),
    "bad value": ("recognizer:\n  engine:\n    optim: {lr: -0.1}\n", [],
                  ["{file}, section 'recognizer': optim.lr must be > 0, got -0.1 (in 'engine.optim')"]),
    "missing file": (None, [], ["config file not found", "{file}"]),
    "YAML syntax": ("recognizer:\n  engine:\n    epochs: [3\n  margin: {}\n", [],
                    ["not valid YAML", "line 4", "{file}"]),
    "key given twice": ("recognizer:\n  engine: {epochs: 3}\n  engine: {epochs: 4}\n", [],
                        ["'engine' is given twice", "line 3", "{file}"]),
    "--set without =": ("recognizer: {}\n", ["--set", "engine.epochs"], ["--set 'engine.epochs'", "KEY=VALUE"]),
    "--set unknown key": ("recognizer: {}\n", ["--set", "engine.epoch=3"],
                          ["--set engine.epoch=3, section 'recognizer': unknown key 'engine.epoch' "
                           "(did you mean 'engine.epochs'?)"]),
    "--set another section": ("recognizer: {}\n", ["--set", "dsr.engine.epochs=3"],
                              ["--set dsr.engine.epochs=3", "reads section 'recognizer', not 'dsr'"]),
    "--set wrong type": ("recognizer: {}\n", ["--set", "recognizer.engine.epochs=ten"],
                         ["{file} (with --set), section 'recognizer': 'engine.epochs' = 'ten' is not an int"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_config_is_one_line_exit_2(case, tmp_path, capsys):
    text, extra, expected = BAD[case]
    file = _write(tmp_path, text) if text is not None else str(tmp_path / "missing.yaml")
    rc = main(["train", "recognizer", "--config", file, "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("faceops train: error: ") and "\n" not in err, err
    for part in expected:
        assert part.format(file=file) in err, err
    assert not (tmp_path / "out").exists()


def test_bad_config_through_the_installed_command(tmp_path):
    file = _write(tmp_path, "ingest:\n  min_images_per_identiy: 5\n")
    faceops = Path(sys.executable).with_name("faceops")
    r = subprocess.run([str(faceops), "ingest", str(tmp_path), "--name", "x", "--store", str(tmp_path / "s"),
                        "--config", file], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (f"{file}, section 'ingest': unknown key 'min_images_per_identiy' "
            "(did you mean 'min_images_per_identity'?)") in r.stderr
    assert not (tmp_path / "s").exists()


def test_run_checks_every_section_before_any_step(tmp_path, capsys):
    """The synth: section is read by the ingest step; a typo in it fails `faceops run` at once."""
    file = _write(tmp_path, "synth:\n  identities: 4\n  image_per_identity: 3\n")
    rc = main(["run", "vlr_face", "--config", file, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    assert f"{file}, section 'synth': unknown key 'image_per_identity'" in err, err
    assert "did you mean 'images_per_identity'?" in err
    assert not (tmp_path / "run").exists()
    rc = main(["run", "vlr_face", "--set", "synht.seed=3", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--set synht.seed=3: unknown section 'synht' (did you mean 'synth'?)" in err, err


def test_bad_command_line_values_exit_2(tmp_path, capsys):
    assert main(["synth", "--identities", "0", "--out", str(tmp_path / "faces")]) == 2
    assert "synth.identities must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "faces").exists()
    assert main(["run", "vlr_face", "--param", "vlr_size", "--out", str(tmp_path / "run")]) == 2
    assert "--param 'vlr_size': expected KEY=VALUE" in capsys.readouterr().err


def test_python_m_faceops_is_the_faceops_command():
    """torchrun starts `python -m faceops ...` (faceops.train.torchrun.ENTRY_MODULE)."""
    r = subprocess.run([sys.executable, "-m", "faceops", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: faceops ") and "train" in r.stdout
