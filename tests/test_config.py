"""Settings: flags > environment > TOML file > defaults, and errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipguard.consumer.config import SettingsError, WorkerSettings


def test_defaults_follow_the_design(tiny_checkpoint: Path) -> None:
    settings = WorkerSettings.load(checkpoint=tiny_checkpoint, bootstrap_servers="k:9092")
    assert (settings.input_topic, settings.output_topic, settings.dlq_topic) == (
        "uploads",
        "verdicts",
        "uploads.dlq",
    )
    assert settings.group_id == "clipguard" and settings.metrics_port == 9400


def test_precedence_flag_env_file(tiny_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    config = tmp_path / "clipguard.toml"
    config.write_text(
        f'checkpoint = "{tiny_checkpoint}"\nbootstrap_servers = "file:1"\n'
        'max_batch_size = 8\ngroup_id = "from-file"\n'
    )
    monkeypatch.setenv("CLIPGUARD_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("CLIPGUARD_BOOTSTRAP_SERVERS", "env:2")
    settings = WorkerSettings.load(config, bootstrap_servers="flag:3")
    assert settings.bootstrap_servers == "flag:3"
    assert settings.max_batch_size == 16
    assert settings.group_id == "from-file"


def test_bad_values_name_the_setting(tiny_checkpoint: Path) -> None:
    with pytest.raises(SettingsError) as info:
        WorkerSettings.load(
            checkpoint=tiny_checkpoint, bootstrap_servers="nohostport", max_batch_size=0
        )
    text = str(info.value)
    assert "bootstrap_servers" in text and "--bootstrap-servers" in text
    assert "max_batch_size" in text and "CLIPGUARD_MAX_BATCH_SIZE" in text


def test_missing_checkpoint_and_required_settings(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="checkpoint not found"):
        WorkerSettings.load(checkpoint=tmp_path / "missing", bootstrap_servers="k:1")
    with pytest.raises(SettingsError, match="bootstrap_servers"):
        WorkerSettings.load(checkpoint=tmp_path)


def test_unknown_config_keys_and_files_fail_fast(tiny_checkpoint: Path, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("max_batch_sise = 3\n")
    with pytest.raises(SettingsError, match="max_batch_sise"):
        WorkerSettings.load(config, checkpoint=tiny_checkpoint, bootstrap_servers="k:1")
    with pytest.raises(SettingsError, match="not found"):
        WorkerSettings.load(tmp_path / "absent.toml")
    config.write_text("this is = = not toml")
    with pytest.raises(SettingsError, match="cannot read config file"):
        WorkerSettings.load(config, checkpoint=tiny_checkpoint, bootstrap_servers="k:1")


def test_topics_must_differ_and_thresholds_order(tiny_checkpoint: Path) -> None:
    base = {"checkpoint": tiny_checkpoint, "bootstrap_servers": "k:1"}
    with pytest.raises(SettingsError, match="must all differ"):
        WorkerSettings.load(**base, output_topic="uploads")
    with pytest.raises(SettingsError, match="review_at"):
        WorkerSettings.load(**base, review_at=0.9, block_at=0.2)


def test_secrets_are_masked(tiny_checkpoint: Path) -> None:
    settings = WorkerSettings.load(
        checkpoint=tiny_checkpoint,
        bootstrap_servers="k:1",
        sasl_mechanism="PLAIN",
        sasl_username="u",
        sasl_password="hunter2",
    )
    assert "hunter2" not in repr(settings)
    assert settings.client_kwargs()["sasl_plain_password"] == "hunter2"


def test_misspelt_environment_variables_are_reported(
    tiny_checkpoint: Path, monkeypatch, caplog
) -> None:
    monkeypatch.setenv("CLIPGUARD_MAX_BATCH_SISE", "4")
    with caplog.at_level("WARNING"):
        settings = WorkerSettings.load(checkpoint=tiny_checkpoint, bootstrap_servers="k:1")
    assert settings.max_batch_size == 32
    assert "CLIPGUARD_MAX_BATCH_SISE" in caplog.text
