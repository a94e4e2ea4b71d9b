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
    gitjax.configure_xla_cpu()                    the XLA:CPU workaround the CLI uses (call first)
"""

import importlib
import os

__version__ = "0.1.0"


def configure_xla_cpu() -> bool:
    """Turns off XLA:CPU's concurrency-optimised scheduler (unless XLA_FLAGS already names it).

    Scope: the ``gitjax`` command line and the test suite call this before JAX
    starts; ``import gitjax`` does not touch the environment. Call it yourself,
    first thing, to get the same behaviour in your own program.

    Why: with the scheduler on (the default in jax 0.10), Exact-GIT's ResNet
    generator (several implicit-gradient CG solves, ``lax.custom_linear_solve``,
    in one program) was seen to hang forever on a 2-core CPU: the program never
    finished and used no CPU. The flag only changes the order of independent ops
    on CPU; GPU/TPU ignore it. Not a complete fix: one Exact-GIT ResNet
    configuration (tv_weight > 0) still hung (README, "Known limits").

    XLA reads the flag when the CPU backend starts, so after that it has no
    effect: then this warns and returns False. Returns True when the flag is in
    effect for the backend that will start (set here or by the user).
    """
    import sys
    import warnings

    flag = "--xla_cpu_enable_concurrency_optimized_scheduler"
    flags = os.environ.get("XLA_FLAGS", "")
    if flag in flags:
        return True
    os.environ["XLA_FLAGS"] = f"{flags} {flag}=false".strip()
    if "jax" in sys.modules:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            warnings.warn("gitjax.configure_xla_cpu() was called after JAX started its backend, so the XLA:CPU "
                          "scheduler flag has no effect in this process; call it before the first JAX "
                          "operation (or set XLA_FLAGS=" + flag + "=false)", RuntimeWarning, stacklevel=2)
            return False
    return True


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

__all__ = sorted([*_EXPORTS, "configure_xla_cpu"])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gitjax' has no attribute {name!r}")
