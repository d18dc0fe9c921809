"""Typed configs: unknown keys, wrong types and bad values name the key and the file."""

import pytest

from faceops import config
from faceops.cli import main
from faceops.data.ingest import IngestConfig
from faceops.train.recognizer import RecognizerTrainConfig


def test_defaults_work():
    cfg = config.load(RecognizerTrainConfig)
    assert cfg.model.embedding_dim == 512 and cfg.margin.name == "arcface"


def test_unknown_key_names_key_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("ingest:\n  prepare:\n    hr_sise: 112\n")
    with pytest.raises(config.ConfigError) as e:
        config.load(IngestConfig, f, section="ingest")
    assert "prepare.hr_sise" in str(e.value) and str(f) in str(e.value)


def test_wrong_type_names_key_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("recognizer:\n  engine:\n    epochs: three\n")
    with pytest.raises(config.ConfigError) as e:
        config.load(RecognizerTrainConfig, f, section="recognizer")
    assert "engine.epochs" in str(e.value) and str(f) in str(e.value)


def test_bad_value_and_literal(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("recognizer:\n  engine:\n    optim:\n      name: adam\n")
    with pytest.raises(config.ConfigError, match="engine.optim.name.*adamw"):
        config.load(RecognizerTrainConfig, f, section="recognizer")
    with pytest.raises(config.ConfigError, match="splits"):
        config.load(IngestConfig, overrides=["splits.train=0.9"])


def test_overrides_parse_yaml_values():
    cfg = config.load(RecognizerTrainConfig, overrides=["engine.optim.lr=3e-4", "engine.epochs=2",
                                                        "engine.nan_guard.inject_steps=[1, 2]"])
    assert cfg.engine.optim.lr == pytest.approx(3e-4) and cfg.engine.epochs == 2
    assert cfg.engine.nan_guard.inject_steps == [1, 2]


def test_cli_reports_config_error(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("ingest:\n  min_images_per_identity: eight\n")
    rc = main(["ingest", str(tmp_path), "--name", "x", "--store", str(tmp_path / "s"), "--config", str(f)])
    err = capsys.readouterr().err
    assert rc == 1 and "min_images_per_identity" in err and str(f) in err


def test_packaged_configs_load():
    from faceops.config import packaged_config, read_yaml

    for name in ("demo", "arcface_resnet34", "edgeface_xs"):
        data = read_yaml(packaged_config(name))
        assert "recognizer" in data
        config.load(RecognizerTrainConfig, packaged_config(name), section="recognizer")


def test_partial_section_keeps_the_parent_recipe():
    from faceops.train.dsr import DSRTrainConfig

    cfg = config.load(DSRTrainConfig, overrides=["engine.epochs=1"])
    assert cfg.engine.monitor == "val_identity_cosine" and cfg.engine.optim.lr == pytest.approx(1.3e-4)
    rec = config.load(RecognizerTrainConfig, overrides=["loader.batch_size=4"])
    assert rec.loader.augment.rotate_deg == 10.0  # the recognizer's augmentation, not the DSR default
