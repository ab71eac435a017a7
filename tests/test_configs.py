"""Every shipped training config parses (types and keys checked by jsonargparse) and composes as documented."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "train"


def _print_config(capsys, *files: str, extra: tuple[str, ...] = ()) -> dict:
    from psm.training.datamodule import PSMDataModule
    from psm.training.module import PSMTrainingModule
    from psm.training.train import PSMCLI, trainer_defaults

    args = [a for f in files for a in ("--config", str(CONFIGS / f))] + list(extra) + ["--print_config"]
    with pytest.raises(SystemExit) as done:
        PSMCLI(PSMTrainingModule, PSMDataModule, args=args, run=False, trainer_defaults=trainer_defaults())
    assert done.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize(
    "files",
    [
        ("paper.yaml", "geosound-sentinel2.yaml"),
        ("paper.yaml", "geosound-bing.yaml", "infonce.yaml"),
        ("paper.yaml", "soundingearth.yaml", "no-metadata.yaml"),
    ],
)
def test_paper_configs_compose(capsys, files):
    cfg = _print_config(capsys, *files)
    assert cfg["model"]["lr"] == 5e-5 and cfg["model"]["schedule"] == "official"
    assert cfg["trainer"]["precision"] == "16-mixed" and cfg["data"]["batch_size"] == 128
    assert "imagery_source" not in cfg["model"]  # linked from data.imagery_source: one source of truth
    assert cfg["data"]["imagery_source"] in ("sentinel2", "bing", "google_earth")
    if "infonce.yaml" in files:
        assert cfg["model"]["loss"] == "infonce"
    if "no-metadata.yaml" in files:
        assert cfg["model"]["metadata_types"] == []


def test_command_line_overrides_the_yaml(capsys):
    cfg = _print_config(capsys, "paper.yaml", "geosound-sentinel2.yaml", extra=("--trainer.max_steps", "7"))
    assert cfg["trainer"]["max_steps"] == 7


def test_a_typo_in_a_config_is_an_error(tmp_path, capsys):
    from psm.training.datamodule import PSMDataModule
    from psm.training.module import PSMTrainingModule
    from psm.training.train import PSMCLI, trainer_defaults

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  lerning_rate: 1.0\n")
    args = ["--config", str(CONFIGS / "paper.yaml"), "--config", str(bad), "--print_config"]
    with pytest.raises(SystemExit) as done:
        PSMCLI(PSMTrainingModule, PSMDataModule, args=args, run=False, trainer_defaults=trainer_defaults())
    assert done.value.code == 2
    assert "does not accept option 'lerning_rate'" in capsys.readouterr().err
