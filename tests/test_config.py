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
    assert rc == 2 and "min_images_per_identity" in err and str(f) in err


def test_every_ready_config_loads():
    files = sorted(config.packaged_config("demo").parent.glob("*.yaml"))
    assert {f.stem for f in files} >= {"demo", "vlr_face", "vlr_14x16", "edgeface_xs", "arcface_resnet34",
                                       "cluster_gpu"}
    for f in files:
        data = config.read_document(f)  # every section checked
        for name in data:
            config.load(config.section_class(name), f, section=name)
    assert config.load(RecognizerTrainConfig, config.packaged_config("demo"), section="recognizer").engine.epochs > 0


def test_every_recipe_is_a_config_file_and_builds():
    """Recipes are data: each named recipe is a packaged config whose task sections build (and the
    32x32 one, which the dataclass defaults also describe, agrees with them)."""
    from faceops.train.dsr import DSRTrainConfig, dsr_recipe
    from faceops.train.finetune import FinetuneConfig, finetune_recipe
    from faceops.train.recipes import RECIPES, recipe
    from faceops.train.registry import TASKS, get_task

    for name, file in RECIPES.items():
        data = config.read_document(config.packaged_config(file))
        built = [recipe(get_task(t).config_cls, get_task(t).section, name) for t in TASKS.names()
                 if get_task(t).section in data]
        assert built, f"recipe {name} ({file}.yaml) has no training section"
    assert config.to_dict(dsr_recipe("32x32")) == config.to_dict(DSRTrainConfig())
    r32, default = config.to_dict(finetune_recipe("32x32")), config.to_dict(FinetuneConfig())
    assert (r32["margin"]["m"], default["margin"]["m"]) == (0.45, 0.3)  # the default margin is seed 004's
    assert {**r32, "margin": None} == {**default, "margin": None}
    assert dsr_recipe("16x16").model.vlr_size == "16x16"


def test_synth_section_is_typed(tmp_path):
    from faceops.data.synth import SynthConfig

    cfg = config.load(SynthConfig, config.packaged_config("demo"), section="synth")
    assert (cfg.identities, cfg.images_per_identity) == (60, 14)
    f = tmp_path / "c.yaml"
    f.write_text("synth:\n  identities: 4\n  images_per_identity: three\n")
    with pytest.raises(config.ConfigError, match=r"section 'synth': 'images_per_identity' = 'three' is not an int"):
        config.read_document(f)
    f.write_text("synth:\n  identities: 0\n")
    with pytest.raises(config.ConfigError, match="synth.identities must be >= 1"):
        config.load(SynthConfig, f, section="synth")


def test_unknown_names_suggest_the_close_one(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("ingest:\n  min_images_per_identiy: 5\n")
    with pytest.raises(config.ConfigError) as e:
        config.load(IngestConfig, f, section="ingest")
    assert str(e.value) == (f"{f}, section 'ingest': unknown key 'min_images_per_identiy' "
                            "(did you mean 'min_images_per_identity'?)")
    f.write_text("ingest:\n  prepare: {zzz: 5}\n")  # nothing close: the allowed keys
    with pytest.raises(config.ConfigError, match=r"unknown key 'prepare.zzz' \(keys under 'prepare': "):
        config.load(IngestConfig, f, section="ingest")


def test_every_section_of_the_file_is_checked(tmp_path):
    """Loading one section still refuses a typo in another, or an unknown section."""
    f = tmp_path / "c.yaml"
    f.write_text("ingest: {}\ndsr:\n  engine: {epoch: 3}\n")
    with pytest.raises(config.ConfigError, match=r"section 'dsr': unknown key 'engine.epoch' \(did you mean"):
        config.load(IngestConfig, f, section="ingest")
    f.write_text("ingest: {}\nrecogniser: {}\n")
    with pytest.raises(config.ConfigError, match=r"unknown section 'recogniser' \(did you mean 'recognizer'\?\)"):
        config.load(IngestConfig, f, section="ingest")
    f.write_text("ingest: 5\n")
    with pytest.raises(config.ConfigError, match="section 'ingest' must be a mapping"):
        config.load(IngestConfig, f, section="ingest")


def test_yaml_errors_give_the_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("ingest:\n  seed: 1\n    workers: 2\n")
    with pytest.raises(config.ConfigError, match=rf"^{f}: line 3, column \d+: not valid YAML: .+$"):
        config.read_yaml(f)
    f.write_text("ingest:\n  seed: 1\n  seed: 2\n")  # PyYAML alone keeps the last silently
    with pytest.raises(config.ConfigError, match=rf"^{f}: line 3, column 3: not valid YAML: key 'seed' is given twice"):
        config.read_yaml(f)
    with pytest.raises(config.ConfigError, match="config file not found"):
        config.read_yaml(tmp_path / "nope.yaml")


def test_every_yaml_text_goes_through_the_strict_reader():
    """--set values and config text (a pipeline's config_yaml) refuse a repeated key as files do,
    and their syntax errors give the line."""
    with pytest.raises(config.ConfigError, match=r"^--set 'a=\{x: 1, x: 2\}': value: line 1, .*given twice"):
        config.parse_override("a={x: 1, x: 2}")
    with pytest.raises(config.ConfigError, match=r"^--set 'a=\[1': value: line 1, column \d+: not valid YAML"):
        config.parse_override("a=[1")
    with pytest.raises(config.ConfigError, match=r"^<config>: line 2, column 1: not valid YAML: key 'dsr' is given"):
        config.parse_yaml("dsr: {}\ndsr: {}\n")
    assert config.load_yaml("[1, {a: 2}]") == [1, {"a": 2}]
    assert config.parse_override("a.b=") == (["a", "b"], None)


def test_deep_merge_lays_an_override_onto_a_copy():
    base = {"lr": 1.0, "engine": {"epochs": 3, "optim": {"wd": 0.1, "lr": 2.0}}, "tags": {"a": 1}}
    merged = config.deep_merge(base, {"engine": {"optim": {"wd": 0.0}}, "tags": None, "new": {"x": 1}})
    assert merged == {"lr": 1.0, "engine": {"epochs": 3, "optim": {"wd": 0.0, "lr": 2.0}}, "tags": None,
                      "new": {"x": 1}}
    assert base["engine"]["optim"]["wd"] == 0.1 and base["tags"] == {"a": 1}  # the inputs are unchanged


def test_override_may_name_its_section():
    a = config.load(RecognizerTrainConfig, overrides=["recognizer.engine.epochs=2"], section="recognizer")
    b = config.load(RecognizerTrainConfig, overrides=["engine.epochs=2"], section="recognizer")
    assert a == b and a.engine.epochs == 2
    from faceops.train.finetune import FinetuneConfig  # a field named like a section stays a field

    assert config.load(FinetuneConfig, overrides=["dsr=m.pt"], section="finetune").dsr == "m.pt"
    with pytest.raises(config.ConfigError, match="reads section 'recognizer', not 'dsr'"):
        config.load(RecognizerTrainConfig, overrides=["dsr.engine.epochs=2"], section="recognizer")
    with pytest.raises(config.ConfigError, match=r"--set engine.epoch=2, section 'recognizer': unknown key"):
        config.load(RecognizerTrainConfig, overrides=["engine.epoch=2"], section="recognizer")
    with pytest.raises(config.ConfigError, match=r"'engine.epochs' holds a value \(int\), not keys"):
        config.load(RecognizerTrainConfig, overrides=["engine.epochs.x=2"], section="recognizer")


def test_override_into_an_empty_section(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("dsr:\n")
    from faceops.train.dsr import DSRTrainConfig

    assert config.load(DSRTrainConfig, f, ["engine.epochs=2"], section="dsr").engine.epochs == 2
    assert config.read_document(f, ["dsr.engine.epochs=2"])["dsr"] == {"engine": {"epochs": 2}}


def test_partial_section_keeps_the_parent_recipe():
    from faceops.train.dsr import DSRTrainConfig

    cfg = config.load(DSRTrainConfig, overrides=["engine.epochs=1"])
    assert cfg.engine.monitor == "val_identity_cosine" and cfg.engine.optim.lr == pytest.approx(1.3e-4)
    rec = config.load(RecognizerTrainConfig, overrides=["loader.batch_size=4"])
    assert rec.loader.augment.rotate_deg == 10.0  # the recognizer's augmentation, not the DSR default


def test_errors_name_the_file_or_the_override(tmp_path):
    """A file that is wrong on its own is named alone (--data/--out of `faceops train` are overrides
    too); overrides may complete a file, and an error only they cause says --set."""
    f = tmp_path / "c.yaml"
    f.write_text("ingest:\n  seed: x\n")
    with pytest.raises(config.ConfigError, match=rf"^{f}, section 'ingest': 'seed' = 'x' is not an int$"):
        config.load(IngestConfig, f, ["workers=1"], section="ingest")
    f.write_text("ingest:\n  splits: {train: 0.5}\n")
    assert config.load(IngestConfig, f, ["splits.val=0.4"], section="ingest").splits.val == 0.4
    with pytest.raises(config.ConfigError, match=r"^--set, section 'ingest': splits: train\+val\+test must be 1"):
        config.load(IngestConfig, overrides=["splits.train=0.5"], section="ingest")


def test_whole_document_overrides_name_the_file_when_it_is_wrong(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("recognizer:\n  engine: {epochs: ten}\n")
    with pytest.raises(config.ConfigError, match=rf"^{f}, section 'recognizer': 'engine.epochs' = 'ten'"):
        config.read_document(f, ["recognizer.label_smoothing=0.2"])
    assert config.read_document(f, ["recognizer.engine.epochs=3"])["recognizer"]["engine"]["epochs"] == 3


@pytest.mark.parametrize("decay", [1.0, 0.0, -0.5])
def test_ema_decay_outside_zero_one_is_refused(decay):
    """A decay of 1 never moves the average off its initial weights; 0 or below is no average."""
    from faceops.train.config import EngineConfig

    with pytest.raises(config.ConfigError, match=f"engine.ema_decay must be in \\(0, 1\\) or null, got {decay}"):
        EngineConfig(ema_decay=decay)
