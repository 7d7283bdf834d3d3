"""Profiles load into one frozen config; bad keys and values are reported all at once, naming file and key."""

from __future__ import annotations

import dataclasses

import pytest

from lowmem_aasist.config import PROFILES_DIR, Config, ConfigError, config_from_dict, load_config
from lowmem_aasist.models import FAMILIES

PROFILES = sorted(PROFILES_DIR.glob("*.toml"))


def test_profiles_exist():
    assert {p.stem for p in PROFILES} >= {"aasist", "aasist-l", "demo"}


@pytest.mark.parametrize("profile", PROFILES, ids=[p.stem for p in PROFILES])
def test_every_profile_loads(profile):
    cfg = load_config(profile)
    assert isinstance(cfg, Config)
    assert cfg.model.name in FAMILIES


def test_paper_recipe_is_the_default():
    cfg = load_config("aasist")
    t = cfg.train
    assert (t.batch, t.crop, t.lr, t.min_lr, t.epochs, t.seed) == (24, 64_600, 1e-4, 5e-6, 100, 1234)
    assert t.betas == (0.9, 0.999) and t.weight_decay == 1e-4 and t.class_weights == (0.1, 0.9)
    assert cfg == Config()  # the profile states the defaults explicitly


def test_frozen():
    cfg = load_config("demo")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.batch = 3  # type: ignore[misc]


def test_overrides_and_round_trip():
    cfg = load_config("demo", {"train.batch": 4, "model.name": "AASIST", "train.lr": 1})
    assert cfg.train.batch == 4 and cfg.model.name == "AASIST" and cfg.train.lr == 1.0
    assert config_from_dict(cfg.to_dict()) == cfg


def test_all_errors_reported_at_once(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nbatchh = 3\nlr = "fast"\n[optimiser]\nx = 1\n')
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    assert "bad.toml: unknown key train.batchh" in msg and "valid keys:" in msg
    assert "train.lr must be float" in msg
    assert "unknown table [optimiser]" in msg


def test_invalid_values_and_missing_profile(tmp_path):
    with pytest.raises(ConfigError, match="train.batch must be >= 1"):
        load_config(None, {"train.batch": 0})
    with pytest.raises(ConfigError, match="train.crop_from must be one of random, start, got 'middle'"):
        load_config(None, {"train.crop_from": "middle"})
    with pytest.raises(ConfigError, match="model.name must be one of"):
        load_config(None, {"model.name": "ResNet"})
    with pytest.raises(ConfigError, match="profile 'nope' not found"):
        load_config("nope")
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\n")
    with pytest.raises(ConfigError, match="broken.toml: not a readable TOML profile"):
        load_config(broken)
