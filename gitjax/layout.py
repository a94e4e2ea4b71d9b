"""Layer-aligned gradient blocks: a gradient pytree <-> ordered per-layer blocks <-> a flat vector.

The generators of GIT read a leaked gradient one victim layer at a time, in the
victim's forward order (reversed by the generator). ``jax.tree_util`` sorts dict
keys alphabetically ("conv10" before "conv2"), so the layout walks the Flax
parameter dict in insertion order instead, which is the order in which the
modules were created in the forward pass.

Insertion order is lost by every JAX transformation (``tree_map``, ``jit``,
``grad`` rebuild dicts with sorted keys), so ``from_params`` takes the forward
order as a value: ``order=gitjax.trace.forward_order(victim)`` (read from a traced
``init``). Without it the dicts' insertion order is used. The module keeps no state.

A block is one Flax module that owns arrays directly (a Dense, Conv, norm layer),
or one loose array owned by a parent module (ViT's ``pos_embed``/``cls``).

All functions accept gradients with extra *leading* axes (e.g. N independent
gradients, or per-example gradients with a B axis): leaf shapes are compared by
their trailing dimensions.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gitjax.types import Array, Grads, GradientMismatchError, NonFiniteGradientError, Params


@dataclasses.dataclass(frozen=True)
class LayerBlock:
    """One victim layer's share of the gradient.

    Attributes:
      path: module path in the params dict, e.g. ("stage0_block0", "conv1").
      kind: "dense" | "conv" | "norm" | "embed" (a loose parameter array).
      leaves: ((leaf name, shape), ...) sorted by name, e.g. (("bias", (12,)), ("kernel", (5, 5, 3, 12))).
      offset: start of this block in the flat gradient vector.
    """

    path: tuple[str, ...]
    kind: str
    leaves: tuple[tuple[str, tuple[int, ...]], ...]
    offset: int

    @property
    def name(self) -> str:
        return "/".join(self.path)

    @property
    def size(self) -> int:
        return sum(math.prod(s) for _, s in self.leaves)

    def shape(self, leaf: str) -> tuple[int, ...] | None:
        return dict(self.leaves).get(leaf)

    @property
    def kernel_shape(self) -> tuple[int, ...] | None:
        return self.shape("kernel")

    @property
    def bias_shape(self) -> tuple[int, ...] | None:
        return self.shape("bias")

    @property
    def group(self) -> str:
        """Coarse group: the top-level module with any trailing ``_block<i>`` removed (a ResNet stage)."""
        return re.sub(r"_block\d+$", "", self.path[0])


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _kind(leaves: Mapping[str, tuple[int, ...]]) -> str:
    if "kernel" in leaves:
        return "conv" if len(leaves["kernel"]) == 4 else "dense"
    if "scale" in leaves:
        return "norm"
    return "embed"


def _leaf_paths(node: Mapping[str, Any], path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Path of every array in a nested mapping, in insertion order."""
    out = []
    for k, v in node.items():
        if _is_array(v):
            out.append(path + (k,))
        elif isinstance(v, Mapping):
            out.extend(_leaf_paths(v, path + (k,)))
    return out


def _in_order(params: Params, order: Sequence[tuple[str, ...]]) -> Params:
    """Rebuilds ``params`` with dict keys in ``order`` (unchanged if ``order`` names other leaves)."""
    if not isinstance(params, Mapping) or sorted(_leaf_paths(params)) != sorted(map(tuple, order)):
        return params
    tree: dict[str, Any] = {}
    for path in order:
        node, src = tree, params
        for k in path[:-1]:
            node = node.setdefault(k, {})
            src = src[k]
        node[path[-1]] = src[path[-1]]
    return tree


@dataclasses.dataclass(frozen=True)
class GradientLayout:
    """The ordered layer blocks of a victim's parameter pytree (forward order)."""

    blocks: tuple[LayerBlock, ...]

    @classmethod
    def from_params(cls, params: Params, order: Sequence[tuple[str, ...]] | None = None) -> "GradientLayout":
        """Builds the layout from a parameter (or abstract ``ShapeDtypeStruct``) pytree.

        Args:
          params: the victim's parameters (or their shapes); values are not read.
          order: leaf paths in forward order (``gitjax.trace.forward_order(victim)``); when
            None, or naming other leaves than ``params`` has, the dicts' insertion order.
        """
        if order is not None:
            params = _in_order(params, order)
        blocks: list[LayerBlock] = []
        offset = 0

        def visit(node: Mapping[str, Any], path: tuple[str, ...]) -> None:
            # Walk in insertion (= creation) order; a module's kernel/bias/scale form one block.
            nonlocal offset
            module_leaves = {k: tuple(node[k].shape) for k in sorted(node)
                             if k in ("kernel", "bias", "scale") and _is_array(node[k])}
            emitted = False
            for k, v in node.items():
                if k in module_leaves:
                    if not emitted:
                        blk = LayerBlock(path, _kind(module_leaves), tuple(module_leaves.items()), offset)
                        emitted = True
                    else:
                        continue
                elif _is_array(v):  # e.g. ViT pos_embed, cls: one block each
                    blk = LayerBlock(path + (k,), "embed", (("value", tuple(v.shape)),), offset)
                else:
                    visit(v, path + (k,))
                    continue
                blocks.append(blk)
                offset += blk.size

        visit(params, ())
        return cls(tuple(blocks))

    # ------------------------------------------------------------------ queries
    @property
    def size(self) -> int:
        """P: total number of gradient entries."""
        return sum(b.size for b in self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def leaf_paths(self) -> tuple[tuple[str, ...], ...]:
        """Paths of the parameter leaves block by block (the ``order`` that rebuilds this layout)."""
        return tuple(b.path if b.kind == "embed" else b.path + (n,) for b in self.blocks for n, _ in b.leaves)

    def groups(self) -> dict[str, list[int]]:
        """Coarse group name -> indices of its blocks, in forward order."""
        out: dict[str, list[int]] = {}
        for i, b in enumerate(self.blocks):
            out.setdefault(b.group, []).append(i)
        return out

    def describe(self) -> str:
        lines = [f"{'#':>3}  {'block':<28} {'kind':<6} {'size':>9}  leaves"]
        for i, b in enumerate(self.blocks):
            leaves = ", ".join(f"{n}{s}" for n, s in b.leaves)
            lines.append(f"{i:>3}  {b.name:<28} {b.kind:<6} {b.size:>9}  {leaves}")
        lines.append(f"total {self.size} entries in {len(self.blocks)} blocks")
        return "\n".join(lines)

    # ------------------------------------------------------------------ access
    @staticmethod
    def _get(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
        for k in path:
            tree = tree[k]
        return tree

    def _block_leaf(self, grads: Grads, block: LayerBlock, leaf: str) -> Array:
        if block.kind == "embed" and leaf == "value":
            return self._get(grads, block.path)
        return self._get(grads, block.path)[leaf]

    def to_blocks(self, grads: Grads) -> list[dict[str, Array]]:
        """Gradient pytree -> [ {leaf name: array} per block ] in forward order."""
        self.check(grads)
        return [{n: self._block_leaf(grads, b, n) for n, _ in b.leaves} for b in self.blocks]

    def from_blocks(self, blocks: Sequence[Mapping[str, Array]]) -> Grads:
        """Inverse of ``to_blocks``: rebuild the nested-dict gradient pytree."""
        if len(blocks) != len(self.blocks):
            raise GradientMismatchError(f"expected {len(self.blocks)} blocks, got {len(blocks)}")
        tree: dict[str, Any] = {}
        for b, vals in zip(self.blocks, blocks):
            if b.kind == "embed":
                node = tree
                for k in b.path[:-1]:
                    node = node.setdefault(k, {})
                node[b.path[-1]] = vals["value"]
            else:
                node = tree
                for k in b.path:
                    node = node.setdefault(k, {})
                node.update({n: vals[n] for n, _ in b.leaves})
        return tree

    def flatten(self, grads: Grads) -> Array:
        """Gradient pytree with leading axes L -> (*L, P) in block order."""
        parts = []
        for b, vals in zip(self.blocks, self.to_blocks(grads)):
            for n, s in b.leaves:
                v = vals[n]
                lead = v.shape[: v.ndim - len(s)]
                parts.append(v.reshape(lead + (-1,)))
        return jnp.concatenate(parts, axis=-1)

    def unflatten(self, flat: Array) -> Grads:
        """(*L, P) -> gradient pytree with leading axes L."""
        if flat.shape[-1] != self.size:
            raise GradientMismatchError(f"flat gradient has {flat.shape[-1]} entries; the layout has {self.size}")
        lead = flat.shape[:-1]
        blocks, i = [], 0
        for b in self.blocks:
            vals = {}
            for n, s in b.leaves:
                k = math.prod(s)
                vals[n] = flat[..., i : i + k].reshape(lead + s)
                i += k
            blocks.append(vals)
        return self.from_blocks(blocks)

    # ------------------------------------------------------------------ validation
    def check(self, grads: Grads) -> None:
        """Raises GradientMismatchError naming the first differences from this layout."""
        problems: list[str] = []
        lead: tuple[int, ...] | None = None
        for b in self.blocks:
            try:
                node = self._get(grads, b.path if b.kind != "embed" else b.path)
            except (KeyError, TypeError, IndexError):
                problems.append(f"missing layer {b.name!r}")
                continue
            for n, s in b.leaves:
                v = node if b.kind == "embed" else (node.get(n) if isinstance(node, Mapping) else None)
                if v is None or not _is_array(v):
                    problems.append(f"missing {b.name}/{n}")
                    continue
                vs = tuple(v.shape)
                if len(vs) < len(s) or vs[len(vs) - len(s) :] != s:
                    problems.append(f"{b.name}/{n}: expected shape (..., {', '.join(map(str, s))}), got {vs}")
                    continue
                this_lead = vs[: len(vs) - len(s)]
                if lead is None:
                    lead = this_lead
                elif this_lead != lead:
                    problems.append(f"{b.name}/{n}: leading axes {this_lead} differ from {lead}")
        n_expected = sum(len(b.leaves) for b in self.blocks)
        n_got = len(jax.tree_util.tree_leaves(grads))
        if n_got != n_expected:
            problems.append(f"gradient has {n_got} arrays, the victim has {n_expected}")
        if problems:
            shown = "; ".join(problems[:5]) + (f"; ... ({len(problems) - 5} more)" if len(problems) > 5 else "")
            raise GradientMismatchError(f"gradient pytree does not match the victim model: {shown}")


def check_finite(grads: Grads) -> None:
    """Raises NonFiniteGradientError naming the layers with NaN/inf (host-side check; not for jit)."""
    bad = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        arr = np.asarray(leaf)
        if not np.all(np.isfinite(arr)):
            bad.append(f"{jax.tree_util.keystr(path)} ({int(np.sum(~np.isfinite(arr)))} non-finite)")
    if bad:
        raise NonFiniteGradientError("leaked gradient contains NaN/inf values in: " + ", ".join(bad[:5]))


def validate_gradient(layout: GradientLayout, grads: Grads) -> None:
    """The checks every attack runs on a user-supplied gradient: structure, shapes, finiteness."""
    layout.check(grads)
    check_finite(grads)
