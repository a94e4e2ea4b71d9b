"""The evaluation scripts score existing priors, with oracle rows.

The prior: the ``tiny`` preset (MLP victim) with Exact-GIT, 2 training steps. Exact-GIT
inverts a dense first layer exactly at B = 1 (no CG), so it is near-exact from init and
compiles in seconds, which gives the scripts' outputs a sharp, checkable shape.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from experiments import compare_generators, exact_cg_iters, git_ig_refine
from gitjax.configs import get_preset
from gitjax.generators import GeneratorConfig
from gitjax.train import train_prior

ORACLES = {"oracle: mean image", "oracle: mean colour", "oracle: blur 1px", "oracle: blur 2px"}


@pytest.fixture(scope="module")
def exact_mlp_prior(tmp_path_factory) -> str:
    workdir = tmp_path_factory.mktemp("exp") / "exact-mlp"
    config = dataclasses.replace(get_preset("tiny"), generator=GeneratorConfig(kind="exact", batch_size=1, width=32),
                                 steps=2, warmup=1, eval_every=0, log_every=1)
    train_prior(config, workdir, progress=False)
    return str(workdir)


def test_compare_generators_scores_given_priors_with_oracle_rows(exact_mlp_prior, tmp_path):
    assert compare_generators.main(["--prior", f"exact={exact_mlp_prior}", "--num-images", "4", "--out", str(tmp_path),
                                    "--quiet"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    methods = [r["generator"] for r in rows]
    assert methods[0] == "exact" and set(methods[1:]) == ORACLES
    exact = rows[0]
    # Exact-GIT inverts clean MLP gradients far above every oracle.
    assert exact["psnr"] > max(r["psnr"] for r in rows[1:]) + 3.0
    assert (tmp_path / "table.md").read_text().count("oracle:") == 4 and (tmp_path / "mlp.png").exists()


def test_git_ig_refine_reports_margin_and_oracles(exact_mlp_prior):
    out = git_ig_refine.main(["--checkpoint", exact_mlp_prior, "--num-images", "2", "--steps", "4",
                              "--variants", "git+ig,holdout=0"])
    assert set(out["mean_psnr"]) == {"git", "ig", "git+ig", "holdout=0"} and set(out["oracles"]) == ORACLES
    # The refinement keeps an exact start: never below GIT one-shot by more than rounding, with
    # held-out selection (the default: the start is judged on entries it never fitted) or without.
    assert out["margin"]["git+ig"] >= -0.2 and out["margin"]["holdout=0"] >= -0.2
    with pytest.raises(SystemExit, match="holdout=F"):
        git_ig_refine.variant_config("nonsense", 4)
    assert git_ig_refine.variant_config("git+ig", 4).holdout == 0.2
    assert git_ig_refine.variant_config("holdout=0.3", 4).holdout == 0.3
    assert git_ig_refine.variant_config("holdout=0", 4).holdout == 0.0


def test_exact_cg_iters_layers_says_where_the_error_enters(exact_mlp_prior):
    """--layers: per dense layer, the inversion's relative error; the MLP's first layer (the image) is
    exact on clean gradients, and gradient noise raises every layer's error."""
    common = ["--checkpoint", exact_mlp_prior, "--iters", "4", "--num-images", "2", "--split", "train", "--layers"]
    (clean,) = exact_cg_iters.main(common)
    (noisy,) = exact_cg_iters.main(common + ["--noise-std", "1e-2"])
    assert set(clean["layer_rel_error"]) == set(noisy["layer_rel_error"]) and len(clean["layer_rel_error"]) >= 2
    first = min(clean["layer_rel_error"])  # dense0: the image's layer
    assert clean["layer_rel_error"][first] < 1e-2 and clean["psnr"] > 40.0
    assert all(noisy["layer_rel_error"][k] > clean["layer_rel_error"][k] for k in clean["layer_rel_error"])
    assert all(v > 0 for v in clean["grad_rms"].values()) and set(clean["oracles"]) == ORACLES


def test_exact_cg_iters_read_masks_cover_what_a_strided_conv_reads():
    """A ResNet-8's 1x1 stride-2 projections read a quarter of their input; 3x3 convs read everything."""
    from types import SimpleNamespace

    from gitjax.trace import trace_victim
    from gitjax.victims import make_victim

    plan = trace_victim(make_victim("resnet8", input_shape=(16, 16, 3)))
    masks = exact_cg_iters._read_masks(SimpleNamespace(generator=SimpleNamespace(plan=plan)))
    assert set(masks) == {"stage1_block0_proj", "stage2_block0_proj"}
    for mask in masks.values():
        assert mask.mean() == 0.25 and mask[0::2, 0::2].all() and not mask[1::2].any()


def test_robust_check_writes_one_column_per_condition_and_the_gain_row(exact_mlp_prior, tmp_path):
    from experiments import robust_check

    out = robust_check.main(["--prior", f"exact={exact_mlp_prior}", "--num-images", "2", "--steps", "3",
                             "--conditions", "clean,noise-1e-2", "--out", str(tmp_path), "--known-noise",
                             "--holdout", "0"])
    known = {"ig (known noise)", "git+ig (exact, known noise)"}
    assert set(out["psnr"]) == {"ig", "git (exact)", "git+ig (exact)", "git+ig (exact, holdout 0)"} | known
    assert all(set(v) == ({"noise-1e-2"} if k in known else {"clean", "noise-1e-2"}) for k, v in out["psnr"].items())
    assert set(out["oracles"]) == ORACLES
    # Exact-GIT inverts the clean gradient; 3 IG steps do not: the gain row says so.
    assert out["best_git_minus_ig"]["clean"] > 10.0
    assert "best GIT - IG" in (tmp_path / "table.md").read_text()


def test_convergence_runs_git_ig_refinement_from_a_given_prior(exact_mlp_prior, tmp_path):
    from experiments import convergence

    assert convergence.main(["--checkpoint", exact_mlp_prior, "--steps", "6", "--record-every", "2",
                             "--num-images", "2", "--out", str(tmp_path), "--quiet"]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    rows = {r["run"]: r for r in result["rows"]}
    assert {"ig", "git-init", "git-reg", "git-both", "git one-shot"} | ORACLES == set(rows)
    assert all(r["victim"] == "mlp" and r["prior"] == "exact" for r in rows.values())
    # git-init is GIT+IG's refinement: an exact start is kept, so it ends where GIT one-shot is.
    assert rows["git-init"]["final_psnr"] >= rows["git one-shot"]["final_psnr"] - 0.2
    assert rows["git-init"]["final_psnr"] > rows["ig"]["final_psnr"] + 10.0
    assert rows["git-both"]["final_psnr"] > rows["ig"]["final_psnr"] + 10.0  # the same start, plus the pull to it
    assert list(result["curves"]) == ["mlp/exact"] and (tmp_path / "convergence_mlp_exact.png").exists()


def test_robust_check_ig_support_modes_reach_ig_and_the_refinement():
    from experiments.robust_check import with_ig_support
    from gitjax.pipeline import method_config

    ig = with_ig_support(method_config("ig", steps=5), "off")
    assert ig.support_above == 0.0 and ig.support_gap == 0.0 and ig.steps == 5
    frac = with_ig_support(method_config("ig", steps=5), "frac")
    assert frac.support_gap == 0.0 and frac.support_above > 0
    ref = with_ig_support(method_config("git+ig", checkpoint="ckpt", steps=5), "mask").refine_config
    assert ref.support_bound is False and ref.support_above > 0 and ref.steps == 5
    git = method_config("git", checkpoint="ckpt")
    assert with_ig_support(git, "off") == git  # one-shot GIT has no matching to change
