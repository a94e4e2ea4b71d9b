"""A broken newest checkpoint step falls back to the newest good one with a warning; none good is one error."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gitjax.checkpoint import CheckpointError, CheckpointFallbackWarning, PriorCheckpointer


def _trees(step):
    state = {"w": jnp.arange(6.0).reshape(2, 3) + step, "step": jnp.int32(step)}
    victim = {"params": {"dense": {"kernel": jnp.ones((3, 2)) * step}}, "state": {}}
    return state, victim


def _abstract(tree):
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), tree)


def _save_steps(directory, steps=(1, 2, 3)):
    with PriorCheckpointer(directory, max_to_keep=None) as ckpt:
        for s in steps:
            ckpt.save(s, *_trees(s), {"seed": 0})


def _garble_arrays(step_dir):
    """Truncates every array data file of the step (what a crash mid-copy leaves)."""
    files = [f for item in ("state", "victim") for f in (step_dir / item).rglob("*") if f.is_file()
             and f.name not in ("commit_success.txt", "_METADATA")]
    assert files
    for f in files:
        f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 3)])


def test_empty_newest_step_falls_back_with_warning(tmp_path):
    _save_steps(tmp_path)
    shutil.rmtree(tmp_path / "3")
    (tmp_path / "3").mkdir()  # an empty step folder, e.g. a save killed before it wrote anything
    with PriorCheckpointer(tmp_path, read_only=True) as ckpt:
        with pytest.warns(CheckpointFallbackWarning, match=r"step 3 .*\(an empty step folder\); using step 2"):
            assert ckpt.latest_step() == 2
        state, victim, step = ckpt.restore(None, *_abstract(_trees(0)))
    assert step == 2 and int(state["step"]) == 2
    assert (tmp_path / "3").is_dir()  # read-only: nothing moved


def test_garbled_newest_step_falls_back_and_is_moved_aside(tmp_path):
    _save_steps(tmp_path)
    _garble_arrays(tmp_path / "3")
    with PriorCheckpointer(tmp_path, max_to_keep=None) as ckpt:
        assert ckpt.latest_step() == 3  # structurally complete: only restoring finds the damage
        with pytest.warns(CheckpointFallbackWarning, match="step 3"):
            state, _, step = ckpt.restore(None, *_abstract(_trees(0)))
        assert step == 2
        np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(6.0).reshape(2, 3) + 2)
        # Moved aside, so a resumed run can save step 3 again.
        assert not (tmp_path / "3").exists() and (tmp_path / "3.corrupt").is_dir()
        assert ckpt.all_steps() == [1, 2]
        ckpt.save(3, *_trees(3), {"seed": 0})
    with PriorCheckpointer(tmp_path, read_only=True) as ckpt:
        assert ckpt.restore(None, *_abstract(_trees(0)))[2] == 3


def test_named_broken_step_is_strict(tmp_path):
    _save_steps(tmp_path)
    _garble_arrays(tmp_path / "3")
    with PriorCheckpointer(tmp_path, read_only=True) as ckpt:
        with pytest.raises(CheckpointError, match="3"):
            ckpt.restore(3, *_abstract(_trees(0)))


def test_no_good_step_is_one_clear_error(tmp_path):
    _save_steps(tmp_path, steps=(1, 2))
    _garble_arrays(tmp_path / "2")
    shutil.rmtree(tmp_path / "1")
    (tmp_path / "1").mkdir()
    with PriorCheckpointer(tmp_path, read_only=True) as ckpt:
        with pytest.raises(CheckpointError, match="no usable checkpoint .* step 2: .*step 1: an empty step folder") \
                as e:
            ckpt.restore(None, *_abstract(_trees(0)))
    assert "\n" not in str(e.value)


def test_managers_of_one_workdir_use_distinct_barrier_keys(tmp_path):
    """The rolling and best/ managers save the same step at once on every host; orbax keys its
    cross-host barriers by the step folder name, so without distinct prefixes they would share
    one barrier and deadlock (seen in CI: 'Timed out while waiting for async_commit_complete')."""
    from orbax.checkpoint._src.multihost import multihost

    a, b = PriorCheckpointer(tmp_path / "checkpoints"), PriorCheckpointer(tmp_path / "best")
    try:
        keys = {multihost.unique_barrier_key("async_commit_complete", suffix="3",
                                             prefix=m._manager._multiprocessing_options.barrier_sync_key_prefix)
                for m in (a, b)}
    finally:
        a.close(), b.close()
    assert len(keys) == 2, keys
