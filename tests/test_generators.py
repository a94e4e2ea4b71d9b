"""GIT generators: built from the layout, right shapes and range, exact where the algebra is exact.

Compile time dominates on CPU, so shape/range checks run on generator params filled
from ``jax.eval_shape(init)`` (no init compile) and the big victims only trace.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gitjax.generators import GENERATORS, GeneratorConfig, build_generator
from gitjax.generators.features import probe_rows
from gitjax.generators.linalg import LinearOps, cg_refine, extract_patches, project_sum, ridge_invert
from gitjax.generators.lti import kronecker_sketch
from gitjax.layout import GradientLayout
from gitjax.leakage import batch_grad
from gitjax.trace import LayerPlan, build_plan, forward_layout, forward_order
from gitjax.types import GitjaxError, GradientMismatchError
from gitjax.victims import make_victim

SMALL = ("mlp", "lenet", "resnet8", "vit")


@functools.lru_cache(maxsize=None)
def victim_and_params(name: str):
    victim = make_victim(name)
    params, state = jax.jit(victim.init)(jax.random.PRNGKey(0))
    return victim, params, state


@functools.lru_cache(maxsize=None)
def leaked(name: str, b: int, n: int = 2):
    """N = n leaked batch-mean gradients of B = b images each, and the images."""
    victim, params, state = victim_and_params(name)
    x = jax.random.uniform(jax.random.PRNGKey(1), (n, b, *victim.input_shape))
    y = jax.random.randint(jax.random.PRNGKey(2), (n, b), 0, victim.num_classes)
    grads = jax.jit(jax.vmap(lambda xi, yi: batch_grad(victim, params, state, xi, yi)))(x, y)
    return grads, x


def filled_params(gen, grads, vp, seed: int = 0):
    """Generator params with init's shapes, filled from numpy (small random values; no compile)."""
    abstract = jax.eval_shape(gen.init, jax.random.PRNGKey(0), grads, vp)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), s.dtype), abstract)


def psnr(a, b):
    return 10 * np.log10(1.0 / float(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


# ----------------------------------------------------------------------------- the plan


def test_plan_reads_the_wiring_from_the_victim():
    lenet = build_plan(make_victim("lenet"))
    assert [lp.post for lp in lenet.layers] == ["sigmoid", "sigmoid", "sigmoid", "top"]
    assert lenet.image_perm == tuple(range(32 * 32 * 3))  # the conv stem reads the image as is

    resnet = build_plan(make_victim("resnet8"))
    stage1 = next(u for u in resnet.units if u.name == "stage1_block0")
    assert stage1.composite and [resnet.layers[i].block.path[-1] for (i,) in stage1.side] == ["proj", "proj_norm"]
    assert resnet.units[-2].post == "pool"  # global average pool before the head
    assert [resnet.layers[i].post for (i,) in resnet.units[2].main] == ["identity", "relu", "identity", "mixed"]

    vit = build_plan(make_victim("vit"))
    block0 = next(u for u in vit.units if u.name == "block0")
    fan = [item for item in block0.main if len(item) > 1]
    assert [[vit.layers[i].block.path[-1] for i in item] for item in fan] == [["query", "key", "value"]]
    assert next(lp for lp in vit.layers if lp.name == "block0/mlp1").post == "gelu"
    assert next(lp for lp in vit.layers if lp.name == "ln_final").post == "select:0"
    perm = np.asarray(vit.image_perm)  # patchify: token 1 starts at pixel (0, 4)
    assert perm[48] == 4 * 3 and sorted(perm.tolist()) == list(range(3072))


def test_forward_layout_is_the_victims_forward_order():
    victim = make_victim("resnet8")
    params = jax.eval_shape(victim.init, jax.random.PRNGKey(0))[0]
    layout = forward_layout(victim)  # from a traced init: independent of the dict order of any params
    assert layout.blocks[0].name == "stem" and layout.blocks[-1].name == "head"
    assert layout == GradientLayout.from_params(params, order=forward_order(victim))
    assert GradientLayout.from_params(params).blocks[0].name == "head"  # eval_shape sorted the keys


# ----------------------------------------------------------------------------- backward-pass algebra


def test_dense_ratio_and_batch_pseudo_inverse_are_exact():
    rng = np.random.default_rng(0)
    a_BxI = jnp.asarray(rng.standard_normal((3, 20)), jnp.float32)
    d_BxO = jnp.asarray(rng.standard_normal((3, 7)), jnp.float32)
    dk = a_BxI.T @ d_BxO / 3  # batch-mean weight gradient; db = d.mean(0)
    # B = 1: a = dK db / |db|^2 exactly.
    np.testing.assert_allclose(probe_rows(a_BxI[:1].T @ d_BxO[:1], d_BxO[0]), a_BxI[0], rtol=1e-5, atol=1e-5)
    # B = 3 with the per-image errors known: a = B dK D^T (D D^T)^{-1} recovers every input (rank argument).
    from gitjax.layout import LayerBlock

    lp = LayerPlan(0, LayerBlock(("d",), "dense", (("kernel", (20, 7)),), 0), "dense", None, (20,), (7,))
    a_hat = jax.jit(ridge_invert, static_argnums=0)(LinearOps(lp, (3, 20)), 3 * dk, d_BxO, jnp.zeros((3, 20)),
                                                    jnp.float32(1e-7))
    np.testing.assert_allclose(a_hat, a_BxI, rtol=1e-3, atol=1e-3)
    # The bias constraint sum_i delta_i = B db is enforced by the min-norm shift.
    e = project_sum(jnp.zeros((3, 7)), 3 * d_BxO.mean(0), (0,))
    np.testing.assert_allclose(e.sum(0), d_BxO.sum(0), rtol=1e-5, atol=1e-5)


def test_patch_conv_matches_lax_conv_and_cg_recovers_a_conv_input():
    rng = np.random.default_rng(0)
    from gitjax.layout import LayerBlock

    x = jnp.asarray(rng.standard_normal((1, 8, 8, 3)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 3, 4)) / 5, jnp.float32)
    for strides, padding in (((1, 1), "SAME"), ((2, 2), ((1, 1), (1, 1))), ((2, 2), "SAME")):
        ref = jax.lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        p = extract_patches(x, (3, 3), strides, padding)
        np.testing.assert_allclose(jnp.einsum("bhwijc,ijco->bhwo", p, k), ref, rtol=1e-4, atol=1e-4)
    # R-GAP's system: forward equations + weight-gradient equations pin down the input.
    lp = LayerPlan(0, LayerBlock(("c",), "conv", (("kernel", (3, 3, 3, 4)),), 0), "conv", None,
                   (8, 8, 3), (8, 8, 4), (1, 1), "SAME")
    ops = LinearOps(lp, (1, 8, 8, 3))
    z = ops.forward(ops.unfold(x), k)
    delta = jnp.asarray(rng.standard_normal((1, 8, 8, 4)), jnp.float32)
    dk = ops.weight_grad(ops.unfold(x), delta)

    @jax.jit
    def solve(z, dk, delta):
        return cg_refine(ops, k, None, dk, delta, z, jnp.ones_like(z), jnp.zeros_like(x),
                         jnp.array([0.0, 0.0, math.log(1e-6)]), 100)

    x_hat = solve(z, dk, delta)
    assert float(jnp.linalg.norm(x_hat - x) / jnp.linalg.norm(x)) < 1e-2


def test_kronecker_sketch_roughly_preserves_norms():
    g = jax.random.normal(jax.random.PRNGKey(0), (16, 50_000))
    s = kronecker_sketch(g, 1024, seed=0)
    assert s.shape == (16, 1024)
    ratio = jnp.linalg.norm(s, axis=1) / jnp.linalg.norm(g, axis=1) * math.sqrt(math.ceil(math.sqrt(50_000)) ** 2
                                                                              / 1024)
    assert 0.7 < float(ratio.mean()) < 1.3


# ----------------------------------------------------------------------------- generators


def test_exact_git_is_exact_on_the_mlp_at_init():
    """B = 1, MLP victim: the first dense layer leaks its input; Exact-GIT's pseudo-inverse is that ratio."""
    victim, params, _ = victim_and_params("mlp")
    grads, x = leaked("mlp", 1)
    gen = build_generator(GeneratorConfig(kind="exact", batch_size=1), victim, params)
    gen_params = jax.jit(gen.init)(jax.random.PRNGKey(0), grads, params)["params"]
    out = jax.jit(gen.apply)({"params": gen_params}, grads, params)
    assert out.shape == (2, 1, 32, 32, 3)
    assert psnr(out, x) >= 30.0


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("kind", GENERATORS)
def test_output_shape_and_range(name, kind):
    victim, params, _ = victim_and_params(name)
    b = 2
    grads, _ = leaked(name, b)
    # Keep compiles short: CG has its own test (conv) and runs in the ViT test (token layers).
    cfg = GeneratorConfig(kind=kind, batch_size=b, width=32, exact_cg_iters=0,
                          lti_hidden=64, decoder_channels=16)
    gen = build_generator(cfg, victim, params)
    out = jax.jit(gen.apply)({"params": filled_params(gen, grads, params)}, grads, params)
    assert out.shape == (2, b, *victim.input_shape)
    assert bool(jnp.all(jnp.isfinite(out))) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0


@pytest.mark.parametrize("kind", GENERATORS)
def test_batch_of_one_and_generator_mirrors_the_layout(kind):
    victim, params, _ = victim_and_params("lenet")
    grads, _ = leaked("lenet", 1)
    cfg = GeneratorConfig(kind=kind, batch_size=1, width=32, use_victim_params=False, exact_cg_iters=2,
                          lti_hidden=64, decoder_channels=16)
    gen = build_generator(cfg, victim, params)
    abstract = jax.eval_shape(gen.init, jax.random.PRNGKey(0), grads, None)["params"]
    out = jax.eval_shape(gen.apply, {"params": abstract}, grads, None)
    assert out.shape == (2, 1, 32, 32, 3)
    layout = forward_layout(victim)
    names = set(abstract["core"]) if "core" in abstract else set(abstract)
    if kind == "exact":  # one block per layer block: every victim leaf has a learned counterpart
        mirrored = {b.name for b in layout.blocks if all(f"{b.name}_{leaf}" in names for leaf, _ in b.leaves)}
        assert mirrored == {b.name for b in layout.blocks}
    elif kind == "coarse":  # one MLP block per layer group
        assert {n[: -len("_out")] for n in names if n.endswith("_out") and n != "dec_out"} == set(layout.groups())


@pytest.mark.parametrize("name", ("lenet", "resnet8"))
def test_coarse_mirror_decoder_has_one_block_per_conv_unit_and_reads_the_head_probe(name):
    """coarse_decoder="mirror": one FiLM'd conv block per spatial unit, started from the head's probe."""
    victim, params, _ = victim_and_params(name)
    b = 2
    grads, _ = leaked(name, b)
    cfg = GeneratorConfig(kind="coarse", batch_size=b, width=32, decoder_channels=16, coarse_decoder="mirror")
    gen = build_generator(cfg, victim, params)
    p = filled_params(gen, grads, params)
    out = jax.jit(gen.apply)({"params": p}, grads, params)
    assert out.shape == (2, b, *victim.input_shape)
    assert bool(jnp.all(jnp.isfinite(out))) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    plan = build_plan(victim)
    spatial = {u.name.replace("/", "_") for u in plan.units if len(u.in_shape) == 3 and len(u.out_shape) == 3}
    mirror = p["core"]["mirror"]
    assert {k[: -len("_film")] for k in mirror if k.endswith("_film")} == spatial
    # The head's probe enters as extra channels of the first block's input.
    top = [u for u in plan.units if u.name.replace("/", "_") in spatial][-1]
    first_conv = mirror[f"{top.name.replace('/', '_')}_conv"]["kernel"]
    assert first_conv.shape[-2] == 16 + top.out_shape[-1]
    # The head probe moves the output: zero the head's kernel gradient (its probe becomes 0).
    head = plan.layers[-1].block.path
    zeroed = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.zeros_like(a) if tuple(getattr(k, "key", None) for k in path[:-1]) == head
        and getattr(path[-1], "key", None) == "kernel" else a, grads)
    out0 = jax.jit(gen.apply)({"params": p}, zeroed, params)
    assert float(jnp.max(jnp.abs(out0 - out))) > 1e-4


def test_exact_git_on_vit_uses_the_pos_embedding_at_b1():
    """APRIL: d pos_embed is the per-token error, which makes the patch embedding invertible (B = 1).

    Up to one token direction: LayerNorm makes every token's error orthogonal to the
    all-ones vector, so the 64 x 64 error matrix has rank 63 (docs/theory.md): each
    patch feature loses one token-space component, ~1/64 of a noise image's energy,
    which caps uniform-noise images near 29 dB. Regression: the bias projection
    used to rebuild d pos as ``e + (d pos - e)``, which lost the digits that the
    rank-63 pseudo-inverse needs (6 dB).
    """
    victim, params, _ = victim_and_params("vit")
    grads, x = leaked("vit", 1)
    gen = build_generator(GeneratorConfig(kind="exact", batch_size=1, exact_cg_iters=2, refine_channels=0),
                          victim, params)
    gen_params = jax.jit(gen.init)(jax.random.PRNGKey(0), grads, params)["params"]
    out = jax.jit(gen.apply)({"params": gen_params}, grads, params)
    assert psnr(out, x) >= 25.0


def test_jit_matches_eager():
    victim, params, _ = victim_and_params("mlp")
    grads, _ = leaked("mlp", 1)
    for kind in ("exact", "lti"):
        gen = build_generator(GeneratorConfig(kind=kind, batch_size=1, lti_hidden=32, refine_channels=0),
                              victim, params)
        gp = filled_params(gen, grads, params)
        eager = gen.apply({"params": gp}, grads, params)
        jitted = jax.jit(gen.apply)({"params": gp}, grads, params)
        np.testing.assert_allclose(eager, jitted, rtol=1e-4, atol=1e-4)


def test_resnet18_generators_build_without_giant_projections():
    victim = make_victim("resnet18")
    abstract_params = jax.eval_shape(victim.init, jax.random.PRNGKey(0))[0]
    grads = jax.tree_util.tree_map(lambda p: jax.ShapeDtypeStruct((2, *p.shape), p.dtype), abstract_params)
    for kind, bound in (("coarse", 15e6), ("lti", 9e6)):  # LTI at B = 2: 6144 outputs
        gen = build_generator(GeneratorConfig(kind=kind, batch_size=2), victim, abstract_params)
        abstract = jax.eval_shape(gen.init, jax.random.PRNGKey(0), grads, abstract_params)["params"]
        n = sum(math.prod(a.shape) for a in jax.tree_util.tree_leaves(abstract))
        assert n < bound, (kind, n)
        out = jax.eval_shape(gen.apply, {"params": abstract}, grads, abstract_params)
        assert out.shape == (2, 2, 32, 32, 3)


# ----------------------------------------------------------------------------- errors


def test_wrong_gradients_and_params_are_rejected():
    victim, params, _ = victim_and_params("mlp")
    _, lenet_params, _ = victim_and_params("lenet")
    lenet_grads, _ = leaked("lenet", 1)
    with pytest.raises(GradientMismatchError):
        build_generator(GeneratorConfig(kind="coarse"), victim, lenet_params)
    grads, _ = leaked("mlp", 1)
    for kind in GENERATORS:
        gen = build_generator(GeneratorConfig(kind=kind, lti_hidden=16, width=16), victim, params)
        with pytest.raises(GradientMismatchError, match="does not match"):
            jax.eval_shape(gen.init, jax.random.PRNGKey(0), lenet_grads, params)
        gp = jax.eval_shape(gen.init, jax.random.PRNGKey(0), grads, params)["params"]
        with pytest.raises(GradientMismatchError, match="does not match"):
            jax.jit(gen.apply)({"params": gp}, lenet_grads, params)
        no_n_axis = jax.tree_util.tree_map(lambda g: g[0], grads)
        with pytest.raises(GradientMismatchError, match="leading axis N"):
            jax.eval_shape(gen.apply, {"params": gp}, no_n_axis, params)
    gen = build_generator(GeneratorConfig(kind="exact"), victim, params)
    gp = jax.eval_shape(gen.init, jax.random.PRNGKey(0), grads, params)["params"]
    with pytest.raises(GitjaxError, match="victim's params"):
        jax.eval_shape(gen.apply, {"params": gp}, grads, None)
    with pytest.raises(ValueError, match="unknown generator kind"):
        GeneratorConfig(kind="gan")


_RESNET_EXACT_STEP = r"""
import jax, jax.numpy as jnp, numpy as np
from gitjax.generators import GeneratorConfig, build_generator
from gitjax.leakage import batch_grad
from gitjax.victims import make_victim
victim = make_victim("resnet8", input_shape=(16, 16, 3))
params, state = jax.jit(victim.init)(jax.random.PRNGKey(0))
x = jax.random.uniform(jax.random.PRNGKey(1), (2, 1, 16, 16, 3))
y = jnp.zeros((2, 1), jnp.int32)
grads = jax.jit(jax.vmap(lambda xi, yi: batch_grad(victim, params, state, xi, yi)))(x, y)
gen = build_generator(GeneratorConfig(kind="exact", batch_size=1, exact_cg_iters=8), victim, params)
gp = jax.jit(gen.init)(jax.random.PRNGKey(0), grads, params)["params"]
loss = lambda p: jnp.mean((gen.apply({"params": p}, grads, params) - x) ** 2)
value, g = jax.jit(jax.value_and_grad(loss))(gp)
ok = bool(np.isfinite(float(value))) and all(bool(jnp.all(jnp.isfinite(l))) for l in jax.tree_util.tree_leaves(g))
print("OK" if ok else "NONFINITE", float(value))
"""


def test_exact_git_resnet_training_step_finishes():
    """Regression: Exact-GIT's ResNet generator (several implicit-gradient CG solves in one
    program) hung forever on XLA:CPU under the concurrency-optimised scheduler. Run in a
    subprocess so that a hang fails this test instead of stalling the suite."""
    import subprocess
    import sys

    try:
        out = subprocess.run([sys.executable, "-c", _RESNET_EXACT_STEP], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.fail("Exact-GIT ResNet-8 training step did not finish in 600 s (XLA:CPU hang?)")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("OK"), out.stdout


def test_exact_git_records_each_layer_input_estimate_on_request():
    """The ``diagnostics`` collection (experiments.exact_cg_iters --layers): one layer-input estimate per
    dense/conv layer, (N, B, *input shape); the MLP's first layer is inverted exactly at B = 1, so its
    estimate is the normalised image. Without the collection requested the output is the same."""
    victim, params, _ = victim_and_params("mlp")
    grads, x = leaked("mlp", 1)
    gen = build_generator(GeneratorConfig(kind="exact", batch_size=1, refine_channels=0), victim, params)
    gp = jax.jit(gen.init)(jax.random.PRNGKey(0), grads, params)["params"]
    out, diag = jax.jit(lambda g: gen.apply({"params": gp}, g, params, mutable=["diagnostics"]))(grads)
    np.testing.assert_array_equal(out, jax.jit(gen.apply)({"params": gp}, grads, params))
    est = {k: v[0] for k, v in diag["diagnostics"]["core"].items()}
    dense = [k for k in params if "kernel" in params[k]]
    assert sorted(est) == sorted(f"{k}_input" for k in dense)
    first = est[f"{dense[0]}_input"]
    assert first.shape == (2, 1, math.prod(victim.input_shape))
    np.testing.assert_allclose(first.reshape(x.shape), victim.normalize(x), atol=1e-3)


def test_exact_git_refiner_depth_adds_dilated_layers_and_keeps_the_exact_path_at_init():
    """``refine_depth`` adds dilated convs (receptive field 5 -> 17 px at depth 2); the refiner's output
    conv is zero-initialised, so at init the image is the exact path's whatever the depth. With
    non-zero weights the deeper refiner changes the image."""
    victim, params, _ = victim_and_params("mlp")
    grads, _ = leaked("mlp", 1)
    outs, trees = [], []
    for depth in (0, 2):
        gen = build_generator(GeneratorConfig(kind="exact", batch_size=1, refine_depth=depth), victim, params)
        gp = jax.jit(gen.init)(jax.random.PRNGKey(0), grads, params)["params"]
        outs.append(np.asarray(jax.jit(gen.apply)({"params": gp}, grads, params)))
        trees.append(gp)
    core0, core2 = trees[0]["core"], trees[1]["core"]
    assert set(core2) - set(core0) == {"refine_mid0", "refine_mid1"}
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-6)
    bumped = jax.tree.map(lambda a: a, trees[1])
    bumped["core"]["refine_out"] = jax.tree.map(lambda a: a + 0.05, bumped["core"]["refine_out"])
    gen2 = build_generator(GeneratorConfig(kind="exact", batch_size=1, refine_depth=2), victim, params)
    assert np.abs(np.asarray(jax.jit(gen2.apply)({"params": bumped}, grads, params)) - outs[1]).max() > 1e-3
    # the dilated layers are on the path: the image depends on them once the output conv is non-zero
    g_mid = jax.jit(jax.grad(lambda p: jnp.sum(gen2.apply({"params": p}, grads, params) ** 2)))(bumped)
    assert float(jnp.abs(g_mid["core"]["refine_mid1"]["kernel"]).max()) > 0.0
    with pytest.raises(ValueError, match="refine_depth"):
        GeneratorConfig(kind="exact", refine_depth=-1)
