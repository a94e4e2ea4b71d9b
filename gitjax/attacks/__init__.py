"""Gradient-inversion attacks: one interface (``base``), one explicit registry (``registry.ATTACKS``)."""

from gitjax.attacks.base import AttackProblem, AttackResult, AttackSpec, Hints
from gitjax.attacks.registry import ATTACKS, get_attack, run_attack

__all__ = ["ATTACKS", "AttackProblem", "AttackResult", "AttackSpec", "Hints", "get_attack", "run_attack"]
