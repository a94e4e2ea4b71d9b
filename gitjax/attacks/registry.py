"""The attack registry: one explicit dict of :class:`AttackSpec`, no import side effects.

Adding an attack: write its module (a config dataclass, a host-side ``run`` and, for an
iterative attack, a pure ``*_reconstruct``), then add one entry to ``ATTACKS`` below.
The CLI (``gitjax attack --method``), the pipeline and the study all read this dict.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gitjax.attacks import analytic, april, bn_prior, dlg, git, ig, rgap
from gitjax.attacks.base import AttackProblem, AttackResult, AttackSpec, Hints
from gitjax.types import GitjaxError, PRNGKey

_SERVER = "honest-but-curious server; knows params and architecture"
_ITERATIVE_HINTS = ("x_init", "x_prior", "x_true", "extra_loss")
_GIT_THREAT = "architecture + a prior trained offline on auxiliary data; at attack time only the leaked gradient"
_APRIL = ("Lu, Chen, Zheng, Wang, Cui. APRIL: Finding the Achilles' Heel on Privacy for Vision Transformers. "
          "CVPR 2022")


def idlg_reconstruct(victim, params, state, target_grads, labels, key, config, **kw):
    """iDLG: DLG with the labels always recovered from the head gradient (pure; same signature as DLG's)."""
    del labels
    return dlg.dlg_reconstruct(victim, params, state, target_grads, None, key,
                               dataclasses.replace(config, soft_labels=False), **kw)


def _git_runner(refine: str):
    def run(problem: AttackProblem, key: PRNGKey, config: git.GITConfig, **hints: Any) -> AttackResult:
        return git.run(problem, key, dataclasses.replace(config, refine=config.refine or refine), **hints)

    return run


ATTACKS: dict[str, AttackSpec] = {
    "dlg": AttackSpec(
        "dlg", "optimisation", dlg.DLGConfig, dlg.run, _SERVER,
        "Zhu, Liu, Han. Deep Leakage from Gradients. NeurIPS 2019",
        hint_names=_ITERATIVE_HINTS, reconstruct=dlg.dlg_reconstruct),
    "idlg": AttackSpec(
        "idlg", "optimisation", dlg.DLGConfig, dlg.run_idlg, _SERVER,
        "Zhao, Mopuri, Bilen. iDLG: Improved Deep Leakage from Gradients. arXiv 2001.02610, 2020",
        hint_names=_ITERATIVE_HINTS, reconstruct=idlg_reconstruct),
    "ig": AttackSpec(
        "ig", "optimisation", ig.IGConfig, ig.run, _SERVER,
        "Geiping, Bauermeister, Droege, Moeller. Inverting Gradients - How easy is it to break privacy in "
        "federated learning? NeurIPS 2020",
        hint_names=_ITERATIVE_HINTS, reconstruct=ig.ig_reconstruct),
    "ig+bn": AttackSpec(
        "ig+bn", "optimisation", bn_prior.IGBNConfig, bn_prior.run_ig_bn,
        "honest-but-curious server; victim with BatchNorm whose running statistics come from natural data; "
        "knows params and architecture",
        "Yin, Mallya, Vahdat, Alvarez, Kautz, Molchanov. See Through Gradients: Image Batch Recovery via "
        "GradInversion. CVPR 2021 (+ Geiping et al. 2020 for IG)",
        hint_names=_ITERATIVE_HINTS + ("bn_targets",), reconstruct=bn_prior.ig_bn_reconstruct),
    "analytic": AttackSpec(
        "analytic", "closed-form", analytic.AnalyticConfig, analytic.run,
        "honest-but-curious server; victim's first layer dense over the image (e.g. 'mlp'); exact for B=1, "
        "per-example recovery in batches where ReLU units isolate examples",
        "Phong et al. 2018 (IEEE TIFS); Geiping et al., breaching analytic attack"),
    "rgap": AttackSpec(
        "rgap", "closed-form", rgap.RGAPConfig, rgap.run,
        "honest-but-curious server; batch of 1; small sequential dense/conv victim with invertible activations "
        "(e.g. sigmoid LeNet-style), no normalisation or residual connections",
        "Zhu & Blaschko, R-GAP: Recursive Gradient Attack on Privacy, ICLR 2021"),
    "april": AttackSpec(
        "april", "closed-form", april.APRILConfig, april.run,
        "honest-but-curious server; batch of 1; ViT with a learnable positional embedding added to the patch "
        "tokens; exact when the embedding dim D >= number of tokens T", _APRIL),
    "april-opt": AttackSpec(
        "april-opt", "optimisation", april.APRILOptConfig, april.run_opt,
        "honest-but-curious server; ViT with a learnable positional embedding; any batch size", _APRIL,
        hint_names=_ITERATIVE_HINTS),
    "git": AttackSpec(
        "git", "learned", git.GITConfig, _git_runner(""), _GIT_THREAT, "Chen & Liu 2025, arXiv 2505.20026",
        hint_names=("x_true", "prior")),
    "git+ig": AttackSpec(
        "git+ig", "learned", git.GITConfig, _git_runner("ig"), _GIT_THREAT + "; + victim params for IG",
        "GIT prior + Geiping et al. 2020", hint_names=("x_true", "prior"), refine="ig"),
    "git+dlg": AttackSpec(
        "git+dlg", "learned", git.GITConfig, _git_runner("dlg"), _GIT_THREAT + "; + victim params for DLG",
        "GIT prior + Zhu et al. 2019", hint_names=("x_true", "prior"), refine="dlg"),
}


def get_attack(name: str) -> AttackSpec:
    """The spec of ``name``; a GitjaxError listing the available names otherwise."""
    if name not in ATTACKS:
        raise GitjaxError(f"unknown attack {name!r}; available: {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name]


def run_attack(name: str, problem: AttackProblem, key: PRNGKey | None = None, config: Any = None,
               hints: Hints | None = None, **overrides: Any) -> AttackResult:
    """Runs a registered attack on one problem; ``overrides`` replace fields of its default config."""
    import jax

    spec = get_attack(name)
    config = spec.config_cls() if config is None else config
    if overrides:
        config = dataclasses.replace(config, **overrides)
    return spec.run(problem, jax.random.key(0) if key is None else key, config, hints)
