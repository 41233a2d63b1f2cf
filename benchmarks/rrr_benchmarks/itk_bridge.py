"""The one place where this project's conventions meet the ITK family (SimpleITK, ITK/elastix,
ANTsPy).

Ours: arrays ``array[i, j, k]`` with a 4x4 ``ijk_to_ras`` (RAS mm); transforms are 4x4 RAS
*resampling* matrices (fixed point -> moving point). ITK: physical points are LPS; an image has
origin, spacing and a direction matrix (LPS) and its numpy view (SimpleITK, ITK) is ``[k, j, i]``
(ANTsPy's is ``[i, j, k]``); registration results map fixed points to moving points (the same
resampling direction as ours). So ``M_ras = D M_lps D`` with ``D = diag(-1, -1, 1, 1)``,
``origin_lps = D[:3, :3] origin_ras``, ``direction_lps = D[:3, :3] (ijk_to_ras[:3, :3] / spacing)``.

Nothing here imports torch; the ITK-family packages are imported where they are needed.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from RigidResNetRegistrationLib import geometry as geo
from RigidResNetRegistrationLib.geometry import ijk_to_ras_from_lps_grid, lps_grid  # noqa: F401 (re-exported)
from RigidResNetRegistrationLib.volume import sitk_ijk_to_ras  # noqa: F401 (re-exported)
from RigidResNetRegistrationLib.volume import volume_to_sitk as _volume_to_sitk


def _array_of(volume: Any) -> np.ndarray:
    return np.asarray(volume.array, dtype=np.float32)


# --------------------------------------------------------------------------- SimpleITK


def volume_to_sitk(volume: Any):
    """A volume (``.array[i, j, k]``, ``.ijk_to_ras``) as a float32 ``SimpleITK.Image`` (LPS header)."""
    return _volume_to_sitk(volume, np.float32)


def sitk_to_array(image) -> np.ndarray:
    """A 3D ``SimpleITK.Image`` as ``array[i, j, k]`` (float32)."""
    import SimpleITK as sitk

    return np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0)).astype(np.float32, copy=False)


# --------------------------------------------------------------------------- transforms


def lps_to_ras(matrix_lps: np.ndarray) -> np.ndarray:
    """4x4 transform on LPS points -> the same transform on RAS points (``D M D``)."""
    return geo.lps_to_ras(matrix_lps)


def ras_to_lps(matrix_ras: np.ndarray) -> np.ndarray:
    """4x4 transform on RAS points -> the same transform on LPS points (``D M D``)."""
    return geo.ras_to_lps(matrix_ras)


def matrix_offset(matrix: np.ndarray, translation: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """4x4 of ITK's matrix-offset transforms: ``y = A (x - c) + t + c``."""
    a = np.asarray(matrix, dtype=np.float64).reshape(3, 3)
    c = np.asarray(centre, dtype=np.float64)
    out = np.eye(4)
    out[:3, :3] = a
    out[:3, 3] = np.asarray(translation, dtype=np.float64) + c - a @ c
    return out


def linear_from_point_map(transform_point: Callable[[tuple[float, float, float]], Any], scale: float = 100.0) -> np.ndarray:
    """4x4 matrix of an affine point map given as a function (any ITK-family ``TransformPoint``):
    read from the images of the origin and of ``scale`` along each axis (exact for affine maps)."""
    o = np.asarray(transform_point((0.0, 0.0, 0.0)), dtype=np.float64)
    out = np.eye(4)
    out[:3, 3] = o
    for axis in range(3):
        p = [0.0, 0.0, 0.0]
        p[axis] = scale
        out[:3, axis] = (np.asarray(transform_point(tuple(p)), dtype=np.float64) - o) / scale
    return out


def sitk_transform_to_ras(transform) -> np.ndarray:
    """4x4 RAS resampling matrix of a linear SimpleITK transform (any kind, composites included)."""
    return lps_to_ras(linear_from_point_map(lambda p: transform.TransformPoint(p)))


def ras_to_sitk_affine(matrix_ras: np.ndarray):
    """A RAS 4x4 resampling matrix as a ``SimpleITK.AffineTransform`` (LPS)."""
    import SimpleITK as sitk

    m = ras_to_lps(matrix_ras)
    t = sitk.AffineTransform(3)
    t.SetMatrix(tuple(float(v) for v in m[:3, :3].reshape(-1)))
    t.SetTranslation(tuple(float(v) for v in m[:3, 3]))
    return t


def euler_rotation(angles_rad: np.ndarray, compute_zyx: bool = False) -> np.ndarray:
    """3x3 rotation of ITK's ``Euler3DTransform`` (and elastix ``EulerTransform``) angles
    ``(rx, ry, rz)`` in radians: ``Rz Rx Ry`` by default, ``Rz Ry Rx`` when ``ComputeZYX``."""
    rx, ry, rz = (float(a) for a in angles_rad)
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return z @ y @ x if compute_zyx else z @ x @ y


def elastix_euler_to_ras(parameters: np.ndarray, centre_lps: np.ndarray, compute_zyx: bool = False) -> np.ndarray:
    """4x4 RAS resampling matrix of an elastix ``EulerTransform``: ``TransformParameters``
    ``(rx, ry, rz, tx, ty, tz)`` (radians, mm) about ``CenterOfRotationPoint``, all LPS, mapping
    fixed points to moving points."""
    p = np.asarray(parameters, dtype=np.float64)
    return lps_to_ras(matrix_offset(euler_rotation(p[:3], compute_zyx), p[3:6], centre_lps))


def elastix_result_to_ras(transform_parameters) -> np.ndarray:
    """RAS resampling matrix from itk-elastix's result ``ParameterObject`` (last map, Euler)."""
    n = transform_parameters.GetNumberOfParameterMaps()
    get = lambda key: transform_parameters.GetParameter(n - 1, key)  # noqa: E731
    kind = get("Transform")[0]
    if kind != "EulerTransform":
        raise ValueError(f"expected an elastix EulerTransform, got {kind}")
    params = np.array([float(v) for v in get("TransformParameters")])
    centre = np.array([float(v) for v in get("CenterOfRotationPoint")])
    zyx = transform_parameters.GetParameterMap(n - 1)
    compute_zyx = "ComputeZYX" in zyx and str(zyx["ComputeZYX"][0]).lower() == "true"
    return elastix_euler_to_ras(params, centre, compute_zyx)


# --------------------------------------------------------------------------- ITK (elastix)


def volume_to_itk(volume: Any):
    """A volume as an ``itk.Image[itk.F, 3]`` (LPS header)."""
    import itk

    img = itk.GetImageFromArray(np.ascontiguousarray(np.transpose(_array_of(volume), (2, 1, 0))))
    origin, spacing, direction = lps_grid(volume.ijk_to_ras)
    img.SetOrigin([float(v) for v in origin])
    img.SetSpacing([float(v) for v in spacing])
    img.SetDirection(itk.GetMatrixFromArray(np.ascontiguousarray(direction)))
    return img


def itk_to_array(image) -> np.ndarray:
    """A 3D ITK image as ``array[i, j, k]`` (float32)."""
    import itk

    return np.transpose(itk.GetArrayFromImage(image), (2, 1, 0)).astype(np.float32, copy=True)


# --------------------------------------------------------------------------- ANTsPy


def volume_to_ants(volume: Any):
    """A volume as an ``ANTsImage`` (float32; ANTsPy arrays are ``[i, j, k]``; LPS header)."""
    import ants

    origin, spacing, direction = lps_grid(volume.ijk_to_ras)
    return ants.from_numpy(np.ascontiguousarray(_array_of(volume)), origin=tuple(float(v) for v in origin),
                           spacing=tuple(float(v) for v in spacing), direction=np.array(direction))


def ants_to_array(image) -> np.ndarray:
    """An ``ANTsImage`` as ``array[i, j, k]`` (float32)."""
    return np.asarray(image.numpy(), dtype=np.float32)


def ants_transform_to_ras(transform) -> np.ndarray:
    """4x4 RAS resampling matrix of a linear ``ANTsTransform`` (e.g. ``ants.read_transform`` of the
    ``0GenericAffine.mat`` that ``ants.registration`` writes; it maps fixed points to moving points).

    Read from its parameters (``A`` row-major then ``t``) and fixed parameters (the centre ``c``):
    ``y = A (x - c) + t + c`` in LPS.
    """
    params = np.asarray(transform.parameters, dtype=np.float64)
    centre = np.asarray(transform.fixed_parameters, dtype=np.float64)[:3]
    if params.size != 12:
        raise ValueError(f"expected a 3D affine ANTs transform (12 parameters), got {params.size}")
    return lps_to_ras(matrix_offset(params[:9].reshape(3, 3), params[9:12], centre))
