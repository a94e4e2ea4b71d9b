"""gitjax: Gradient Inversion Transcript (GIT) and gradient-leakage attacks in JAX/Flax."""

__version__ = "0.1.0"
