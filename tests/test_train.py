"""Prior trainer: learning, exact resume, sharded == single device, metrics, checkpoint errors, configs.

All runs use the ``tiny`` preset (MLP(32) victim, small Coarse-GIT, N=8, B=1) on
the embedded ``patches`` data. Compiled step functions are cached per
(config, mesh), so the runs below share compilations.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gitjax import parallel
from gitjax.checkpoint import CheckpointError, ConfigMismatchError, fingerprint
from gitjax.configs import (
    PRESETS,
    ConfigError,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    describe_presets,
    get_preset,
    perturb,
)
from gitjax.stream import StreamConfig
from gitjax.train import (
    BEST_FILE,
    METRICS_FILE,
    load_prior,
    train_prior,
)
from gitjax.train_input import step_indices
from gitjax.train_step import make_augment, make_param_discrepancy

TINY = PRESETS["tiny"]
# Measured: the EMA generator's test MSE falls from 0.113 (step 0) to ~0.06 after the
# tiny preset's 60 steps (~45 %); 20 % leaves room for platform differences.
MIN_TEST_LOSS_DROP = 0.20
# Sharded (8 devices) vs one device after K steps: only the all-reduce order differs.
# Measured max |diff| ~1e-7 on params that move ~1e-2; the bound is 100x that.
SHARD_ATOL = 1e-5
K = 5


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted tiny run on all 8 simulated devices."""
    return train_prior(TINY, tmp_path_factory.mktemp("straight"), progress=False)


# ----------------------------------------------------------------------------- learning


def test_short_training_lowers_test_loss(straight):
    evals = [r for r in straight.history if "test_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == TINY.steps
    first, last = evals[0]["test_loss"], evals[-1]["test_loss"]
    drop = 1.0 - last / first
    assert drop >= MIN_TEST_LOSS_DROP, f"test MSE {first:.4f} -> {last:.4f} (drop {drop:.1%})"
    assert evals[-1]["test_psnr"] > evals[0]["test_psnr"] + 1.0


def test_metrics_jsonl_has_expected_keys(straight):
    records = _read_jsonl(straight.workdir / METRICS_FILE)
    assert records == straight.history
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)) and steps[-1] == TINY.steps
    logs = [r for r in records if "loss" in r]
    assert [r["step"] for r in logs] == list(range(TINY.log_every, TINY.steps + 1, TINY.log_every))
    for r in logs:
        assert {"step", "loss", "mse", "tv", "lr", "grad_norm", "examples_per_s", "images_per_s"} <= set(r)
        assert np.isfinite(r["loss"]) and r["examples_per_s"] > 0 and 0 < r["lr"] <= TINY.lr
    for r in records:
        if "test_loss" in r:
            assert {"test_loss", "test_psnr"} <= set(r)
        if "val_loss" in r:
            assert {"val_loss", "val_psnr"} <= set(r)
    # Validation at every eval (model selection); the test split only at step 0 and at the end.
    assert {r["step"] for r in records if "val_loss" in r} == {0, TINY.eval_every, TINY.steps}
    assert {r["step"] for r in records if "test_loss" in r} == {0, TINY.steps}
    last = records[-1]
    assert last["best_step"] in (0, TINY.eval_every, TINY.steps)
    assert last["best_val_psnr"] == max(r["val_psnr"] for r in records if "val_psnr" in r)
    best = json.loads((straight.workdir / BEST_FILE).read_text())
    assert best["step"] == last["best_step"] == straight.best_step and best["test_psnr"] == last["best_test_psnr"]


# ----------------------------------------------------------------------------- resume / sharding


def test_resume_is_bit_identical(straight, tmp_path):
    k = TINY.steps // 2
    first = train_prior(TINY, tmp_path, progress=False, until_step=k)
    assert int(first.state.step) == k
    assert (tmp_path / "checkpoints" / str(k)).is_dir()
    # A fresh train_prior call (as after a kill) restores step k and runs to the end.
    resumed = train_prior(TINY, tmp_path, resume=True, progress=False)
    assert int(resumed.state.step) == TINY.steps
    a, b = _leaves(straight.state), _leaves(resumed.state)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    assert fingerprint(straight.victim_params) == fingerprint(resumed.victim_params)
    steps = [r["step"] for r in _read_jsonl(tmp_path / METRICS_FILE)]
    assert steps == sorted(set(steps)) and steps[-1] == TINY.steps


def test_stream_resume_is_bit_identical(tmp_path):
    """The stream draws its images from the step's key: a resumed run equals a straight one."""
    cfg = TINY.replace(stream=StreamConfig(photos=2, dead_leaves=1, spectral=1), steps=12, warmup=2,
                       eval_every=6, log_every=6)
    mesh = parallel.make_mesh(jax.devices()[:1])  # the 8-device resume is test_resume_is_bit_identical's
    straight_run = train_prior(cfg, tmp_path / "a", progress=False, mesh=mesh)
    first = train_prior(cfg, tmp_path / "b", progress=False, until_step=5, mesh=mesh)
    first_params = _leaves(first.state.params)
    resumed = train_prior(cfg, tmp_path / "b", progress=False, mesh=mesh)
    for x, y in zip(_leaves(straight_run.state), _leaves(resumed.state)):
        assert np.array_equal(x, y)
    # Not vacuous: steps 6-12 moved the params.
    assert any(not np.array_equal(x, y) for x, y in zip(first_params, _leaves(resumed.state.params)))
    assert int(resumed.state.step) == 12 and resumed.best_step == straight_run.best_step
    assert resumed.history[-1]["best_test_psnr"] == straight_run.history[-1]["best_test_psnr"]


# Stream vs fixed examples at equal steps (tiny victim and generator, N=16, 150 steps, one
# device, seeds 0-2) on the smallest embedded set, faces: 144 fixed training images are seen
# ~17 times each in 2400 examples, so the fixed run overfits while the stream (random-resized
# crops, flips, jitter of the same images: never the same image twice) does not. Measured mean
# validation MSE (all 16 validation faces): fixed 0.0200, stream 0.0164 (18 % lower; with 32
# validation draws instead: 0.0227 vs 0.0182, per seed 0.021/0.016/0.031 vs 0.017/0.017/0.020,
# so single seeds can reverse). The test asks the mean for >= 5 % lower.
STREAM_VS_FIXED_MARGIN = 0.05


def test_stream_beats_fixed_examples_at_equal_steps(tmp_path):
    mesh = parallel.make_mesh(jax.devices()[:1])
    base = TINY.replace(dataset="faces", global_batch=16, steps=150, warmup=10, ema_decay=0.9,
                        eval_gradients=16, eval_every=0, log_every=0)
    losses = {"fixed": [], "stream": []}
    for seed in range(3):
        for arm, stream_cfg in (("fixed", StreamConfig()), ("stream", StreamConfig(dataset=1.0))):
            r = train_prior(base.replace(seed=seed, stream=stream_cfg), tmp_path / f"{arm}{seed}",
                            progress=False, mesh=mesh)
            losses[arm].append(r.history[-1]["val_loss"])
    fixed, streamed = np.mean(losses["fixed"]), np.mean(losses["stream"])
    print(f"mean validation MSE over 3 seeds: fixed {fixed:.4f}, stream {streamed:.4f}")
    assert streamed < (1.0 - STREAM_VS_FIXED_MARGIN) * fixed, losses


def test_sharded_matches_single_device(tmp_path):
    assert jax.device_count() == 8
    one = train_prior(TINY, tmp_path / "one", progress=False, until_step=K,
                      mesh=parallel.make_mesh(jax.devices()[:1]))
    eight = train_prior(TINY, tmp_path / "eight", progress=False, until_step=K)
    init = train_prior(TINY, tmp_path / "init", progress=False, until_step=0)
    moved = max(float(np.max(np.abs(x - y))) for x, y in zip(_leaves(eight.state.params), _leaves(init.state.params)))
    assert moved > 100 * SHARD_ATOL, moved  # the comparison below is not vacuous
    diff = max(float(np.max(np.abs(x - y))) for x, y in zip(_leaves(one.state.params), _leaves(eight.state.params)))
    print(f"sharded vs single device after {K} steps: max |diff| {diff:.2e}, params moved {moved:.2e}")
    for x, y in zip(_leaves((one.state.params, one.state.ema_params)),
                    _leaves((eight.state.params, eight.state.ema_params))):
        np.testing.assert_allclose(x, y, rtol=0, atol=SHARD_ATOL)
    assert np.array_equal(np.asarray(one.state.rng), np.asarray(eight.state.rng))
    # Held-out metrics agree too.
    t1 = [r for r in one.history if "val_loss" in r][-1]["val_loss"]
    t8 = [r for r in eight.history if "val_loss" in r][-1]["val_loss"]
    assert abs(t1 - t8) < 1e-5


def test_global_batch_must_split_over_devices(tmp_path):
    with pytest.raises(ConfigError, match="does not split over the 8 devices"):
        train_prior(TINY.replace(global_batch=6), tmp_path, progress=False)


# ----------------------------------------------------------------------------- checkpoints


def test_load_prior_returns_ema_params_and_victim(straight):
    prior = load_prior(straight.workdir)  # the best-by-validation checkpoint
    generator, gen_params, victim, victim_params, config = (prior.generator, prior.gen_params, prior.victim,
                                                            prior.victim_params, prior.config)
    assert config == TINY and victim.name == TINY.victim
    for x, y in zip(_leaves(gen_params), _leaves(straight.best_params)):
        assert np.array_equal(x, y)
    last = load_prior(straight.workdir / "checkpoints")  # the latest: the final EMA params
    for x, y in zip(_leaves(last.gen_params), _leaves(straight.params)):
        assert np.array_equal(x, y)
    for x, y in zip(_leaves(victim_params), _leaves(straight.victim_params)):
        assert np.array_equal(x, y)
    assert prior.victim_state == {}
    grads_1 = jax.tree_util.tree_map(lambda p: jnp.zeros((1,) + p.shape, p.dtype), victim_params)
    out = jax.jit(generator.apply)({"params": gen_params}, grads_1, victim_params)
    assert out.shape == (1, TINY.victim_batch, 32, 32, 3)


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_garbled_checkpoint_raises_checkpoint_error(straight, tmp_path):
    run = _copy_run(straight.workdir, tmp_path / "run")
    step_dir = run / "checkpoints" / str(TINY.steps)
    # The largest file of the state item holds the array data: garble its middle.
    data = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    mid = len(raw) // 2
    raw[mid: mid + 64] = bytes((b ^ 0x5A) for b in raw[mid: mid + 64])
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=str(step_dir)):
        load_prior(run / "checkpoints")
    with pytest.raises(CheckpointError):
        train_prior(TINY, run, resume=True, progress=False)


def test_truncated_metadata_raises_checkpoint_error(straight, tmp_path):
    run = _copy_run(straight.workdir, tmp_path / "run")
    meta = run / "checkpoints" / str(TINY.steps) / "state" / "_METADATA"
    meta.write_bytes(meta.read_bytes()[: meta.stat().st_size // 3])
    with pytest.raises(CheckpointError, match="could not be restored|unreadable"):
        load_prior(run / "checkpoints")


def test_missing_checkpoint_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_prior(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_prior(tmp_path / "empty")


def test_resume_with_another_config_is_a_clear_error(straight, tmp_path):
    run = _copy_run(straight.workdir, tmp_path / "run")
    other = TINY.replace(victim_kwargs=(("widths", (16,)),))
    with pytest.raises(ConfigMismatchError, match="victim_kwargs"):
        train_prior(other, run, progress=False)
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train_prior(TINY, run, resume=False, progress=False)
    # Runtime fields may change on resume (a finished run then has nothing left to do).
    again = train_prior(TINY.replace(log_every=5, eval_every=0, checkpoint_every=7), run, progress=False)
    assert int(again.state.step) == TINY.steps
    assert set(TrainConfig.RUNTIME_FIELDS) == {"checkpoint_every", "keep_checkpoints", "log_every", "eval_every"}


def test_init_from_starts_where_the_prior_ended_and_refuses_another_model(straight, tmp_path):
    """init_from (a fine-tune): step 0 evaluates the source prior's best params on its victim copy."""
    src = straight.workdir
    # std 0: an augmentation that changes nothing, so step 0 scores exactly the source prior.
    tune = TINY.replace(init_from=str(src), steps=2, warmup=1, eval_every=1, perturbations=(
        perturb("gaussian", std=0.0, prob=0.5),))
    res = train_prior(tune, tmp_path / "tune", progress=False)
    step0 = next(r for r in res.history if r["step"] == 0 and "val_loss" in r)
    best = json.loads((src / BEST_FILE).read_text())
    np.testing.assert_allclose(step0["val_loss"], best["val_loss"], rtol=1e-5)
    for x, y in zip(_leaves(res.victim_params), _leaves(straight.victim_params)):
        assert np.array_equal(x, y)
    assert int(res.state.step) == 2
    other = TINY.replace(init_from=str(src), victim_kwargs=(("widths", (16,)),))
    with pytest.raises(ConfigError, match="init_from.*another model.*victim_kwargs"):
        train_prior(other, tmp_path / "other", progress=False)


def test_an_ema_only_prior_loads_and_fine_tunes_but_never_resumes(straight, tmp_path):
    """save_prior(ema_only=True) (how experiments.ship_prior ships): attacks and init_from read the
    EMA params unchanged; resuming would start from the zeroed raw params, so it is refused in one line."""
    from gitjax.checkpoint import CheckpointError
    from gitjax.prior import load_prior, save_prior

    src = load_prior(straight.workdir)
    slim = save_prior(src, tmp_path / "slim", ema_only=True)
    for x, y in zip(_leaves(load_prior(slim).gen_params), _leaves(src.gen_params)):
        assert np.array_equal(x, y)
    tune = train_prior(TINY.replace(init_from=str(slim), steps=1, warmup=0, eval_every=1), tmp_path / "tune",
                       progress=False)
    step0 = next(r for r in tune.history if r["step"] == 0 and "val_loss" in r)
    np.testing.assert_allclose(step0["val_loss"], json.loads((straight.workdir / BEST_FILE).read_text())["val_loss"],
                               rtol=1e-5)
    with pytest.raises(CheckpointError, match="shipped prior.*cannot be resumed.*init_from"):
        train_prior(src.config.replace(steps=src.config.steps + 1), slim, resume=True, progress=False)


def test_a_fine_tune_is_validated_under_its_augmentation(straight, tmp_path):
    """With perturbations the held-out gradients are perturbed like the training ones (fixed
    draws): step 0 of a noisy fine-tune scores the source prior worse than on clean gradients,
    and the same on every evaluation of the same params."""
    best = json.loads((straight.workdir / BEST_FILE).read_text())
    losses = []
    for name in ("a", "b"):
        tune = TINY.replace(init_from=str(straight.workdir), steps=1, warmup=0, eval_every=1,
                            perturbations=(perturb("gaussian", std=(0.5, 1.0), prob=1.0),))
        res = train_prior(tune, tmp_path / name, progress=False)
        losses.append(next(r for r in res.history if r["step"] == 0 and "val_loss" in r)["val_loss"])
    assert losses[0] == losses[1]
    assert losses[0] > 1.2 * best["val_loss"], (losses[0], best["val_loss"])


# ----------------------------------------------------------------------------- configs


def test_config_saved_and_reloaded_equal(straight):
    saved = json.loads(json.dumps(config_to_dict(TINY)))
    assert config_from_dict(saved) == TINY
    assert load_prior(straight.workdir).config == TINY
    robust = TINY.replace(
        perturbations=(perturb("gaussian", std=(0.0, 1e-2), prob=0.5), perturb("prune", ratio=0.3)),
        param_discrepancy=(0.0, 0.05),
    ).validate()
    assert config_from_dict(json.loads(json.dumps(config_to_dict(robust)))) == robust
    with pytest.raises(ConfigError, match="unknown TrainConfig fields"):
        config_from_dict({**saved, "bogus": 1})


def test_config_validation_names_the_problem():
    with pytest.raises(ConfigError, match="generator.batch_size=1 must equal victim_batch=4"):
        TINY.replace(victim_batch=4).validate()
    with pytest.raises(ConfigError, match="unknown defence 'blur'"):
        TINY.replace(perturbations=(perturb("blur", sigma=1.0),)).validate()
    with pytest.raises(ConfigError, match="per-example"):
        TINY.replace(perturbations=(perturb("dpsgd", clip_norm=1.0, noise_multiplier=0.1),)).validate()
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("huge")


def test_every_preset_is_valid_and_documented():
    docs = describe_presets()
    assert set(docs) == set(PRESETS)
    for name, cfg in PRESETS.items():
        cfg.validate()
        assert docs[name].startswith("python -m gitjax.train --preset " + name), name
        assert "TIMING_AND_TARGET" not in docs[name], f"preset {name} lacks measured numbers"


# ----------------------------------------------------------------------------- pieces


def test_step_indices_are_a_pure_function_of_seed_and_step():
    a = step_indices(0, 7, 1000, 64)
    assert np.array_equal(a, step_indices(0, 7, 1000, 64))
    assert not np.array_equal(a, step_indices(0, 8, 1000, 64))
    assert not np.array_equal(a, step_indices(1, 7, 1000, 64))
    assert len(set(a.tolist())) == 64  # without replacement within a step


def test_augment_applies_sampled_levels_with_probability():
    n = 64
    grads_N = {"w": jnp.ones((n, 10, 10)), "b": jnp.ones((n, 10))}
    noisy = make_augment((perturb("gaussian", std=(0.1, 0.2), levels=2, prob=0.5),))
    out = jax.jit(noisy)(jax.random.PRNGKey(0), grads_N)
    changed_N = np.any(np.asarray(out["w"]) != 1.0, axis=(1, 2))
    assert 16 <= changed_N.sum() <= 48  # ~Binomial(64, 0.5)
    assert np.all(np.asarray(out["w"])[~changed_N] == 1.0)
    std = float(np.std(np.asarray(out["w"])[changed_N]))
    assert 0.09 < std < 0.21
    pruned = jax.jit(make_augment((perturb("prune", ratio=0.5),)))(
        jax.random.PRNGKey(1), {"w": jax.random.normal(jax.random.PRNGKey(2), (4, 100))})
    assert np.all(np.mean(np.asarray(pruned["w"]) == 0.0, axis=1) == 0.5)  # per gradient, not over N
    assert make_augment(()) is None


def test_param_discrepancy_stays_in_range():
    params = {"k": jax.random.normal(jax.random.PRNGKey(0), (200, 50))}
    perturb_fn = make_param_discrepancy(TINY.replace(param_discrepancy=(0.02, 0.05), discrepancy_levels=4))
    for i in range(4):
        out = jax.jit(perturb_fn)(jax.random.PRNGKey(i), params)
        rel = float(jnp.linalg.norm(out["k"] - params["k"]) / jnp.linalg.norm(params["k"]))
        assert 0.015 < rel < 0.056, rel
    assert make_param_discrepancy(TINY) is None


def test_distributed_gate_reads_the_environment():
    assert not parallel.distributed_requested({})
    assert parallel.distributed_requested({"GITJAX_DISTRIBUTED": "1"})
    assert parallel.distributed_requested({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert not parallel.distributed_requested({"GITJAX_DISTRIBUTED": "0", "JAX_COORDINATOR_ADDRESS": "x:1"})
    assert not parallel.maybe_initialize_distributed()  # single host: a no-op, never an error
    mesh = parallel.make_mesh()
    assert parallel.local_batch_slice(16, mesh) == slice(0, 16)
    with pytest.raises(ValueError, match="multiple of 8"):
        parallel.local_batch_slice(12, mesh)
    x = parallel.global_batch_from_local(np.arange(16 * 3, dtype=np.float32).reshape(16, 3), mesh)
    assert x.shape == (16, 3) and len(x.sharding.device_set) == 8


def test_victim_pretraining_moves_the_attackers_copy():
    from gitjax.data import load_dataset
    from gitjax.train import build_victim, init_victim

    ds = load_dataset(TINY.dataset, "train")
    victim = build_victim(TINY, ds.image_shape, ds.num_classes, ds.mean, ds.std)
    fresh, _ = init_victim(TINY, victim, ds.images, ds.labels)
    again, _ = init_victim(TINY, victim, ds.images, ds.labels)
    trained, _ = init_victim(TINY.replace(victim_pretrain_steps=3), victim, ds.images, ds.labels)
    assert fingerprint(fresh) == fingerprint(again)  # a pure function of the seed
    assert fingerprint(fresh) != fingerprint(trained)
    assert all(np.all(np.isfinite(x)) for x in _leaves(trained))
