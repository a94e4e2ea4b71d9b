"""Test session setup, before JAX starts its backend: 8 simulated CPU devices and the CLI's XLA:CPU flags."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

# Most of the suite's time is XLA compilation, and many tests compile the same programs (the same victim,
# attack and size in another test, file or xdist worker, or a CLI subprocess). A persistent compilation
# cache shared by this session's processes compiles each program once. It lives in a fresh temporary
# directory per session (the pytest process that creates it removes it), so timings stay honest and no run
# reuses another run's executables.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="gitjax-test-jit-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # small programs repeat the most

import gitjax  # noqa: E402  (does not import jax)

gitjax.configure_xla_cpu()  # the same XLA:CPU scheduler workaround as the CLI (see its docstring)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


# The files that take longest first (summed test seconds, 2-core CPU, 2026-12-08: 213 s down to 63 s), the rest
# in collection order after them: with `--dist loadfile --no-loadscope-reorder` (pyproject) workers take
# whole files in this order, and starting the long ones first keeps one long file from running alone at
# the end while the other worker idles.
_SLOW_FIRST = ("test_study.py", "test_bn_prior.py", "test_refine.py", "test_train.py", "test_generators.py",
               "test_per_example.py", "test_experiments.py", "test_benchmarks.py", "test_dlg_ig.py", "test_demo.py",
               "test_defenses.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept within ranks
