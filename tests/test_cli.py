"""The command line as a user meets it: listing, attacks end to end, clear one-line errors."""

import dataclasses
import json
import logging
import math
import shutil

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


def test_git_attack_without_checkpoint_says_so(capsys):
    assert main(["attack", "--method", "git"]) == 2
    assert "needs --checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["--method", "ig"], "pass --defense gaussian --defense-arg std=S"),
    (["--method", "dlg", "--defense", "gaussian", "--defense-arg", "std=0.01"], "cannot use a known noise level"),
])
def test_known_noise_misuse_is_one_line(argv, needle, capsys):
    assert main(["attack", "--victim", "mlp", "--known-noise", *argv]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and needle in err[0], err


def test_known_noise_reaches_ig_and_the_git_refinement():
    from gitjax.cli import AttackJob, attack_config

    job = AttackJob("git+ig", "mlp", "patches", "test", 2, 1, 0, 5, "ckpt", "gaussian", {"std": 0.01}, "o",
                    False, None, True)
    cfg = attack_config(job)
    assert cfg.refine_config.noise_std == 0.01 and cfg.refine_config.steps == 5
    assert attack_config(dataclasses.replace(job, method="ig")).noise_std == 0.01
    assert attack_config(dataclasses.replace(job, known_noise=False)).refine_config.noise_std == 0.0
    held = attack_config(dataclasses.replace(job, known_noise=False, holdout=0.3))
    assert held.refine_config.holdout == 0.3 and held.refine_config.noise_std == 0.0


def test_git_ig_holds_out_by_default_and_holdout_0_turns_it_off():
    from gitjax.attacks.git import refine_setup
    from gitjax.cli import AttackJob, attack_config

    job = AttackJob("git+ig", "mlp", "patches", "test", 2, 1, 0, 5, "ckpt", "gaussian", {"std": 0.01}, "o", False)

    def rule(**kw):  # (holdout, noise_std) of the refinement the attack runs
        cfg = refine_setup(attack_config(dataclasses.replace(job, **kw)))[1]
        return cfg.holdout, cfg.noise_std

    assert rule() == (0.2, 0.0)
    assert rule(holdout=0.0) == (0.0, 0.0)
    assert rule(holdout=0.5) == (0.5, 0.0)
    assert rule(known_noise=True) == (0.0, 0.01)  # a known noise level is the selection rule instead
    assert attack_config(dataclasses.replace(job, method="ig")).holdout == 0.0  # IG alone: off by default


@pytest.mark.parametrize("argv,needle", [
    (["--method", "dlg", "--holdout", "0.2"], "cannot use held-out selection"),
    (["--method", "ig", "--holdout", "1.5"], "--holdout must be a finite number in [0, 1)"),
    (["--method", "ig", "--holdout", "0.2", "--known-noise", "--defense", "gaussian", "--defense-arg", "std=0.01"],
     "use one"),
])
def test_holdout_misuse_is_one_line(argv, needle, capsys):
    assert main(["attack", "--victim", "mlp", *argv]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and needle in err[0], err


# ----------------------------------------------------------------------------- train-prior -> attack, end to end

TINY_STEPS = 10


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`gitjax train-prior --preset tiny --workdir W` (10 steps), as the README shows it."""
    workdir = tmp_path_factory.mktemp("cli") / "tiny"
    assert main(["--quiet", "train-prior", "--preset", "tiny", "--workdir", str(workdir),
                 "--steps", str(TINY_STEPS)]) == 0
    assert (workdir / "checkpoints" / str(TINY_STEPS)).is_dir()
    return workdir


def _attack_summary(out, capsys):
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert (out / "reconstruction.png").stat().st_size > 0
    assert math.isfinite(summary["psnr"]) and math.isfinite(summary["mse"])
    assert f"wrote {out}/reconstruction.png" in capsys.readouterr().out
    return summary


@pytest.mark.parametrize("method,extra", [("git", []), ("git+ig", ["--steps", "3"])])
def test_train_prior_then_git_attacks_through_the_cli(tiny_run, tmp_path, capsys, method, extra):
    out = tmp_path / method
    rc = main(["--quiet", "attack", "--method", method, "--checkpoint", str(tiny_run), "--num-images", "2",
               "--out", str(out), *extra])
    assert rc == 0, capsys.readouterr().err
    summary = _attack_summary(out, capsys)
    assert summary["method"] == method and summary["victim"] == "mlp" and summary["images"] == 2
    assert summary["iterations"] == (3 if method == "git+ig" else 0)


def test_library_logs_are_quiet_unless_verbose(tiny_run, tmp_path, capsys, caplog):
    """Orbax's notes on read-only checkpoints ("Given directory is read only") only with --verbose."""
    def absl_warnings(verbose):
        run = tmp_path / f"copy{verbose}"  # a fresh path: the prior loader caches by path
        shutil.copytree(tiny_run, run)
        caplog.clear()
        argv = ["--quiet", *(["--verbose"] if verbose else []), "attack", "--method", "git", "--checkpoint",
                str(run), "--num-images", "1", "--out", str(tmp_path / f"out{verbose}")]
        assert main(argv) == 0
        return [r.getMessage() for r in caplog.records if r.name == "absl" and r.levelno >= logging.WARNING]

    assert absl_warnings(verbose=False) == []
    assert any("read only" in m for m in absl_warnings(verbose=True))


def test_attack_falls_back_past_an_empty_newest_checkpoint(tiny_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    (run / "checkpoints" / str(TINY_STEPS + 5)).mkdir()  # e.g. a save killed before it wrote anything
    out = tmp_path / "out"
    rc = main(["--quiet", "attack", "--method", "git", "--checkpoint", str(run), "--num-images", "1",
               "--out", str(out)])
    assert rc == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    warned = [ln for ln in err if ln.startswith("gitjax: warning: ")]
    assert len(warned) == 1 and f"step {TINY_STEPS + 5}" in warned[0] and "empty step folder" in warned[0], err
    assert (out / "metrics.json").exists()


def test_rerun_with_more_steps_says_it_continues(tiny_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    assert main(["--quiet", "train-prior", "--preset", "tiny", "--workdir", str(run), "--steps", "12"]) == 0
    err = capsys.readouterr().err
    assert f"gitjax: continuing {run} from step {TINY_STEPS} to step 12" in err
    assert (run / "checkpoints" / "12").is_dir()


def test_rerun_of_a_finished_run_says_nothing_to_train(tiny_run, capsys):
    assert main(["--quiet", "train-prior", "--preset", "tiny", "--workdir", str(tiny_run),
                 "--steps", str(TINY_STEPS)]) == 0
    assert f"already trained to step {TINY_STEPS}" in capsys.readouterr().err


def test_git_attack_with_another_batch_size_is_one_line_before_work(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["--quiet", "attack", "--method", "git", "--checkpoint", str(tiny_run), "--num-images", "2",
               "--batch-size", "2", "--out", str(out)])
    assert rc == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "reconstructs batches of 1 images" in err[0] and "--batch-size 1" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("flags,needle", [
    (["--no-resume"], "already holds a run (checkpoint at step"),
    (["--lr", "0.5"], "holds a run with another config (lr: saved"),
])
def test_existing_run_conflicts_are_one_line(tiny_run, capsys, flags, needle):
    argv = ["--quiet", "train-prior", "--preset", "tiny", "--workdir", str(tiny_run), "--steps", str(TINY_STEPS)]
    assert main([*argv, *flags]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and needle in err[0], err


def test_parser_choice_literals_match_the_library():
    """cli.py spells some choices as literals (importing the library at parse time would import jax)."""
    from gitjax.cli import build_parser
    from gitjax.demo import PRIOR_CHOICES
    from gitjax.generators import GENERATORS

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for command in ("demo", "train-prior"):
        opts = {a.dest: a for a in sub.choices[command]._actions}
        assert tuple(opts["generator"].choices) == GENERATORS
    demo = {a.dest: a for a in sub.choices["demo"]._actions}
    assert tuple(demo["prior"].choices) == PRIOR_CHOICES


def test_init_from_a_missing_folder_is_one_line_before_work(tmp_path, capsys):
    assert main(["train-prior", "--preset", "tiny", "--workdir", str(tmp_path / "w"),
                 "--init-from", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--init-from" in err[0] and "not a folder" in err[0]
    assert not (tmp_path / "w").exists()
