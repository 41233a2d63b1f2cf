"""The methods compared, each one function with one signature.

3D: ``register(fixed, moving) -> MethodOutput``: volumes (``.array[i, j, k]``, ``.ijk_to_ras``) in
memory -> the 4x4 RAS *resampling* transform (fixed point -> moving point) and the moving volume
resampled onto the fixed grid. ``setup_<name>(settings)`` imports the method's package, sets its
thread count and loads what is loaded once (our model) and returns that function; it raises
:class:`MethodUnavailable` (with the reason) when the package does not import.

2D (network-grid slice pairs, ``(H, W)`` images at ``spacing_mm``): :func:`sitk_rigid_2d` returns
slice-frame parameters ``(theta_deg, tx_mm, ty_mm)`` in this project's convention
(``geometry.params_to_matrix_2d``); our network on slice pairs runs in the worker through
``rrr_training.evaluate.evaluate_batch``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from RigidResNetRegistrationLib import geometry as geo

from . import itk_bridge as bridge

#: Method keys (``--methods``), in report order, with their labels.
METHOD_LABELS: dict[str, str] = {
    "ours": "ours (ResNet-34 engine + 6-DOF refinement, default)",
    "ours-net": "ours, network only (--no-refine)",
    "sitk": "SimpleITK rigid (Mattes MI)",
    "ants": "ANTsPy Rigid",
    "elastix": "elastix rigid (default map)",
}
#: Methods that also have a 2D slice-pair variant.
METHODS_2D = ("ours", "sitk")


class MethodUnavailable(RuntimeError):
    """The method's package does not import (the message says why)."""


@dataclass
class Settings:
    threads: int = 2
    device: str = "cpu"
    iterations: int | None = None  # our engine's passes (None: the engine's default)
    weights: str | None = None  # model card (None: bundled)
    batch_size: int = 32
    pair_passes: int | None = None  # our network's passes on 2D slice pairs (None: as ``iterations``)
    slices_mode: bool = True  # also time our slices mode on the 3D cases


@dataclass
class MethodOutput:
    fixed_to_moving_ras: np.ndarray
    registered: np.ndarray  # array[i, j, k] on the fixed grid


#: ``register(fixed, moving, unshared=False)``: ``unshared`` (cases whose headers share no frame,
#: ``cases.unshare_header``) makes a peer use its standard initialiser for such pairs; ours always
#: starts with its default (``init auto``).
Register = Callable[..., MethodOutput]


def set_thread_env(threads: int, env: dict[str, str] | None = None) -> dict[str, str]:
    """Thread-count environment for every library (set before they are imported)."""
    env = os.environ if env is None else env
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                "VECLIB_MAXIMUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        env[key] = str(threads)
    return env  # type: ignore[return-value]


# --------------------------------------------------------------------------- ours


def setup_ours_network_only(settings: Settings) -> Register:
    """Our engine without the refinement stage: the network's in-plane estimate alone."""
    return setup_ours(settings, refine=False)


def setup_ours(settings: Settings, refine: bool = True) -> Register:
    import torch

    from RigidResNetRegistrationLib.engine import RegistrationOptions, register_volumes
    from RigidResNetRegistrationLib.model import load_model
    from RigidResNetRegistrationLib.preprocess import Volume

    torch.set_num_threads(settings.threads)
    model = load_model(settings.weights, settings.device)
    kw = {} if settings.iterations is None else {"iterations": settings.iterations}
    options = RegistrationOptions(device=settings.device, compute_difference=False, batch_size=settings.batch_size,
                                  refine=refine, **kw)

    def register(fixed, moving, unshared: bool = False) -> MethodOutput:
        result = register_volumes(Volume(fixed.array, fixed.ijk_to_ras, "fixed volume"),
                                  Volume(moving.array, moving.ijk_to_ras, "moving volume"), model, options)
        return MethodOutput(result.fixed_to_moving_ras, result.registered.array)

    register.model = model  # type: ignore[attr-defined]
    register.options = options  # type: ignore[attr-defined]
    return register


# --------------------------------------------------------------------------- SimpleITK

#: The SimpleITK 3D setup (the README lists it): a standard multi-resolution rigid MI registration.
SITK_3D = dict(bins=50, sampling=0.10, shrink=(4, 2, 1), smoothing_vox=(2.0, 1.0, 0.0), learning_rate=2.0,
               min_step=1e-4, iterations=200, relaxation=0.5, seed=1)
#: The SimpleITK 2D (slice pair) setup.
SITK_2D = dict(bins=32, sampling=None, shrink=(4, 2, 1), smoothing_vox=(2.0, 1.0, 0.0), learning_rate=2.0,
               min_step=1e-4, iterations=200, relaxation=0.5, seed=1)


def _sitk_method(sitk, transform, cfg: dict):
    r = sitk.ImageRegistrationMethod()
    r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(cfg["bins"]))
    if cfg["sampling"]:
        r.SetMetricSamplingStrategy(r.RANDOM)
        r.SetMetricSamplingPercentage(float(cfg["sampling"]), int(cfg["seed"]))
    else:
        r.SetMetricSamplingStrategy(r.NONE)
    r.SetInterpolator(sitk.sitkLinear)
    r.SetOptimizerAsRegularStepGradientDescent(learningRate=float(cfg["learning_rate"]), minStep=float(cfg["min_step"]),
                                               numberOfIterations=int(cfg["iterations"]),
                                               relaxationFactor=float(cfg["relaxation"]), gradientMagnitudeTolerance=1e-8)
    r.SetOptimizerScalesFromPhysicalShift()
    r.SetShrinkFactorsPerLevel(list(cfg["shrink"]))
    r.SetSmoothingSigmasPerLevel(list(cfg["smoothing_vox"]))
    r.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    r.SetInitialTransform(transform, inPlace=False)
    return r


def sitk_rigid_3d(fixed, moving, config: dict | None = None, unshared: bool = False) -> MethodOutput:
    """SimpleITK rigid registration (Euler3D, geometric-centre initialisation, or with ``unshared``
    headers the image moments (``CenteredTransformInitializer`` MOMENTS: centres of mass and
    principal axes), Mattes MI, multi-resolution gradient descent with physical-shift scales),
    then linear resampling."""
    import SimpleITK as sitk

    cfg = {**SITK_3D, **(config or {})}
    f, m = bridge.volume_to_sitk(fixed), bridge.volume_to_sitk(moving)
    how = sitk.CenteredTransformInitializerFilter.MOMENTS if unshared else sitk.CenteredTransformInitializerFilter.GEOMETRY
    init = sitk.CenteredTransformInitializer(f, m, sitk.Euler3DTransform(), how)
    final = _sitk_method(sitk, init, cfg).Execute(f, m)
    registered = sitk.Resample(m, f, final, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return MethodOutput(bridge.sitk_transform_to_ras(final), bridge.sitk_to_array(registered))


def sitk_rigid_2d(fixed: np.ndarray, moving: np.ndarray, spacing_mm: float, config: dict | None = None) -> np.ndarray:
    """SimpleITK rigid registration of one network-grid slice pair; returns ``(theta_deg, tx_mm,
    ty_mm)`` in the slice-frame convention: centred mm coordinates (pixel ``[r, c]`` at
    ``x = (c - (W-1)/2) s``, ``y = (r - (H-1)/2) s``), resampling direction (fixed -> moving)."""
    import SimpleITK as sitk

    cfg = {**SITK_2D, **(config or {})}
    h, w = fixed.shape

    def image(a):
        img = sitk.GetImageFromArray(np.ascontiguousarray(a, dtype=np.float32))  # index (x=col, y=row)
        img.SetSpacing((float(spacing_mm), float(spacing_mm)))
        img.SetOrigin((-(w - 1) / 2.0 * spacing_mm, -(h - 1) / 2.0 * spacing_mm))
        return img

    f, m = image(fixed), image(moving)
    init = sitk.CenteredTransformInitializer(f, m, sitk.Euler2DTransform(),
                                             sitk.CenteredTransformInitializerFilter.GEOMETRY)
    final = _sitk_method(sitk, init, cfg).Execute(f, m)
    o = np.asarray(final.TransformPoint((0.0, 0.0)))
    ex = np.asarray(final.TransformPoint((1.0, 0.0))) - o
    ey = np.asarray(final.TransformPoint((0.0, 1.0))) - o
    mat = np.array([[ex[0], ey[0], o[0]], [ex[1], ey[1], o[1]], [0.0, 0.0, 1.0]])
    return geo.matrix_to_params_2d(mat, "rigid")


def setup_sitk(settings: Settings) -> Register:
    try:
        import SimpleITK as sitk
    except ImportError as exc:
        raise MethodUnavailable(f"SimpleITK does not import ({exc})") from None
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(settings.threads)
    return lambda fixed, moving, unshared=False: sitk_rigid_3d(fixed, moving, unshared=unshared)


# --------------------------------------------------------------------------- ANTsPy


def setup_ants(settings: Settings) -> Register:
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(settings.threads)  # read when ANTs starts
    try:
        import ants
    except ImportError as exc:
        raise MethodUnavailable(f"ANTsPy (antspyx) does not import ({exc})") from None

    def register(fixed, moving, unshared: bool = False) -> MethodOutput:
        # ANTsPy's default initial moving transform is already "[fixed,moving,1]" (centres of mass
        # aligned), ANTs' standard start for pairs without a shared frame; said here explicitly
        f, m = bridge.volume_to_ants(fixed), bridge.volume_to_ants(moving)
        result = ants.registration(f, m, type_of_transform="Rigid", **({"initial_transform": None} if unshared else {}))
        try:
            matrix = bridge.ants_transform_to_ras(ants.read_transform(result["fwdtransforms"][0]))
            registered = bridge.ants_to_array(result["warpedmovout"])
        finally:
            for path in {*result.get("fwdtransforms", []), *result.get("invtransforms", [])}:
                if isinstance(path, str) and os.path.isfile(path):
                    os.remove(path)
        return MethodOutput(matrix, registered)

    return register


# --------------------------------------------------------------------------- elastix


def setup_elastix(settings: Settings) -> Register:
    try:
        import itk

        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(settings.threads)
        params = itk.ParameterObject.New()
        params.AddParameterMap(params.GetDefaultParameterMap("rigid"))
        # headers without a shared frame: elastix's standard start, the centres of gravity aligned
        unshared_params = itk.ParameterObject.New()
        rigid = params.GetDefaultParameterMap("rigid")
        rigid["AutomaticTransformInitialization"] = ["true"]
        rigid["AutomaticTransformInitializationMethod"] = ["CenterOfGravity"]
        unshared_params.AddParameterMap(rigid)
        run = itk.elastix_registration_method
    except (ImportError, AttributeError) as exc:
        raise MethodUnavailable(f"itk-elastix does not import ({exc})") from None

    def register(fixed, moving, unshared: bool = False) -> MethodOutput:
        f, m = bridge.volume_to_itk(fixed), bridge.volume_to_itk(moving)
        result, transform = run(f, m, parameter_object=unshared_params if unshared else params, log_to_console=False, number_of_threads=settings.threads)
        return MethodOutput(bridge.elastix_result_to_ras(transform), bridge.itk_to_array(result))

    return register


SETUP: dict[str, Callable[[Settings], Register]] = {
    "ours": setup_ours, "ours-net": setup_ours_network_only, "sitk": setup_sitk, "ants": setup_ants, "elastix": setup_elastix,
}
