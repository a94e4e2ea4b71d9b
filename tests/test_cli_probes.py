"""Every bad input of issue 11's probe list: exit code 2, ONE line on stderr naming the problem, before any work.

The commands run in-process (``gitjax.cli.main``). Tripwires replace the work
(``run_attack_job``, ``train_prior``, ``run_demo``) so a probe that got past
validation fails loudly; no output folder may appear.
"""

import jax
import numpy as np
import pytest

from gitjax import cli
from gitjax.cli import experiment_exit_code, main


@pytest.fixture
def tripwires(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("work started although the input was bad")

    import gitjax.demo
    import gitjax.train

    monkeypatch.setattr(cli, "run_attack_job", boom)
    monkeypatch.setattr(gitjax.train, "train_prior", boom)
    monkeypatch.setattr(gitjax.demo, "run_demo", boom)


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("gitjax: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


ATTACK = ["attack", "--method", "ig", "--victim", "mlp"]

PROBES = [
    (ATTACK[:-2] + ["--victim", "nope"], ["unknown victim model 'nope'", "--victim", "lenet"]),
    (ATTACK + ["--data", "nope"], ["unknown dataset 'nope'", "--data", "patches"]),
    (ATTACK + ["--split", "nope"], ["unknown split 'nope'", "train, test"]),
    (ATTACK + ["--batch-size", "0"], ["--batch-size must be a whole number >= 1, got 0"]),
    (ATTACK + ["--num-images", "0"], ["--num-images must be a whole number >= 1, got 0"]),
    (ATTACK + ["--num-images", "3", "--batch-size", "2"], ["--num-images 3 is not a multiple of --batch-size 2"]),
    (ATTACK + ["--steps", "0"], ["--steps must be"]),
    (ATTACK + ["--defense", "gaussian", "--defense-arg", "std=-1"], ["std must be >= 0, got -1"]),
    (ATTACK + ["--defense", "gaussian", "--defense-arg", "std=abc"], ["std must be a number, got 'abc'"]),
    (ATTACK + ["--defense", "gaussian", "--defense-arg", "std=NaN"], ["std must be finite"]),
    (ATTACK + ["--defense", "gaussian", "--defense-arg", "sdt=0.1"], ["no hyper-parameter 'sdt'", "takes: std"]),
    (ATTACK + ["--defense", "gaussian"], ["needs 'std'"]),
    (ATTACK + ["--defense", "gaussian", "--defense-arg", "std"], ["expects KEY=VALUE"]),
    (ATTACK + ["--defense", "nope"], ["unknown defence 'nope'", "gaussian"]),
    (ATTACK + ["--defense", "prune", "--defense-arg", "ratio=1.5"], ["ratio must be in [0, 1), got 1.5"]),
    (ATTACK + ["--defense", "dpsgd", "--defense-arg", "clip_norm=1", "--defense-arg", "noise_multiplier=1"],
     ["per-example gradients"]),
    (ATTACK + ["--checkpoint", "does-not-exist/"], ["--method ig does not use a prior", "drop --checkpoint"]),
    (["attack", "--method", "git", "--checkpoint", "does-not-exist/"], ["does-not-exist", "does not exist"]),
    (["attack", "--method", "git+ig"], ["--method git+ig needs --checkpoint"]),
    (["attack", "--method", "nope"], ["unknown attack 'nope'", "git+ig"]),
    (["train-prior", "--workdir", "{tmp}/w", "--victim", "nope"], ["unknown victim model 'nope'"]),
    (["train-prior", "--workdir", "{tmp}/w", "--data", "nope"], ["unknown dataset 'nope'"]),
    (["train-prior", "--workdir", "{tmp}/w", "--batch-size", "0"], ["--batch-size must be"]),
    (["train-prior", "--workdir", "{tmp}/w", "--steps", "0"], ["--steps must be"]),
    (["train-prior", "--workdir", "{tmp}/w", "--noise-std", "-1"],
     ["--noise-std must be a finite number >= 0, got -1"]),
    (["train-prior", "--workdir", "{tmp}/w", "--prune-ratio", "1"], ["--prune-ratio must be", "got 1"]),
    (["train-prior", "--workdir", "{tmp}/w", "--lr", "0"], ["--lr must be a finite number > 0"]),
    (["train-prior", "--workdir", "{tmp}/w", "--preset", "nope"], ["unknown preset 'nope'", "tiny"]),
    (["train-prior", "--workdir", "{tmp}/w", "--data-dir", "{tmp}/nowhere"], ["--data-dir", "is not a folder"]),
    (["demo", "--victim", "nope", "--out", "{tmp}/w"], ["unknown victim model 'nope'"]),
    (["demo", "--num-images", "0", "--out", "{tmp}/w"], ["--num-images must be"]),
    (["models", "--input-shape", "0", "0", "0"], ["--input-shape", ">= 1, got 0"]),
    (["bench", "nope"], ["unknown benchmark 'nope'"]),
    # Output folders that are files, checked before the work (was: after it).
    (ATTACK + ["--out", "{tmp}/file"], ["--out", "is not a folder"]),
    (ATTACK + ["--out", "{tmp}/file/sub"], ["its parent", "is a file"]),
    (["train-prior", "--workdir", "{tmp}/file"], ["--workdir", "is not a folder"]),
    (["demo", "--out", "{tmp}/file"], ["--out", "is not a folder"]),
]


@pytest.mark.parametrize("argv,needles", PROBES, ids=[" ".join(a) for a, _ in PROBES])
def test_probe_is_one_line_exit_2_before_work(argv, needles, tmp_path, capsys, tripwires):
    (tmp_path / "file").write_text("not a folder")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["--quiet", *argv]) == 2
    _one_error_line(capsys, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing created


def test_tfds_dataset_not_prepared_names_the_real_flag(tmp_path, capsys):
    rc = main(["--quiet", "attack", "--method", "ig", "--victim", "mlp", "--data", "cifar10", "--num-images", "1",
               "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert rc == 2
    line = _one_error_line(capsys, "cifar10", "--data-dir", str(tmp_path))
    assert "never downloads" in line
    assert not (tmp_path / "out").exists()


def test_train_prior_data_dir_reaches_the_loader(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", "/unused")  # restored after the test (the CLI sets it from --data-dir)
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    rc = main(["--quiet", "train-prior", "--workdir", str(tmp_path / "w"), "--preset", "tiny", "--data", "cifar10",
               "--data-dir", str(data_dir)])
    assert rc == 2
    _one_error_line(capsys, "cifar10", f"data_dir searched: '{data_dir}'", "--data-dir")
    assert not (tmp_path / "w").exists()


def test_non_finite_leaked_gradient_is_one_line(monkeypatch, tmp_path, capsys):
    from gitjax import defenses

    def nan_defense():
        return defenses._as_transform(lambda key, g: jax.tree_util.tree_map(lambda x: x * np.nan, g), "nan")

    monkeypatch.setitem(defenses.DEFENSES, "nan", nan_defense)
    rc = main(["--quiet", "attack", "--method", "dlg", "--victim", "mlp", "--num-images", "1", "--steps", "1",
               "--defense", "nan", "--out", str(tmp_path / "out")])
    assert rc == 2
    _one_error_line(capsys, "NaN/inf", "batch 0")
    assert not (tmp_path / "out").exists()


def test_too_many_images_for_the_split(tmp_path, capsys):
    rc = main(["--quiet", "attack", "--method", "analytic", "--victim", "mlp", "--num-images", "100000",
               "--out", str(tmp_path / "out")])
    assert rc == 2
    _one_error_line(capsys, "--num-images 100000", "pass --num-images <=")
    assert not (tmp_path / "out").exists()


def test_experiment_exit_code_reflects_failed_runs(monkeypatch, capsys):
    assert experiment_exit_code(0) == 0 and experiment_exit_code(None) == 0 and experiment_exit_code(3) == 3
    assert experiment_exit_code([{"status": "ok"}]) == 0
    assert experiment_exit_code([{"status": "ok"}, {"status": "failed", "error": "boom"}]) == 1
    assert "1 of 2 experiment runs failed" in capsys.readouterr().err

    import gitjax.study

    monkeypatch.setattr(gitjax.study, "main", lambda argv: [{"status": "ok"}, {"status": "failed"}])
    assert main(["experiment", "noise", "--smoke"]) == 1
