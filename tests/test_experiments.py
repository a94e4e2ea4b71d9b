"""The evaluation scripts score existing priors, with oracle rows (on the shipped LeNet prior)."""

from __future__ import annotations

import json
from pathlib import Path

from experiments import compare_generators, git_ig_refine

SHIPPED = str(Path(__file__).resolve().parents[1] / "gitjax" / "priors" / "lenet_exact")
ORACLES = {"oracle: mean image", "oracle: mean colour", "oracle: blur 1px", "oracle: blur 2px"}


def test_compare_generators_scores_given_priors_with_oracle_rows(tmp_path):
    assert compare_generators.main(["--prior", f"exact={SHIPPED}", "--num-images", "4", "--out", str(tmp_path),
                                    "--quiet"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    methods = [r["generator"] for r in rows]
    assert methods[0] == "exact" and set(methods[1:]) == ORACLES
    exact = rows[0]
    # The shipped Exact-GIT prior inverts clean LeNet gradients far above every oracle.
    assert exact["psnr"] > max(r["psnr"] for r in rows[1:]) + 3.0
    assert (tmp_path / "table.md").read_text().count("oracle:") == 4 and (tmp_path / "lenet.png").exists()


def test_git_ig_refine_reports_margin_and_oracles():
    out = git_ig_refine.main(["--checkpoint", SHIPPED, "--num-images", "2", "--steps", "4"])
    assert set(out["mean_psnr"]) == {"git", "ig", "git+ig"} and set(out["oracles"]) == ORACLES
    # The refinement keeps an exact start: never below GIT one-shot by more than rounding.
    assert out["margin"]["git+ig"] >= -0.2


def test_robust_check_writes_one_column_per_condition_and_the_gain_row(tmp_path):
    from experiments import robust_check

    out = robust_check.main(["--prior", f"exact={SHIPPED}", "--num-images", "2", "--steps", "3",
                             "--conditions", "clean,noise-1e-2", "--out", str(tmp_path)])
    assert set(out["psnr"]) == {"ig", "git (exact)", "git+ig (exact)"}
    assert all(set(v) == {"clean", "noise-1e-2"} for v in out["psnr"].values())
    assert set(out["oracles"]) == ORACLES
    # Exact-GIT inverts the clean gradient; 3 IG steps do not: the gain row says so.
    assert out["best_git_minus_ig"]["clean"] > 10.0
    assert "best GIT - IG" in (tmp_path / "table.md").read_text()
