"""The robustness study (gitjax/study/: spec, grids, execute, report), on smoke grids."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gitjax import defenses, study
from gitjax.attacks import registry
from gitjax.attacks.base import AttackResult, AttackSpec
from gitjax.study import Budget, Defense, Method, Run
from gitjax.study.grids import package_path

EXPERIMENTS = study.load_experiments()
SMOKE = Budget(image_size=32, prior_steps=20, prior_batch=8, prior_lr=3e-3, prior_warmup=2, prior_eval=8,
               generator_width=32, attack_steps=5, num_images=2, local_data=32)


def _records_on_disk(out: Path, experiment: str) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / experiment).glob("*.json")}


def _check_ok_record(rec: dict) -> None:
    assert rec["status"] == "ok", rec.get("reason")
    m = rec["metrics"]
    assert math.isfinite(m["psnr"]) and 0.0 <= m["psnr"] <= 100.0, m["psnr"]
    assert -1.0 <= m["ssim"] <= 1.0, m["ssim"]
    assert 0.0 <= m["mse"] <= 1.0, m["mse"]
    # The row's PSNR is the mean of its per-image values (nothing typed in).
    assert m["psnr"] == pytest.approx(np.mean(m["psnr_per_image"]), rel=1e-6)
    assert len(m["psnr_per_image"]) == rec["leak"]["images"]
    assert m["label_acc"] is None or 0.0 <= m["label_acc"] <= 1.0


# ----------------------------------------------------------------------------- pure parts (fast)


def test_run_key_is_content_addressed():
    a = Run("noise", "mlp", "ig", Defense.of("gaussian", std=0.01), budget=SMOKE, setting="x", x=0.01)
    b = dataclasses.replace(a, setting="another label", x=5.0, panel="p")  # presentation only
    assert study.run_key(a) == study.run_key(b)
    assert len(study.run_key(a)) == 12
    assert study.run_key(a) != study.run_key(dataclasses.replace(a, defense=Defense.of("gaussian", std=0.1)))
    assert study.run_key(a) != study.run_key(dataclasses.replace(a, budget=dataclasses.replace(SMOKE, attack_steps=6)))
    # Parameter order does not matter; the JSON form round-trips.
    assert Defense.of("dpsgd", clip_norm=1.0, noise_multiplier=0.1) == Defense.of("dpsgd", noise_multiplier=0.1,
                                                                                  clip_norm=1.0)
    assert json.loads(json.dumps(study.run_to_dict(a)))["defense"] == {"name": "gaussian", "params": {"std": 0.01}}


def test_priors_are_shared_across_noise_levels_and_matched_per_level():
    lenet = study.experiment_runs("noise", "small", victims=["lenet"])
    keys = {}
    for r in lenet:
        cfg = study.prior_config(r)
        key = None if cfg is None else cfg.path if isinstance(cfg, study.BasePrior) else study.prior_key(cfg)
        keys.setdefault((r.method, r.prior_training), set()).add(key)
    assert keys[("ig", "clean")] == {None}
    assert len(keys[("coarse", "clean")]) == 1  # one clean prior for all 4 noise levels
    assert keys[("git+ig", "clean")] == keys[("coarse", "clean")]  # GIT+IG reuses Coarse-GIT's prior
    assert len(keys[("coarse", "matched")]) == 3  # one matched prior per non-zero level
    # LeNet at B = 1: the shipped converged priors, used as is (Exact-GIT does not train in the small budget).
    assert keys[("exact", "clean")] == keys[("exact+ig", "clean")] == {package_path("priors/lenet_exact")}
    assert keys[("coarse", "clean")] == {package_path("priors/lenet_coarse")}
    assert len({k for ks in keys.values() for k in ks if k}) == 2 + 3 + 1  # lti, coarse + 3 matched + exact
    assert not any(r.method == "exact" for r in study.experiment_runs("noise", "small", victims=["resnet8"]))
    assert any(r.method == "exact" and r.victim == "lenet" for r in EXPERIMENTS["noise"].build("full", False))
    matched = next(r for r in lenet if r.prior_training == "matched" and r.x == 1e-2)
    (p,) = study.prior_config(matched).perturbations
    assert (p.defense, dict(p.params)) == ("gaussian", {"std": 1e-2})


def test_base_priors_serve_the_rows_they_fit():
    from gitjax.configs import config_diff
    from gitjax.prior import load_prior

    runs = study.experiment_runs("batch", "small", victims=["lenet"])
    exact = [r for r in runs if r.method in ("exact", "exact+ig")]
    assert [r.batch_size for r in exact] == [1, 1]  # B = 4, 16 would need an Exact prior trained per B
    assert {r.base_prior for r in exact} == {"priors/lenet_exact"}
    coarse = [r for r in runs if r.method in ("coarse", "git+ig")]
    assert {(r.batch_size, r.base_prior) for r in coarse} == {(1, "priors/lenet_coarse"), (4, ""), (16, "")}
    assert not any(r.base_prior for r in runs if r.method in ("lti", "ig"))
    ig = next(r for r in runs if r.method == "ig")
    assert "base_prior" not in study.run_to_dict(ig)  # rows without a base keep their keys
    assert study.run_key(exact[0]) != study.run_key(dataclasses.replace(exact[0], base_prior=""))
    # The shipped prior's victim copy is the one the prior-free rows attack with (same fields -> same params).
    base = load_prior(package_path("priors/lenet_exact"))
    _, params, _ = importlib.import_module("gitjax.study.execute").attacker_victim(exact[0])
    jax.tree_util.tree_map(np.testing.assert_array_equal, base.victim_params, params)

    # A base for Coarse-GIT: clean rows load it; matched rows fine-tune from it with its own generator.
    path = package_path("priors/lenet_exact")
    fake = dataclasses.replace(base.config, generator=dataclasses.replace(base.config.generator, kind="coarse"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(importlib.import_module("gitjax.study.grids"), "_base_config", lambda p: fake)
        noise = study.experiment_runs("noise", "small", victims=["lenet"], base_priors={("lenet", "coarse"): path})
        clean = next(r for r in noise if r.method == "git+ig" and r.x == 0.0)
        matched = next(r for r in noise if r.prior_training == "matched" and r.x == 1e-2)
        assert clean.base_prior == matched.base_prior == path
        assert study.prior_config(clean) == study.BasePrior(path)
        tune = study.prior_config(matched)
        assert tune.init_from == path and tune.steps == matched.budget.prior_steps
        assert not {k for k in config_diff(fake, tune) if k in ("victim", "victim_kwargs", "generator", "victim_batch")}
        (p,) = tune.perturbations
        assert (p.defense, dict(p.params)) == ("gaussian", {"std": 1e-2})

    with pytest.raises(study.GitjaxError, match="VICTIM:KIND=PATH"):
        study.parse_base_priors(["lenet=runs/lenet_coarse"])
    with pytest.raises(study.GitjaxError, match="not found"):
        study.experiment_runs("noise", "small", victims=["lenet"], base_priors={("lenet", "coarse"): "/no/such/run"})
    with pytest.raises(study.GitjaxError, match="fits none.*generator kind 'exact' \\(row: 'coarse'\\)"):
        study.experiment_runs("noise", "small", victims=["lenet"], base_priors={("lenet", "coarse"): path})
    # A B = 1 base next to rows of another B only (fedavg: B = 4) is not a mistake: those rows train their own.
    fedavg = study.experiment_runs("fedavg", "small", victims=["lenet"], base_priors={("lenet", "exact"): path})
    assert fedavg and not any(r.base_prior for r in fedavg)


def test_a_base_prior_loads_as_is_with_its_record(tmp_path):
    from gitjax.prior import load_prior

    path = package_path("priors/lenet_exact")
    prior, record = study.PriorCache(tmp_path).get(study.BasePrior(path))
    jax.tree_util.tree_map(np.testing.assert_array_equal, prior.gen_params, load_prior(path).gen_params)
    made_by = json.loads((Path(path) / "made_by.json").read_text())["best"]
    assert record["train_seconds"] == 0.0 and record["base"] and record["final"]["step"] == made_by["step"]
    assert not (tmp_path / study.PRIOR_DIR).exists()  # nothing trained


def test_study_priors_use_the_presets_recipe():
    # One rule for the presets, the demo and the study: streamed data, Coarse-GIT's mirror decoder.
    from gitjax.configs import STREAM_MIX, get_preset
    from gitjax.demo import demo_config

    runs = EXPERIMENTS["noise"].build("small", False)
    coarse = next(r for r in runs if r.victim == "lenet" and r.method == "coarse")
    cfg = study.prior_config(coarse)
    preset = get_preset("lenet_coarse")
    assert cfg.stream == preset.stream == STREAM_MIX
    assert cfg.generator == preset.generator == demo_config("lenet", 10, 0).generator
    assert cfg.generator.coarse_decoder == "mirror"
    lti = study.prior_config(next(r for r in runs if r.victim == "lenet" and r.method == "lti"))
    assert lti.generator.kind == "lti" and lti.stream == STREAM_MIX
    # A dataset without source photos streams its own images, augmented.
    digits = study.prior_config(dataclasses.replace(coarse, train_dataset="digits"))
    assert digits.stream.enabled and digits.stream.photos == 0 and digits.stream.dataset > 0


def test_grids_cover_the_matrix_and_smoke_shrinks_them():
    assert set(EXPERIMENTS) == {"noise", "prune", "dpsgd", "compression", "shift", "discrepancy", "batch", "fedavg"}
    small = {n: e.build("small", False) for n, e in EXPERIMENTS.items()}
    assert {r.victim for r in small["noise"]} == {"mlp", "lenet", "resnet8", "vit"}
    assert {r.victim for r in EXPERIMENTS["noise"].build("full", False)} == {"mlp", "lenet", "resnet18", "vit"}
    assert {r.method for r in small["noise"]} == {"lti", "coarse", "exact", "ig", "git+ig", "exact+ig"}
    assert sorted({r.x for r in small["noise"]}) == [0.0, 1e-3, 1e-2, 1e-1]
    assert sorted({r.x for r in small["prune"]}) == [0.0, 0.5, 0.9, 0.99]
    assert sorted({r.batch_size for r in small["batch"]}) == [1, 4, 16]
    assert sorted({r.local_steps for r in small["fedavg"]}) == [1, 2, 5]
    assert {r.attack_dataset for r in small["shift"]} == {"patches", "textures", "faces", "digits"}
    assert {(r.discrepancy, r.discrepancy_amount) for r in small["discrepancy"]} >= {("steps", 100.0),
                                                                                     ("relative", 0.1)}
    full = EXPERIMENTS["shift"].build("full", False)
    assert {r.attack_dataset for r in full} == {"cifar10", "cifar100", "imagenet", "celeb_a"}
    assert full[0].budget.attack_steps == 24_000 and full[0].budget.num_images == 64
    for name, exp in EXPERIMENTS.items():
        smoke = exp.build("small", True)
        assert len({r.victim for r in smoke}) <= 2, name
        for panel in {r.panel for r in smoke}:
            assert len({r.setting for r in smoke if r.panel == panel}) <= 2, name
        assert all(r.budget.prior_steps <= 20 and r.budget.attack_steps <= 5 for r in smoke), name
        assert len({study.run_key(r) for r in small[name]}) == len(small[name]), f"{name}: duplicate runs"


def test_row_filter():
    keep = study.parse_filter("victim=lenet,method=ig|coarse,x=0.01")
    base = Run("noise", "lenet", "ig", x=1e-2)
    assert keep(base) and keep(dataclasses.replace(base, method="coarse"))
    assert not keep(dataclasses.replace(base, victim="mlp")) and not keep(dataclasses.replace(base, x=0.1))
    with pytest.raises(study.GitjaxError, match="unknown key"):
        study.parse_filter("colour=red")


def test_cli_lists_and_dry_runs(capsys):
    assert study.main(["list"]) == 0
    assert "noise" in capsys.readouterr().out
    assert study.main(["prune", "--smoke", "--dry-run", "--only", "victim=lenet,method=ig"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[1:3] for line in lines] == [["lenet", "ig"]] * 2  # two smoke settings
    with pytest.raises(study.GitjaxError, match="unknown experiment"):
        study.main(["nonsense", "--dry-run"])


# ----------------------------------------------------------------------------- failures and reruns (IG only)


def _boom(problem, key, config):
    raise RuntimeError("deliberate failure")


def _nan_images(problem, key, config):
    shape = (problem.batch_size, *problem.victim.input_shape)
    return AttackResult(jnp.full(shape, jnp.nan), jnp.zeros((problem.batch_size,), jnp.int32))


@dataclasses.dataclass(frozen=True)
class _NoConfig:
    pass


def _nan_defense():
    return lambda key, grads: jax.tree_util.tree_map(lambda g: g * jnp.nan, grads)


def test_failed_runs_are_recorded_and_reruns_skip_finished_ones(tmp_path, monkeypatch):
    # Failing attacks enter through the one registry, as any new attack would.
    for name, fn in (("boom", _boom), ("nan_images", _nan_images)):
        monkeypatch.setitem(registry.ATTACKS, name, AttackSpec(name, "closed-form", _NoConfig, fn, "test", "test"))
        monkeypatch.setitem(study.METHODS, name, Method(name))
    monkeypatch.setitem(defenses.DEFENSES, "nan", _nan_defense)
    base = Run("noise", "mlp", "ig", budget=SMOKE, setting="injected", x=None)
    extra = [dataclasses.replace(base, method="boom"), dataclasses.replace(base, method="nan_images"),
             dataclasses.replace(base, defense=Defense("nan"), setting="nan defence")]
    kw = dict(smoke=True, victims=["mlp"], methods=["ig"], extra_runs=extra, progress=False)

    recs = study.run_experiment("noise", "small", tmp_path, **kw)
    by_method = {(r["config"]["method"], r["setting"]): r for r in recs}
    assert len(recs) == 5 and all(r["executed"] for r in recs)
    for setting in ("std=0", "std=0.1"):
        _check_ok_record(by_method[("ig", setting)])
    assert by_method[("ig", "std=0")]["metrics"]["label_acc"] == 1.0  # iDLG reads B=1 labels off the head
    noisy = by_method[("ig", "std=0.1")]["leak"]
    assert noisy["perturbation_rms"] == pytest.approx(0.1, rel=0.05)  # absolute std, measured
    assert by_method[("ig", "std=0")]["leak"]["perturbation_rms"] == 0.0
    assert by_method[("boom", "injected")]["status"] == "failed"
    assert by_method[("boom", "injected")]["reason"] == "RuntimeError: deliberate failure"
    assert "non-finite reconstruction" in by_method[("nan_images", "injected")]["reason"]
    assert "not finite" in by_method[("ig", "nan defence")]["reason"]

    on_disk = _records_on_disk(tmp_path, "noise")
    assert len(on_disk) == 5 and sum(r["status"] == "ok" for r in on_disk.values()) == 2
    table = (tmp_path / "noise" / "table.md").read_text()
    assert "failed: RuntimeError: deliberate failure" in table
    rows = [line.split("|")[1:3] for line in table.split("## Attack seconds")[0].splitlines() if line.startswith("| mlp")]
    assert sorted(s.strip() for _, s in rows) == ["injected", "nan defence", "std=0", "std=0.1"]  # a row per setting
    psnr = by_method[("ig", "std=0.1")]["metrics"]["psnr"]
    assert f"{psnr:.2f} / " in table
    assert (tmp_path / "noise" / "psnr_vs_noise_std_mlp.png").stat().st_size > 1000

    ok_paths = [tmp_path / "noise" / f"{r['run_key']}.json" for r in recs if r["status"] == "ok"]
    mtimes = [p.stat().st_mtime_ns for p in ok_paths]
    again = study.run_experiment("noise", "small", tmp_path, **kw)
    assert [r["executed"] for r in again] == [r["status"] == "failed" for r in recs]  # only failures retried
    assert [p.stat().st_mtime_ns for p in ok_paths] == mtimes
    kept = study.run_experiment("noise", "small", tmp_path, retry_failed=False, **kw)
    assert not any(r["executed"] for r in kept)


# ----------------------------------------------------------------------------- every experiment, end to end


@pytest.mark.slow
def test_smoke_of_every_experiment(tmp_path):
    """Each experiment's smoke grid for the MLP victim, sharing one priors directory.

    Training a prior is the slow part on CPU (compilation: ~30-100 s each), so the
    methods are chosen to train five: noise runs every method (LTI, Coarse-GIT,
    Exact-GIT, IG, GIT+IG, matched prior); the other experiments run Coarse-GIT and
    GIT+IG (which runs IG) with the shared clean B=1 prior, batch adds a B=16 prior,
    and fedavg (a leak-side change) runs IG.
    """
    methods = {"noise": None, "fedavg": ["ig"]}
    for name, exp in EXPERIMENTS.items():
        full = name == "noise"
        recs = study.run_experiment(name, "small", tmp_path, smoke=True, victims=["mlp"], progress=False,
                                    methods=methods.get(name, ["coarse", "git+ig"]),
                                    only=None if full else "prior_training=clean")
        assert recs, name
        for rec in recs:
            _check_ok_record(rec)
            assert (tmp_path / name / f"{rec['run_key']}.json").exists()
        table = (tmp_path / name / "table.md").read_text()
        main_table = table.split("## Attack seconds")[0]
        assert main_table.count("\n| mlp ") == len({r["setting"] for r in recs}), name
        assert "failed:" not in main_table, name
        plots = sorted((tmp_path / name).glob("psnr_vs_*.png"))
        if exp.plot is None:
            assert not plots, name
        else:
            assert plots and all(p.stat().st_size > 1000 for p in plots), name
        if name == "noise":
            by = {(r["column"], r["setting"]): r for r in recs}
            assert {c for c, _ in by} == {"lti", "coarse", "exact", "ig", "git+ig", "exact+ig",
                                          "coarse (matched prior)"}
            # Exact-GIT inverts the MLP's first dense layer in closed form at B = 1 (no training needed).
            assert by[("exact", "std=0")]["metrics"]["psnr"] > 40.0
            assert by[("coarse (matched prior)", "std=0.1")]["prior"]["key"] != by[("coarse", "std=0.1")]["prior"]["key"]
            # Prior-free IG attacks the very victim params the priors were trained against.
            assert by[("ig", "std=0")]["leak"]["grad_rms"] == pytest.approx(
                by[("coarse", "std=0")]["leak"]["grad_rms"], rel=1e-5)
        if name == "discrepancy":
            dist = {r["setting"]: r["leak"]["param_distance"] for r in recs}
            assert dist["steps K=0"] == 0.0 and dist["steps K=100"] > 0.0
            assert dist["relative 0.1"] == pytest.approx(0.1, rel=0.2)
        if name == "shift":
            assert {r["config"]["attack_dataset"] for r in recs} == {"patches", "digits"}
        if name == "batch":
            assert {r["leak"]["images"] for r in recs if r["setting"] == "B=16"} == {16}
    # Priors are trained once and shared: clean lti/coarse/exact at B=1, one matched, coarse at B=16.
    assert len(list((tmp_path / study.PRIOR_DIR).glob("*/" + study._PRIOR_DONE))) == 5
