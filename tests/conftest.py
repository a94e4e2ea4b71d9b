"""Test session setup, before JAX starts its backend: 8 simulated CPU devices and the CLI's XLA:CPU flags."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import gitjax  # noqa: E402  (does not import jax)

gitjax.configure_xla_cpu()  # the same XLA:CPU scheduler workaround as the CLI (see its docstring)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
