"""The hyper-parameters of a GIT generator: one frozen config for the three kinds."""

from __future__ import annotations

import dataclasses

GENERATORS = ("exact", "coarse", "lti")
COARSE_DECODERS = ("latent", "mirror")


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """Hyper-parameters of a GIT generator (re-exported as ``gitjax.generators.GeneratorConfig``).

    Attributes:
      kind: "exact" (Exact-GIT), "coarse" (Coarse-GIT, the paper's main variant) or
        "lti" (Learning to Invert, Wu et al. 2023).
      batch_size: B, the victim images behind one leaked gradient; the generator
        outputs B images per gradient.
      width: hidden width of the MLP parts (Coarse-GIT blocks, Exact-GIT's label-error head).
      depth: layers per MLP block (Coarse-GIT).
      use_victim_params: Exact-GIT reads the victim's weights from ``victim_params``
        (the FL server knows them); if False it learns them, as the paper's Exact-GIT does.
      exact_cg_iters: conjugate-gradient steps per underdetermined layer (Exact-GIT). They
        set how exact the inversion is: on LeNet (B = 1, untrained generator, coffee
        validation patches) 64 / 128 / 256 steps give 22.5 / 29.2 / 41.4 dB (docs/results.md);
        the default stays 64 because the cost is linear in it (ResNets); LeNet presets use 256.
      exact_cg_grad_iters: CG steps of the transposed solve that gives the implicit gradient
        of each CG solve (training only; the output does not depend on it); 0: as many as
        ``exact_cg_iters``; never more than those. Default 16: on LeNet (lenet_exact's stream,
        64 forward steps, 100 training steps x 32) 16 and 64 gave the same validation PSNR
        (22.47 -> 23.37 dB, test 22.649 dB both) at 1.6x the examples/s (37.5 vs 23).
      exact_noise_aware: Exact-GIT estimates the leaked gradient's noise level (the energy of
        the head's gradient beyond rank B) and adds noise-scaled, learned ridge terms to every
        underdetermined layer's solves (0 on a clean gradient: the exact inverse is kept).
      exact_ridge: relative singular-value cutoff of Exact-GIT's exact pseudo-inverses (the
        initial relative ridge of the underdetermined ones is max(exact_ridge, 1e-4)).
      refine_channels: channels of the zero-initialised residual image refiner
        that ends Exact-GIT (0: none).
      refine_depth: extra 3x3 conv layers in that refiner, dilated 2, 4, 8, ... (0: two
        convs, a 5 px receptive field). Where the exact path recovers only part of the
        image (ResNet-8: most layers get fewer gradient equations than unknowns), a wider
        field (3 layers: 33 px, the whole 32 x 32 image from its centre) corrects colour.
      coarse_rank: R of Coarse-GIT's factorised sketches ``U^T G V``.
      probe_max: probe vectors and per-channel gradients up to this length enter
        Coarse-GIT raw; longer ones are sketched.
      decoder_channels: channels of Coarse-GIT's image decoder at its lowest resolution.
      coarse_decoder: "latent" (the latent vector h is decoded to the image by a dense
        layer and transposed convolutions) or "mirror" (a spatial state shaped like each
        conv unit's output is carried back through the victim's conv units in reverse, one
        shallow conv block per unit, modulated by h and that unit's own gradient features;
        it starts from the head's probe, which at B = 1 is the exact input activation).
      lti_hidden: hidden width of the LTI MLP (the paper uses 3000; the default fits a CPU).
      lti_layers: hidden layers of the LTI MLP (the paper uses 2).
      lti_compress_dim: LTI compresses gradients longer than this with a fixed
        seeded random projection (Kronecker-structured, so it also fits ResNet-18).
      seed: seed of the fixed random projections.
    """

    kind: str = "coarse"
    batch_size: int = 1
    width: int = 256
    depth: int = 2
    use_victim_params: bool = True
    exact_cg_iters: int = 64
    exact_cg_grad_iters: int = 16
    exact_noise_aware: bool = True
    exact_ridge: float = 1e-6
    refine_channels: int = 16
    refine_depth: int = 0
    coarse_rank: int = 16
    probe_max: int = 1024
    decoder_channels: int = 64
    coarse_decoder: str = "latent"
    lti_hidden: int = 1000
    lti_layers: int = 2
    lti_compress_dim: int = 1024
    seed: int = 0

    def __post_init__(self):
        if self.kind not in GENERATORS:
            raise ValueError(f"unknown generator kind {self.kind!r}; expected one of {', '.join(GENERATORS)}")
        if self.coarse_decoder not in COARSE_DECODERS:
            raise ValueError(f"unknown coarse_decoder {self.coarse_decoder!r}; expected one of "
                             f"{', '.join(COARSE_DECODERS)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.refine_depth < 0:
            raise ValueError("refine_depth must be >= 0")
        if self.exact_cg_iters < 0 or self.exact_cg_grad_iters < 0:
            raise ValueError("exact_cg_iters and exact_cg_grad_iters must be >= 0")
        if min(self.width, self.depth, self.coarse_rank, self.lti_hidden, self.lti_compress_dim) < 1:
            raise ValueError("width, depth, coarse_rank, lti_hidden and lti_compress_dim must be >= 1")
