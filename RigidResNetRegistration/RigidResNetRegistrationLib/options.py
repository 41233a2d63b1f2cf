"""The registration options: one torch-free place for every choice, default, range and rule.

Every front door takes its choices and defaults from here: the command line (``cli.py``'s
parser and its batch CSV), the Slicer module's parameter node and Logic, and the Python API
(:class:`RegistrationOptions`). :meth:`RegistrationOptions.validate` holds the rules about the
values themselves; :func:`option_conflicts` the rules about options *given* that the others make
pointless (a front door that knows which options its user set, as the command line does, asks it,
naming the options its own way).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping

import numpy as np

from .errors import InputError
from .geometry import ORIENTATION_AXES

MODES = ("volume", "slices")
AXES = ("auto", *ORIENTATION_AXES)
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
METRICS = ("auto", "ncc", "mi")
#: Where a registration starts (:mod:`initialise`).
INIT_MODES = ("auto", "header", "centre", "moments")
ITERATIONS_RANGE = (1, 20)
BATCH_SIZE_RANGE = (1, 4096)
SYMMETRIC_STRIDE_RANGE = (1, 64)

#: Fraction of a slice's network-grid pixels that must be signal (in both volumes) for the slice to
#: be registered; the trainer draws its slices with the same rule, so that the network learns every
#: slice the engine gives it (the top of the brain included).
MIN_FOREGROUND = 0.05


@dataclass
class RegistrationOptions:
    """How to register. ``mode``: ``volume`` (one transform) or ``slices`` (one per slice);
    ``axis``: ``auto`` (closest to S) or ``axial``/``coronal``/``sagittal``; ``iterations``:
    at most this many predict/warp/compose passes, stopping early once a pass corrects by less
    than ``tolerance`` (degrees and mm; 0 = always make every pass); ``max_slices``: in ``volume`` mode, how many informative slices
    are registered (spread over the brain; 0 = all); in ``slices`` mode, which always registers
    all of them, how many give the common motion every slice starts from (0 = 8);
    ``precision``: network arithmetic, ``fp32``, ``bf16`` or ``auto`` (bf16 where the device
    computes it natively: recent NVIDIA GPUs, CPUs with AVX-512 BF16/AMX; fp32 elsewhere);
    ``symmetric``: every slice pair is predicted in both orders and the estimates combined
    inverse-consistently (:func:`geometry.symmetric_params_2d`; twice the network work, on
    held-out slice pairs median errors 0.24 -> 0.04 deg same contrast after two passes);
    ``symmetric_stride``: ``slices`` mode, on the pass over every slice, only every n-th slice
    (and the last) is predicted in both orders, the others in one order with the order-independent
    error interpolated between them subtracted (:func:`geometry.symmetric_params_2d_interpolated`;
    1 + 1/n network inputs per slice instead of 2; 1 = every slice in both orders). With 3 (the
    default), on a held-out scan per-slice errors went from 0.021 to 0.041 deg (same contrast, one
    motion) and 0.28 to 0.30 mm (across contrasts, motion between slices) for 11-26% less time;
    ``volume`` mode (slices spread over the brain) always predicts both orders;
    ``refine``: ``volume`` mode only, polish the network's transform by optimising all six rigid
    parameters (3 rotations, 3 translations) on image similarity (:mod:`refine`): the result is a
    full 3D rigid transform, no longer only in-plane; ``refine_slices``: ``slices`` mode, rigid
    models only, refine each slice's own in-plane transform on its image similarity
    (:func:`refine.refine_slices`; off by default: on a held-out scan it took per-slice errors from
    0.041 to 0.005 deg same contrast and rotation from 0.19-0.29 to 0.10-0.12 deg across contrasts,
    for about 5 ms (NCC) or 10 ms (MI) more per slice); ``metric``: the similarity refined, ``ncc``
    (same contrast), ``mi`` (different contrasts) or ``auto`` (:func:`choose_metric`: NCC when the
    network-aligned slices correlate at >= 0.8 inside the brain, else MI); ``refine_levels_mm``: its sample spacings, coarse to
    fine; ``min_foreground``: fraction of a slice's pixels that must be signal in both volumes for it
    to be used; ``outlier_floor``: smallest deviation from the median (per parameter, model
    units) that counts as an outlier in ``volume`` mode; ``init``: where the registration starts
    (:mod:`initialise`): ``header`` (the headers as they are), ``centre`` (centres of mass),
    ``moments`` (centres and principal axes) or ``auto`` (the headers when the two foregrounds
    overlap well under them, otherwise moments; in ``volume`` mode also a coarse search over
    rotations of up to 30 degrees about every axis, for motions beyond the network's and the
    refinement's reach); ``initial_transform``: a 4x4 RAS resampling transform (fixed -> moving,
    as ``RegistrationResult.fixed_to_moving_ras``) that places the moving volume before ``init``
    (None: none); the result includes it."""

    mode: str = "volume"
    axis: str = "auto"
    device: str = "auto"
    batch_size: int = 32
    iterations: int = 6
    tolerance: float = 0.2
    max_slices: int = 8
    precision: str = "auto"
    symmetric: bool = True
    symmetric_stride: int = 3
    refine: bool = True
    refine_slices: bool = False
    metric: str = "auto"
    refine_levels_mm: tuple[float, ...] = (8.0, 4.0, 2.0)
    min_foreground: float = MIN_FOREGROUND
    outlier_floor: float = 0.5
    compute_registered: bool = True
    compute_difference: bool = True
    init: str = "auto"
    initial_transform: np.ndarray | None = None

    @property
    def refined(self) -> bool:
        """Whether a refinement on image similarity follows the network in this mode (rigid models):
        ``refine`` in ``volume`` mode, ``refine_slices`` in ``slices`` mode; the other mode's setting
        is ignored (a panel keeps both)."""
        return bool(self.refine_slices if self.mode == "slices" else self.refine)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.axis not in AXES:
            raise InputError(f"axis must be auto, axial, coronal or sagittal, not {self.axis!r}")
        if self.device not in DEVICES:
            raise InputError(f"device must be one of {', '.join(DEVICES)}, not {self.device!r}")
        if not _int_within(self.batch_size, BATCH_SIZE_RANGE):
            raise InputError(f"batch size must be a positive integer (at most {BATCH_SIZE_RANGE[1]}), "
                             f"not {self.batch_size!r}")
        if not _int_within(self.iterations, ITERATIONS_RANGE):
            raise InputError(f"iterations must be an integer from {ITERATIONS_RANGE[0]} to {ITERATIONS_RANGE[1]}, "
                             f"not {self.iterations!r}")
        if not (isinstance(self.tolerance, (int, float)) and 0.0 <= self.tolerance < 10.0):
            raise InputError(f"tolerance must be a number of degrees/mm in [0, 10), not {self.tolerance!r}")
        if not isinstance(self.max_slices, int) or self.max_slices < 0:
            raise InputError(f"max_slices must be 0 (all) or a positive integer, not {self.max_slices!r}")
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if not isinstance(self.symmetric, bool):
            raise InputError(f"symmetric must be True or False, not {self.symmetric!r}")
        if not _int_within(self.symmetric_stride, SYMMETRIC_STRIDE_RANGE):
            raise InputError(f"symmetric stride must be an integer from {SYMMETRIC_STRIDE_RANGE[0]} to "
                             f"{SYMMETRIC_STRIDE_RANGE[1]}, not {self.symmetric_stride!r}")
        if not isinstance(self.refine_slices, bool):
            raise InputError(f"refine_slices must be True or False, not {self.refine_slices!r}")
        if self.metric not in METRICS:
            raise InputError(f"metric must be one of {', '.join(METRICS)}, not {self.metric!r}")
        if self.metric != "auto" and not self.refined:
            raise InputError(f"metric {self.metric!r} is the similarity a refinement maximises, but "
                             + ("slices mode without refine_slices" if self.mode == "slices" else "volume mode without refine")
                             + " refines nothing")
        if not 0.0 <= self.min_foreground < 1.0:
            raise InputError(f"min_foreground must be in [0, 1), not {self.min_foreground!r}")
        if self.init not in INIT_MODES:
            raise InputError(f"init must be one of {', '.join(INIT_MODES)}, not {self.init!r}")
        if self.initial_transform is not None:
            t = np.asarray(self.initial_transform, dtype=np.float64)
            if t.shape != (4, 4) or not np.all(np.isfinite(t)) or not np.allclose(t[3], [0, 0, 0, 1]) \
                    or abs(np.linalg.det(t[:3, :3])) < 1e-6:
                raise InputError("the initial transform must be an invertible 4x4 affine matrix (RAS, fixed -> moving)")


def _int_within(value: object, bounds: tuple[int, int]) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and bounds[0] <= value <= bounds[1]


#: The registration options' defaults, for front doors that restate none of them.
DEFAULTS = RegistrationOptions()


def default(name: str) -> object:
    """The default of the option ``name`` (a :class:`RegistrationOptions` field)."""
    if name not in {f.name for f in fields(RegistrationOptions)}:
        raise KeyError(f"no registration option {name!r}")
    return getattr(DEFAULTS, name)


def option_conflicts(options: RegistrationOptions, given: set[str], names: Mapping[str, str] | None = None) -> str | None:
    """The first contradiction between the options a user *gave* (``given``: field names) and the
    others, as one line, or None. Unlike :meth:`RegistrationOptions.validate`, these are options
    that would be ignored (an option the others make pointless), which a front door that knows what
    its user set reports instead of silently ignoring. ``names`` maps a field name (and
    ``"mode=slices"``) to the front door's own spelling, e.g. ``{"refine": "--no-refine"}``; a
    missing name is shown as the field name."""
    n = {**{f.name: f.name for f in fields(RegistrationOptions)}, "mode=slices": "mode=slices", **(names or {})}
    slices = options.mode == "slices"
    if "refine" in given and slices:
        return (f"{n['refine']} turns off volume mode's refinement; {n['mode=slices']} is only refined with "
                f"{n['refine_slices']}")
    if options.refine_slices and not slices:
        return (f"{n['refine_slices']} refines each slice of {n['mode=slices']}; volume mode is refined by default "
                f"({n['refine']} turns that off)")
    if "metric" in given and not options.refined:
        return (f"{n['metric']} is the similarity a refinement maximises, but "
                + (f"{n['mode=slices']} without {n['refine_slices']}" if slices else n["refine"]) + " refines nothing")
    if "symmetric_stride" in given and not slices:
        return f"{n['symmetric_stride']} is for {n['mode=slices']}; volume mode predicts every slice in both orders"
    if "symmetric_stride" in given and not options.symmetric:
        return f"{n['symmetric_stride']} picks the slices predicted in both orders; {n['symmetric']} predicts all in one order"
    if "tolerance" in given and options.iterations == 1:
        return f"{n['tolerance']} stops the passes early; {n['iterations']} 1 makes a single pass"
    return None
