"""``gitjax demo``: the shipped prior path end to end, the prior choice's errors, and the train path."""

import json

import numpy as np
import pytest

from gitjax import demo
from gitjax.metrics import ORACLE_MEAN_COLOUR
from gitjax.types import GitjaxError

SHIPPED = demo.shipped_prior_dir("lenet", "exact")


@pytest.mark.skipif(SHIPPED is None, reason="no shipped LeNet Exact-GIT prior in this checkout")
def test_demo_with_the_shipped_prior_recovers_structure(tmp_path):
    """The default demo (shipped Exact-GIT prior): files written, and GIT one-shot beats every colour oracle.

    4 held-out test patches (the first of the demo's own draw). The margin is over the per-image mean-colour
    oracle, i.e. structure, not colour: measured in made_by.json's run and README (asserted >= 2 dB).
    """
    summary = demo.run_demo(tmp_path, ig_steps=20, num_images=4, progress=False)
    assert summary["prior"] == "shipped" and summary["generator"] == "exact"
    rows = {r["method"]: r for r in summary["results"]}
    assert {"git", "ig", "git+ig", ORACLE_MEAN_COLOUR} <= set(rows), rows.keys()
    assert rows["git"]["psnr"] >= rows[ORACLE_MEAN_COLOUR]["psnr"] + 2.0, rows
    # GIT+IG keeps a good start: never clearly below GIT one-shot.
    assert rows["git+ig"]["psnr"] >= rows["git"]["psnr"] - 0.2, rows
    assert (tmp_path / "reconstruction.png").stat().st_size > 1000
    assert json.loads((tmp_path / "metrics.json").read_text())["results"]
    assert not (tmp_path / "prior").exists()  # nothing trained


def test_prior_choice_errors_are_one_line():
    with pytest.raises(GitjaxError, match="no prior is shipped for victim 'mlp'"):
        demo.check_prior_choice("shipped", "mlp", "coarse")
    with pytest.raises(GitjaxError, match="unknown --prior 'nope'"):
        demo.check_prior_choice("nope", "lenet", "exact")
    demo.check_prior_choice("train", "mlp", "coarse")  # training is always possible
    assert demo.default_generator("mlp") == "coarse"


@pytest.mark.slow
def test_demo_trains_a_prior_when_asked(tmp_path):
    summary = demo.run_demo(tmp_path, victim="mlp", prior="train", prior_steps=2, ig_steps=2, num_images=2,
                            progress=False)
    assert summary["prior"] == "trained" and summary["generator"] == "coarse"
    assert (tmp_path / "prior" / "checkpoints").is_dir()
    assert all(np.isfinite(r["psnr"]) for r in summary["results"])
