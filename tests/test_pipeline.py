"""The one pipeline and the one registry: every family end to end on a tiny MLP, the CLI's git path, the
package's independence from ``experiments/``."""

from __future__ import annotations

import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gitjax import pipeline, study
from gitjax.attacks import ATTACKS, AttackSpec
from gitjax.attacks.ig import IGConfig
from gitjax.cli import build_parser, main
from gitjax.configs import PRESETS
from gitjax.generators import build_generator
from gitjax.prior import Prior, save_prior
from gitjax.types import GitjaxError, NonFiniteGradientError
from gitjax.victims import make_victim

TINY = PRESETS["tiny"]
S = 32  # the tiny preset's MLP(32) on 32x32 patches
ORACLES = ["oracle: mean image", "oracle: mean colour", "oracle: blur 1px", "oracle: blur 2px"]


@pytest.fixture(scope="module")
def attacker() -> pipeline.Attacker:
    """An MLP(32) victim and an untrained (seeded) Coarse-GIT prior for it: the learned route needs no training."""
    victim = make_victim(TINY.victim, input_shape=(S, S, 3), **dict(TINY.victim_kwargs))
    params, state = jax.jit(victim.init)(jax.random.key(0))
    generator = build_generator(TINY.generator, victim, params)
    grads_1 = jax.tree_util.tree_map(lambda p: jnp.zeros((1,) + p.shape, p.dtype), params)
    gen_params = jax.jit(generator.init)(jax.random.key(1, impl="rbg"), grads_1, params)["params"]
    prior = Prior(gen_params, params, state, generator, victim, TINY)
    rng = np.random.default_rng(0)
    return pipeline.Attacker(victim, params, state, prior, rng.uniform(size=(S, S, 3)).astype(np.float32))


@pytest.fixture(scope="module")
def private(attacker):
    rng = np.random.default_rng(1)
    x_NxBxHxWxC = rng.uniform(size=(2, 1, S, S, 3)).astype(np.float32)
    y_NxB = np.array([[3], [7]], np.int32)
    return x_NxBxHxWxC, y_NxB


def test_registry_is_explicit_and_covers_the_cli():
    help_text = next(a.help for a in build_parser()._subparsers._group_actions[0].choices["attack"]._actions
                     if "--method" in a.option_strings)
    listed = set(re.findall(r"[a-z][a-z0-9+\-]*", help_text))
    assert listed <= set(ATTACKS), listed - set(ATTACKS)
    for name, spec in ATTACKS.items():
        assert isinstance(spec, AttackSpec) and spec.name == name
        spec.config_cls()  # defaults construct
        assert spec.vmappable == (spec.reconstruct is not None)
        assert (spec.family == "learned") == name.startswith("git"), name
    assert {n for n, s in ATTACKS.items() if s.vmappable} >= {"dlg", "idlg", "ig", "ig+bn"}
    source = (pathlib.Path(pipeline.__file__).parent / "attacks" / "__init__.py").read_text()
    assert "ModuleNotFoundError" not in source and "register(" not in source


def test_package_never_imports_experiments_or_edits_sys_path():
    root = pathlib.Path(pipeline.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        text = path.read_text()
        if re.search(r"^\s*(from|import)\s+experiments\b", text, re.M) or "sys.path" in text or \
                re.search(r"import_module\(\s*[\"']experiments", text):
            offenders.append(str(path.relative_to(root)))
    assert not offenders, offenders


@pytest.mark.slow
def test_one_of_each_family_end_to_end(attacker, private):
    x, y = private
    # closed form: the MLP's first dense layer leaks its input exactly (B = 1).
    res = pipeline.run_pipeline("analytic", attacker, x, y, jax.random.key(0))
    assert res.scores["psnr"] > 60.0 and res.scores["label_acc"] == 1.0
    rows = res.rows("analytic")
    assert [r["method"] for r in rows] == ["analytic", *ORACLES]
    # optimisation, vmapped over the N = 2 gradients; labels recovered from the head (iDLG rule at B = 1).
    res = pipeline.run_pipeline("ig", attacker, x, y, jax.random.key(0), config=IGConfig(steps=3, record_every=1),
                                record_truth=True)
    assert res.reconstruction.images.shape == x.shape and res.scores["label_acc"] == 1.0
    assert np.shape(res.reconstruction.info["psnr"]) == (2, 3)
    # learned: one-shot, vmapped, equals the one-problem-at-a-time registry path.
    grads_N = pipeline.leak(attacker.victim, attacker.params, attacker.state, x, y, jax.random.key(0))
    vmapped = pipeline.reconstruct("git", attacker, grads_N, jax.random.key(0), batch_size=1)
    single = pipeline.reconstruct("git", attacker, grads_N, jax.random.key(0), batch_size=1, vmapped=False)
    np.testing.assert_allclose(vmapped.images, single.images, atol=1e-5)
    assert vmapped.labels is None and vmapped.info["iterations"] == 0
    # learned + refinement: IG started from GIT's output.
    from gitjax.attacks.git import GITConfig

    refined = pipeline.reconstruct("git+ig", attacker, grads_N, jax.random.key(0), batch_size=1,
                                   config=GITConfig(refine_config=IGConfig(steps=2, lr=0.05, record_every=0)))
    assert refined.images.shape == x.shape and refined.info["iterations"] == 2
    assert np.array_equal(refined.labels, y)
    # Both paths apply refine_setup: one random restart beside the run from GIT's output.
    single = pipeline.reconstruct("git+ig", attacker, grads_N, jax.random.key(0), batch_size=1, vmapped=False,
                                  config=GITConfig(refine_config=IGConfig(steps=2, record_every=0)))
    assert refined.info["restart_grad_distance"].shape == (len(x), 2)
    assert all(len(d) == 2 for d in single.info["restart_grad_distance"])


def test_bad_gradients_and_missing_prior_fail_before_work(attacker, private):
    x, y = private
    grads_N = pipeline.leak(attacker.victim, attacker.params, attacker.state, x, y, jax.random.key(0))
    bad = jax.tree_util.tree_map(lambda g: g.at[0].set(jnp.nan), grads_N)
    with pytest.raises(NonFiniteGradientError, match="NaN/inf"):
        pipeline.reconstruct("git", attacker, bad, jax.random.key(0), batch_size=1)
    no_prior = pipeline.Attacker(attacker.victim, attacker.params, attacker.state)
    with pytest.raises(GitjaxError, match="needs a trained prior"):
        pipeline.reconstruct("git", no_prior, grads_N, jax.random.key(0), batch_size=1)


@pytest.mark.slow
def test_cli_attack_git_and_git_ig_with_a_saved_prior(attacker, tmp_path, capsys):
    """``gitjax attack --method git|git+ig --checkpoint DIR`` as the README shows (a saved, untrained prior)."""
    run = save_prior(attacker.prior, tmp_path / "prior")
    for method, extra in (("git", []), ("git+ig", ["--steps", "2"])):
        out = tmp_path / method
        rc = main(["--quiet", "attack", "--method", method, "--checkpoint", str(run), "--num-images", "2",
                   "--out", str(out), *extra])
        assert rc == 0, method
        detail = json.loads((out / "metrics.json").read_text())
        assert detail["summary"]["images"] == 2 and np.isfinite(detail["summary"]["psnr"])
        assert [o["method"] for o in detail["oracles"]] == ORACLES
        assert "oracle: blur 2px" in (out / "table.md").read_text()
    assert "oracle: mean colour" in capsys.readouterr().out


def test_experiment_exits_nonzero_when_a_run_failed(tmp_path, monkeypatch, capsys):
    def boom(problem, key, config):
        raise RuntimeError("deliberate failure")

    monkeypatch.setitem(ATTACKS, "boom", AttackSpec("boom", "closed-form", IGConfig, boom, "test", "test"))
    monkeypatch.setitem(study.METHODS, "ig", study.Method("boom"))
    rc = study.main(["noise", "--smoke", "--only", "victim=mlp,method=ig,x=0", "--out", str(tmp_path), "--quiet"])
    assert rc == 1
    assert "failed" in capsys.readouterr().err
