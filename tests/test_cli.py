"""The ``psm`` command line on users' mistakes: one clear line on stderr and exit code 2 (no traceback), nothing
written; Ctrl-C and a closed pipe end quietly with the shell's codes."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

import psm.cli
from psm.cli import main
from test_map_query import make_checkpoint, write_test_index

MANIFEST_HEADER = "key,audio_path,latitude,longitude,audio_source,caption,caption_source,split,image_sentinel2\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny checkpoint with a tokenizer and a map index made with it."""
    from psm.models.factory import create_model

    root = tmp_path_factory.mktemp("cli")
    ckpt = make_checkpoint(root)
    index = write_test_index(root / "index", create_model(ckpt))
    return {"ckpt": ckpt, "index": index}


def _common(env: dict[str, Path]) -> list[str]:
    return ["--index", str(env["index"]), "--checkpoint", str(env["ckpt"]), "--device", "cpu"]


def _manifest(tmp_path: Path) -> Path:
    """A one-row CSV manifest (its files need not exist for the checks made before reading them)."""
    path = tmp_path / "m.csv"
    path.write_text(MANIFEST_HEADER + "k0,a.ogg,52.4,12.6,iNat,birds,meta,train,img.tif\n")
    return path


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``psm ARGV``; expect argparse's refusal (exit code 2) and return stderr."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_ctrl_c_exits_130_without_a_traceback(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(psm.cli, "_cmd_models", interrupted)
    assert main(["models"]) == psm.cli.INTERRUPTED == 130
    assert capsys.readouterr().err.strip() == "psm: interrupted"


def test_closed_stdout_pipe_is_quiet(monkeypatch):
    def reader_gone(args):
        raise BrokenPipeError

    monkeypatch.setattr(psm.cli, "_cmd_models", reader_gone)
    assert main(["models"]) == psm.cli.BROKEN_PIPE


def test_demo_step_interrupted_stops_with_130(monkeypatch, tmp_path):
    import psm.demo

    monkeypatch.setattr(psm.demo, "psm", lambda argv: 130)
    with pytest.raises(SystemExit) as e:
        psm.demo.run_demo(size="tiny", out=tmp_path)
    assert e.value.code == 130


def test_demo_refuses_bad_numbers_before_any_work(tmp_path, capsys):
    assert "--steps" in _usage_error(["demo", "--out", str(tmp_path), "--steps", "0"], capsys)
    assert "--minutes" in _usage_error(["demo", "--out", str(tmp_path), "--minutes", "nan"], capsys)
    assert not any(tmp_path.iterdir())


def test_verbose_flag_before_train_reaches_lightning(monkeypatch):
    seen = []
    monkeypatch.setattr(psm.cli, "_cmd_train", lambda args: seen.append(args.lightning_args) or 0)
    assert main(["-v", "train", "--config", "x.yaml"]) == 0
    assert seen == [["--config", "x.yaml"]]


def test_train_config_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: psm train")
    assert main(["train"]) == 2
    assert "psm train: error: give exactly one of data.manifest and data.shards" in capsys.readouterr().err
    base = ["train", "--data.manifest", str(tmp_path / "missing.parquet"), "--trainer.default_root_dir", str(tmp_path)]
    assert main([*base, "--trainer.max_steps", "-1"]) == 2
    assert "set --trainer.max_steps N" in capsys.readouterr().err


def test_data_commands_refuse_bad_inputs(tmp_path, capsys):
    manifest = str(_manifest(tmp_path))
    assert main(["data", "validate", manifest, "--no-decode", "--model", "nosuch"]) == 2
    assert "no model config named 'nosuch'" in capsys.readouterr().err
    assert main(["data", "validate", manifest, "--no-decode", "--bands", "0", "1", "2"]) == 2
    assert "1-based" in capsys.readouterr().err
    assert main(["data", "split", str(tmp_path)]) == 2  # a folder
    assert "Is a directory" in capsys.readouterr().err
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["data", "pack", manifest, str(afile)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert main(["data", "pack", manifest, str(tmp_path / "shards"), "--split", "tset"]) == 2
    assert "no rows in split 'tset' (its splits: train)" in capsys.readouterr().err
    assert not (tmp_path / "shards").exists()


def test_map_outputs_checked_before_any_work(env, tmp_path, capsys):
    common = ["map", "query", *_common(env), "--text", "birds"]
    assert main([*common, "--cmap", "nosuch", "--out", str(tmp_path / "q" / "a")]) == 2
    assert "not a matplotlib colormap" in capsys.readouterr().err
    assert main(["map", "uncertainty", *_common(env), "--cmap", "nosuch", "--out", str(tmp_path / "u")]) == 2
    assert "not a matplotlib colormap" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path)]) == 2  # a folder, where a file prefix belongs
    assert "is a file prefix" in capsys.readouterr().err
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main([*common, "--out", str(afile / "q")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["map", "top", *_common(env), "--text", "birds", "--csv", str(tmp_path)]) == 2
    assert "a folder, not a file" in capsys.readouterr().err
    assert main([*common, "--device", "nosuch", "--out", str(tmp_path / "q" / "a")]) == 2
    assert "not a torch device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing written, not even a COG
    err = _usage_error(["map", "temporal", *_common(env), "--text", "b", "--hours", "6", "--duration-ms", "0",
                        "--out", str(tmp_path / "t")], capsys)  # fmt: skip
    assert "--duration-ms" in err


def test_map_agreement_without_a_world(env, tmp_path, capsys):
    argv = ["map", "agreement", *_common(env), "--world", str(tmp_path / "none"), "--month", "5", "--hours", "6"]
    assert main(argv) == 2
    assert "is not a world" in capsys.readouterr().err


def test_map_index_refuses_bad_runs(tmp_path, capsys):
    base = ["map", "index", "--model", "psm-tiny", "--bbox", "12.5", "52.4", "12.6", "52.5", "--spacing-m", "2000",
            "--source", f"raster:{tmp_path / 'missing.tif'}"]  # fmt: skip
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main([*base, "--out", str(afile)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert main([*base, "--device", "nosuch", "--out", str(tmp_path / "ix")]) == 2
    assert "not a torch device" in capsys.readouterr().err
    # --prefetch -1 computed nothing and reported success; --retries -1 failed with an UnboundLocalError
    for option in ("--prefetch", "--retries", "--max-chunks"):
        assert option in _usage_error([*base, option, "-1", "--out", str(tmp_path / "ix")], capsys)
    assert not (tmp_path / "ix").exists()


def test_serve_refuses_bad_ports_and_a_busy_one(env, tmp_path, capsys):
    assert main(["serve", *_common(env), "--port", "70000"]) == 2
    assert "--port must be 0..65535" in capsys.readouterr().err
    assert main(["serve", *_common(env), "--tokenizer", str(tmp_path / "none")]) == 2
    assert "not a folder" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", *_common(env), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_world_commands_refuse_bad_arguments(tmp_path, capsys):
    world = str(tmp_path / "world")
    assert "--limit" in _usage_error(["world", "baseline", world, "--limit", "0"], capsys)
    assert "--workers" in _usage_error(["world", "generate", "--out", world, "--workers", "0"], capsys)
    assert "--split" in _usage_error(["world", "pack", world, str(tmp_path / "s"), "--split", "tset"], capsys)
    assert main(["world", "picture", world, str(tmp_path)]) == 2
    assert "give a file name ending in .png" in capsys.readouterr().err


def test_evaluate_and_embed_refuse_an_unknown_device(tmp_path, capsys):
    for command in ("evaluate", "embed"):
        args = [command, "--checkpoint", str(tmp_path), "--manifest", str(tmp_path / "m.csv"), "--device", "nosuch"]
        if command == "embed":
            args += ["--out", str(tmp_path / "e.parquet")]
        assert main(args) == 2
        assert "--device 'nosuch': not a torch device" in capsys.readouterr().err
