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


# The suite runs on two xdist workers, one whole file at a time (``--dist loadfile``). xdist's default
# queue puts files with many tests first, so the heaviest files (few, long tests) started last and one
# worker idled for minutes at the end. Longest-first scheduling needs the order below and
# ``--no-loadscope-reorder`` (pyproject.toml). Measured per-file seconds, 2-core CPU, 2026-12-07
# (``pytest --durations=80``); files not listed keep their place after these.
HEAVIEST_FIRST = (
    "test_bn_prior.py",  # 180 s
    "test_study.py",  # 164 s
    "test_refine.py",  # 143 s
    "test_train.py",  # 132 s
    "test_per_example.py",  # 114 s
    "test_benchmarks.py",  # 101 s
    "test_generators.py",  # 89 s
    "test_dlg_ig.py",  # 55 s
    "test_demo.py",  # 52 s
    "test_experiments.py",  # 52 s
    "test_leakage.py",  # 49 s
    "test_distributed.py",  # 42 s
    "test_cli.py",  # 37 s
    "test_pipeline.py",  # 32 s
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: keeps order within a file
