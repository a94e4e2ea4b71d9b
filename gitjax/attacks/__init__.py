"""Attack registry. Each attack module registers itself on import.

Add the import of a new attack module to ``_MODULES`` below.
"""

import importlib

from gitjax.attacks.base import ATTACKS, AttackProblem, AttackResult, AttackSpec, get_attack, register, run_attack

_MODULES = (
    "labels",
    "dlg",
    "ig",
    "analytic",
    "rgap",
    "april",
    "bn_prior",
    "git",
)

for _m in _MODULES:
    try:
        importlib.import_module(f"gitjax.attacks.{_m}")
    except ModuleNotFoundError as e:  # a module not written yet must not break the others
        if e.name != f"gitjax.attacks.{_m}":
            raise

__all__ = ["ATTACKS", "AttackProblem", "AttackResult", "AttackSpec", "get_attack", "register", "run_attack"]
