"""The command line as a user meets it: listing, attacks end to end, clear one-line errors."""

import json

import pytest

import gitjax
from gitjax.cli import main


def test_public_api_resolves():
    for name in gitjax.__all__:
        assert getattr(gitjax, name) is not None


def test_models_lists_every_victim(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("mlp", "lenet", "resnet8", "resnet18", "vit"):
        assert name in out
    assert "11173962" in out  # ResNet-18's parameter count


def test_attack_analytic_writes_png_and_json(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["--quiet", "attack", "--method", "analytic", "--victim", "mlp", "--num-images", "2",
               "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert summary["psnr"] > 60.0  # the first dense layer leaks its input exactly
    assert (out / "reconstruction.png").stat().st_size > 0
    assert "analytic" in capsys.readouterr().out


def test_unknown_attack_is_one_clear_line(capsys):
    assert main(["attack", "--method", "nope", "--victim", "mlp"]) == 2
    err = capsys.readouterr().err
    assert "unknown attack 'nope'" in err and "Traceback" not in err


def test_git_attack_without_checkpoint_says_so():
    with pytest.raises(SystemExit, match="needs --checkpoint"):
        main(["attack", "--method", "git"])
