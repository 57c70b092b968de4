"""What one ``klip-med bench`` run measures: validated settings, each error naming its CLI flag."""

from __future__ import annotations

from dataclasses import dataclass

from klip_med.errors import KLIPMedError, expect

SAMPLERS = ("dps", "fast")
DTYPES = ("float32", "bfloat16")
COMPARISONS = ("deepinv", "trajectory")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


def parse_compare(text: str) -> tuple[str, ...]:
    """``"deepinv,trajectory"`` -> the comparisons to run; ``"none"`` or ``""`` -> none.

    Raises:
        KLIPMedError: an item outside :data:`COMPARISONS`, naming ``--compare``.
    """
    items = [] if text.strip().lower() in ("", "none") else [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in items if v not in COMPARISONS]
    expect(not unknown, "--compare", f"a comma-separated subset of {list(COMPARISONS)} (or 'none')",
           ", ".join(repr(v) for v in unknown))
    return tuple(dict.fromkeys(items))


@dataclass(frozen=True)
class BenchSettings:
    """Settings of one benchmark (the ``klip-med bench`` flags).

    Attributes:
        prior: shipped prior name or a prior folder.
        device: ``cpu`` or ``cuda[:N]``.
        image_size: image side in pixels; ``None`` = the prior's own. Another size builds an
            untrained network of the same architecture (timing only, no PSNR).
        samples: posterior samples S per slice.
        steps: sampling steps N.
        sampler: ``fast`` (DDS, 1 forward per step) or ``dps`` (1 forward + 1 backward per step).
        batch: slices B per sampler call (the network sees B x S images at once).
        repeats: timed runs with and without the KLIP accumulator (medians are reported).
        warmup: untimed warm-up runs of ``min(steps, 3)`` steps (same shapes: compilation,
            allocator and cuDNN autotuning happen there).
        compare_repeats: timed runs of each comparison (deepinv, trajectory, float32 reference).
        physics: operator spec; ``None`` = the demo's for the prior's modality.
        dtype: ``float32`` or ``bfloat16`` (autocast of the network only; the sampler and the
            accumulator stay float32).
        check_bf16: with ``bfloat16``, also run the float32 network (compiled alike) on the same
            seed for the KLIP map error; off saves a second compilation when an eager run already
            measured it.
        compile: ``torch.compile`` the network with ``compile_mode``.
        compile_backend: ``inductor`` (the real thing); ``aot_eager`` / ``eager`` only trace the
            network (seconds instead of minutes on a CPU: dry runs of a session script).
        channels_last: run the network in channels-last memory format.
        tf32: allow TF32 matmuls / convolutions on CUDA (restored afterwards).
        compare: which comparisons to run (:data:`COMPARISONS`).
        windows: KLIP window specs (``full``, ``t:A,B``, ``sigma:A,B``) the accumulator fills.
        seed: seeds the measurement and every sampling run (same seed for with / without KLIP).
        block_size: block side (pixels) for the bf16-vs-float32 block-map comparison.
        deepinv_weight: deepinv DPS guidance weight (deepinv's default 1.0).
        normalization: the accumulator's KL normalisation (as ``klip-med run --normalization``).
        dps_zeta: DPS step size of our DPS sampler (as ``--zeta``).
        dds_eta, dds_gamma, cg_iters: the fast sampler's DDIM stochasticity, data weight and CG
            iterations (as ``--eta``, ``--gamma``, ``--cg-iters``).
    """

    prior: str
    device: str = "cpu"
    image_size: int | None = None
    samples: int = 4
    steps: int = 50
    sampler: str = "fast"
    batch: int = 1
    repeats: int = 3
    warmup: int = 1
    compare_repeats: int = 1
    physics: str | None = None
    dtype: str = "float32"
    check_bf16: bool = True
    compile: bool = False
    compile_mode: str = "default"
    compile_backend: str = "inductor"
    channels_last: bool = False
    tf32: bool = False
    compare: tuple[str, ...] = COMPARISONS
    windows: tuple[str, ...] = ("full",)
    seed: int = 0
    block_size: int = 8
    deepinv_weight: float = 1.0
    normalization: str = "transition"
    dps_zeta: float = 0.3
    dds_eta: float = 0.85
    dds_gamma: float = 1.0
    cg_iters: int = 5

    def __post_init__(self) -> None:
        expect(self.sampler in SAMPLERS, "--sampler", f"one of {list(SAMPLERS)}", repr(self.sampler))
        expect(self.dtype in DTYPES, "--dtype", f"one of {list(DTYPES)}", repr(self.dtype))
        expect(self.compile_mode in COMPILE_MODES, "--compile-mode", f"one of {list(COMPILE_MODES)}",
               repr(self.compile_mode))
        expect(self.compile_backend in COMPILE_BACKENDS, "--compile-backend",
               f"one of {list(COMPILE_BACKENDS)}", repr(self.compile_backend))
        for flag, value, low in (("--samples", self.samples, 1), ("--steps", self.steps, 1),
                                 ("--batch", self.batch, 1), ("--repeats", self.repeats, 1),
                                 ("--warmup", self.warmup, 0), ("--compare-repeats", self.compare_repeats, 1),
                                 ("--block-size", self.block_size, 1)):
            expect(isinstance(value, int) and value >= low, flag, f"an integer >= {low}", repr(value))
        if self.image_size is not None:
            expect(isinstance(self.image_size, int) and self.image_size >= 8, "--image-size",
                   "an integer >= 8", repr(self.image_size))
        expect(self.device == "cpu" or self.device.startswith("cuda"), "--device", "cpu or cuda[:N]",
               repr(self.device))
        expect(bool(self.windows), "--windows", "at least one window", "none")
        expect(self.normalization in ("transition", "sde", "paper"), "--normalization",
               "one of ['transition', 'sde', 'paper']", repr(self.normalization))
        if not isinstance(self.compare, tuple) or any(c not in COMPARISONS for c in self.compare):
            raise KLIPMedError(f"--compare: expected a subset of {list(COMPARISONS)}, found {self.compare!r}")

    def klip_settings(self):
        """The :class:`klip_med.pipeline.KLIPSettings` of the timed runs (windows parsed later)."""
        from klip_med.pipeline.settings import KLIPSettings

        return KLIPSettings(samples=self.samples, steps=self.steps, sampler=self.sampler,
                            block_size=self.block_size, normalization=self.normalization, seed=self.seed,
                            dps_zeta=self.dps_zeta, dds_eta=self.dds_eta, dds_gamma=self.dds_gamma,
                            cg_iters=self.cg_iters)

    @property
    def compiled(self) -> str | None:
        """The ``torch.compile`` mode in use, or ``None``."""
        return self.compile_mode if self.compile else None


def check_image_size(size: int, architecture: dict, prior_name: str) -> None:
    """Raise unless the UNet of ``architecture`` accepts ``size`` x ``size`` images.

    MONAI's ``DiffusionModelUNet`` halves the image once per level after the first, so the side
    must be a multiple of ``2 ** (levels - 1)``.
    """
    factor = 2 ** (len(architecture["channels"]) - 1)
    expect(size % factor == 0, "--image-size",
           f"a multiple of {factor} (the {len(architecture['channels'])}-level UNet of {prior_name} halves "
           f"the image {len(architecture['channels']) - 1} times)", repr(size))
