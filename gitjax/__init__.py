"""gitjax: Gradient Inversion Transcript (GIT) and gradient-leakage attacks in JAX/Flax.

Public API (imported lazily so ``gitjax --help`` starts fast)::

    gitjax.make_victim(name)                      the victim zoo
    gitjax.per_example_grads / batch_grad / fedavg_update
    gitjax.build_generator(GeneratorConfig, victim, params)
    gitjax.train_prior(TrainConfig, workdir) / gitjax.load_prior(workdir)
    gitjax.attack(prior, grads)                   GIT one-shot, pure (jit / vmap it)
    gitjax.run_attack(name, AttackProblem, key)   every registered attack (gitjax.attacks.ATTACKS)
    gitjax.run_pipeline(method, attacker, x, y, key)  leak -> defend -> attack -> score (+ oracle rows)
    gitjax.evaluate(recon, truth)                 PSNR / SSIM / MSE with matching
"""

import importlib
import os

__version__ = "0.1.0"


def _xla_cpu_workaround() -> None:
    """Turns off XLA:CPU's concurrency-optimised scheduler unless the user set it.

    With it on (the default in jax 0.10), Exact-GIT's ResNet generator (several
    implicit-gradient CG solves, ``lax.custom_linear_solve``, in one program) was seen
    to hang forever on a 2-core CPU: the program never finished and used no CPU.
    The flag only changes the order of independent ops on CPU; GPU/TPU ignore it.
    It is read when the CPU backend starts, so it must be set before the first jax op.
    Not a complete fix: one Exact-GIT ResNet configuration (tv_weight > 0) still hung
    (README, "Known limits").
    """
    flag = "--xla_cpu_enable_concurrency_optimized_scheduler"
    flags = os.environ.get("XLA_FLAGS", "")
    if flag not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {flag}=false".strip()


_xla_cpu_workaround()

_EXPORTS = {
    "make_victim": "gitjax.victims",
    "list_victims": "gitjax.victims",
    "per_example_grads": "gitjax.leakage",
    "batch_grad": "gitjax.leakage",
    "fedavg_update": "gitjax.leakage",
    "GradientLayout": "gitjax.layout",
    "make_defense": "gitjax.defenses",
    "GeneratorConfig": "gitjax.generators",
    "build_generator": "gitjax.generators",
    "TrainConfig": "gitjax.configs",
    "train_prior": "gitjax.train",
    "load_prior": "gitjax.prior",
    "attack": "gitjax.prior",
    "Prior": "gitjax.prior",
    "save_prior": "gitjax.prior",
    "check_gradients": "gitjax.prior",
    "AttackProblem": "gitjax.attacks",
    "run_attack": "gitjax.attacks",
    "evaluate": "gitjax.metrics",
    "run_pipeline": "gitjax.pipeline",
    "load_dataset": "gitjax.data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gitjax' has no attribute {name!r}")
