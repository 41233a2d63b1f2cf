"""Geometry: coordinate frames, 2D slice transforms and their 3D embedding.

Conventions used everywhere in this package (and named again in each function):

* **RAS**: physical points in millimetres, x to the patient's Right, y Anterior, z Superior.
  This is the frame of NIfTI affines (nibabel) and of Slicer's ``IJKToRAS`` matrices.
  All matrices are 4x4 homogeneous, ``float64``, acting on column vectors ``[x, y, z, 1]``.
* **LPS**: ITK, SimpleITK and ``.tfm`` files. ``M_lps = D @ M_ras @ D`` with
  ``D = diag(-1, -1, 1, 1)`` (the same formula converts back).
* **IJK**: continuous voxel indices in the order of the *array axes used by this package*:
  ``array[i, j, k]`` (nibabel's order). Slicer's ``arrayFromVolume`` is ``[k, j, i]``; the
  Slicer adapter transposes at the border. ``ijk_to_ras`` maps ``[i, j, k, 1]`` to RAS.
* **Direction of a transform**: a *resampling* transform maps points of the fixed image to
  points of the moving image (``registered(x) = moving(T(x))``); this is what ITK stores in
  ``.tfm`` files. The *modeling* transform is its inverse: it moves the moving image onto the
  fixed one, and is what Slicer's transform node holds "to parent" for the moving volume.
  Function and variable names say which one they hold: ``fixed_to_moving`` (resampling) or
  ``moving_to_fixed`` (modeling).
* **2D slice parameters** (the network's output) live in a *slice frame*: an orthonormal
  in-plane basis ``(ex, ey)`` of the fixed volume's slice plane, normal ``n = ex x ey`` and a
  centre ``c`` (see :func:`slice_frame`). Rigid parameters are ``(theta_deg, tx_mm, ty_mm)``:
  ``p_moving = R(theta) (p - c) + c + t`` for in-plane points ``p`` in mm, i.e. a
  *resampling* (fixed -> moving) transform, ``theta`` counter-clockwise from ``ex`` towards
  ``ey`` (right-handed about ``n``). Affine parameters are
  ``(a11-1, a12, a21, a22-1, tx_mm, ty_mm)`` with the same centre and direction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

TransformKind = Literal["rigid", "affine"]
N_PARAMS: dict[str, int] = {"rigid": 3, "affine": 6}

#: RAS <-> LPS flip, ``M_lps = LPS_FROM_RAS @ M_ras @ LPS_FROM_RAS``.
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Anatomical unit directions in RAS.
ANATOMICAL_DIRECTIONS: dict[str, np.ndarray] = {
    "R": np.array([1.0, 0.0, 0.0]),
    "A": np.array([0.0, 1.0, 0.0]),
    "S": np.array([0.0, 0.0, 1.0]),
}

#: For each slice orientation: (normal closest to, in-plane x closest to, in-plane y closest to).
ORIENTATION_AXES: dict[str, tuple[str, str, str]] = {
    "axial": ("S", "R", "A"),
    "coronal": ("A", "R", "S"),
    "sagittal": ("R", "A", "S"),
}


# --------------------------------------------------------------------------- basics


def ras_to_lps(matrix_ras: np.ndarray) -> np.ndarray:
    """Convert a 4x4 matrix acting on RAS points to the same transform acting on LPS points."""
    m = np.asarray(matrix_ras, dtype=np.float64)
    return LPS_FROM_RAS @ m @ LPS_FROM_RAS


def lps_to_ras(matrix_lps: np.ndarray) -> np.ndarray:
    """Convert a 4x4 matrix acting on LPS points to the same transform acting on RAS points."""
    return ras_to_lps(matrix_lps)  # the flip is its own inverse


def lps_grid(ijk_to_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ITK header of a voxel grid: ``(origin_lps (3,), spacing (3,), direction_lps (3, 3))``, with
    ``point_lps = origin + direction @ (spacing * index)`` (ITK's image geometry)."""
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    d3 = LPS_FROM_RAS[:3, :3]
    spacing = voxel_spacing(m)
    return d3 @ m[:3, 3], spacing, d3 @ (m[:3, :3] / spacing)


def ijk_to_ras_from_lps_grid(origin_lps, spacing, direction_lps) -> np.ndarray:
    """Inverse of :func:`lps_grid`: the 4x4 ``ijk_to_ras`` of an ITK header (3D; the direction
    as 9 numbers row by row, as SimpleITK's ``GetDirection``, or a 3x3 matrix)."""
    d3 = LPS_FROM_RAS[:3, :3]
    direction = np.asarray(direction_lps, dtype=np.float64).reshape(3, 3)
    out = np.eye(4)
    out[:3, :3] = d3 @ direction * np.asarray(spacing, dtype=np.float64)
    out[:3, 3] = d3 @ np.asarray(origin_lps, dtype=np.float64)
    return out


def invert(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a 4x4 homogeneous matrix (e.g. resampling <-> modeling direction)."""
    return np.linalg.inv(np.asarray(matrix, dtype=np.float64))


def compose(*matrices: np.ndarray) -> np.ndarray:
    """Matrix product ``m0 @ m1 @ ...``: the *last* matrix is applied to a point first."""
    out = np.eye(4)
    for m in matrices:
        out = out @ np.asarray(m, dtype=np.float64)
    return out


def apply_to_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 matrix to points of shape ``(..., 3)`` (same frame in and out)."""
    m = np.asarray(matrix, dtype=np.float64)
    p = np.asarray(points, dtype=np.float64)
    return p @ m[:3, :3].T + m[:3, 3]


def voxel_spacing(ijk_to_ras: np.ndarray) -> np.ndarray:
    """Voxel size in mm along the array axes ``i, j, k`` (column norms of the 3x3 part)."""
    return np.linalg.norm(np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3], axis=0)


def voxel_directions(ijk_to_ras: np.ndarray) -> np.ndarray:
    """Unit RAS direction of each array axis, as the columns of a 3x3 matrix."""
    m = np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3]
    return m / np.linalg.norm(m, axis=0, keepdims=True)


def volume_centre_ras(ijk_to_ras: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """RAS point of the centre of the voxel grid (mid-way between first and last voxel centres)."""
    centre_ijk = (np.asarray(shape[:3], dtype=np.float64) - 1.0) / 2.0
    return apply_to_points(ijk_to_ras, centre_ijk)


def rotation_matrix_3d(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    """3x3 right-handed rotation by ``angle_deg`` about the unit vector ``axis`` (Rodrigues)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    t = np.deg2rad(angle_deg)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def rigid_matrix_3d(
    rotation_deg_xyz: tuple[float, float, float] = (0.0, 0.0, 0.0),
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    centre: np.ndarray | None = None,
) -> np.ndarray:
    """4x4 rigid transform in one frame (RAS unless stated): rotations about x, then y, then z
    (angles in degrees, applied in that order) about ``centre``, then a translation in mm."""
    r = (
        rotation_matrix_3d(np.array([0.0, 0.0, 1.0]), rotation_deg_xyz[2])
        @ rotation_matrix_3d(np.array([0.0, 1.0, 0.0]), rotation_deg_xyz[1])
        @ rotation_matrix_3d(np.array([1.0, 0.0, 0.0]), rotation_deg_xyz[0])
    )
    c = np.zeros(3) if centre is None else np.asarray(centre, dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = c - r @ c + np.asarray(translation_mm, dtype=np.float64)
    return m


def rigid_error(
    estimated: np.ndarray, truth: np.ndarray, centre: np.ndarray
) -> tuple[float, float]:
    """Error of an estimated 4x4 transform against the true one (same frame and direction).

    Returns ``(rotation_error_deg, translation_error_mm)``: the angle of the residual rotation
    ``R_est^T R_true`` and the distance between where the two transforms send ``centre``.
    """
    est = np.asarray(estimated, dtype=np.float64)
    tru = np.asarray(truth, dtype=np.float64)
    residual = est[:3, :3].T @ tru[:3, :3]
    cos_angle = np.clip((np.trace(residual) - 1.0) / 2.0, -1.0, 1.0)
    rot = float(np.degrees(np.arccos(cos_angle)))
    c = np.asarray(centre, dtype=np.float64)
    trans = float(np.linalg.norm(apply_to_points(est, c) - apply_to_points(tru, c)))
    return rot, trans


# --------------------------------------------------------------------------- slice axis & frame

def slice_axis(ijk_to_ras: np.ndarray, orientation: str = "auto") -> int:
    """Array axis (0, 1 or 2 of ``array[i, j, k]``) along which slices are taken.

    ``orientation="auto"`` picks the axis closest to anatomical S (axial slices), whatever the
    acquisition; ``"axial" | "coronal" | "sagittal"`` pick the axis closest to S, A or R.
    """
    if orientation == "auto":
        orientation = "axial"
    if orientation not in ORIENTATION_AXES:
        raise ValueError(
            f"axis must be auto, axial, coronal or sagittal, not {orientation!r}"
        )
    normal = ANATOMICAL_DIRECTIONS[ORIENTATION_AXES[orientation][0]]
    dirs = voxel_directions(ijk_to_ras)
    return int(np.argmax(np.abs(normal @ dirs)))


def orientation_of_axis(ijk_to_ras: np.ndarray, axis: int) -> str:
    """Name of the orientation (axial/coronal/sagittal) whose normal is closest to array ``axis``."""
    d = voxel_directions(ijk_to_ras)[:, axis]
    scores = {
        name: abs(float(ANATOMICAL_DIRECTIONS[axes[0]] @ d)) for name, axes in ORIENTATION_AXES.items()
    }
    return max(scores, key=lambda k: scores[k])


@dataclass(frozen=True)
class SliceFrame:
    """Orthonormal frame of the fixed volume's slices (all vectors in RAS mm).

    ``ex``, ``ey``: in-plane unit axes (network image columns and rows), ``n = ex x ey``.
    ``centre``: RAS centre of the fixed volume; the centre of slice ``s`` is
    ``centre + offsets[s] * n``. ``axis``: the fixed array axis the slices are taken along.
    """

    axis: int
    orientation: str
    ex: np.ndarray
    ey: np.ndarray
    n: np.ndarray
    centre: np.ndarray
    offsets: np.ndarray

    @property
    def basis(self) -> np.ndarray:
        """3x3 matrix with columns ``ex, ey, n`` (slice frame -> RAS rotation)."""
        return np.stack([self.ex, self.ey, self.n], axis=1)

    def slice_centre(self, index: int) -> np.ndarray:
        """RAS centre of slice ``index`` (on the line through the volume centre along ``n``)."""
        return self.centre + self.offsets[index] * self.n


def slice_frame(
    ijk_to_ras: np.ndarray, shape: tuple[int, ...], orientation: str = "auto"
) -> SliceFrame:
    """Slice frame of a (fixed) volume: slices along :func:`slice_axis`, in-plane axes taken
    from the two other voxel axes, signed and ordered to be closest to the anatomical axes of
    the orientation (axial: ex~R, ey~A; coronal: ex~R, ey~S; sagittal: ex~A, ey~S), then
    orthonormalised (Gram-Schmidt, so oblique grids keep ``ex`` exactly on a voxel axis).
    """
    axis = slice_axis(ijk_to_ras, orientation)
    name = orientation_of_axis(ijk_to_ras, axis) if orientation == "auto" else orientation
    _, x_name, y_name = ORIENTATION_AXES[name]
    dirs = voxel_directions(ijk_to_ras)
    in_plane = [a for a in range(3) if a != axis]
    x_target, y_target = ANATOMICAL_DIRECTIONS[x_name], ANATOMICAL_DIRECTIONS[y_name]
    # pick which in-plane voxel axis is x: the assignment with the larger alignment score
    a0, a1 = in_plane
    keep = abs(x_target @ dirs[:, a0]) + abs(y_target @ dirs[:, a1])
    swap = abs(x_target @ dirs[:, a1]) + abs(y_target @ dirs[:, a0])
    ax_x, ax_y = (a0, a1) if keep >= swap else (a1, a0)
    ex = dirs[:, ax_x] * np.sign(x_target @ dirs[:, ax_x] or 1.0)
    ey = dirs[:, ax_y] * np.sign(y_target @ dirs[:, ax_y] or 1.0)
    ey = ey - (ey @ ex) * ex
    ey = ey / np.linalg.norm(ey)
    n = np.cross(ex, ey)
    centre = volume_centre_ras(ijk_to_ras, shape)
    # offsets of each voxel slice's plane from the centre, measured along n
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    size = int(shape[axis])
    step = m[:3, axis] @ n
    offsets = (np.arange(size) - (size - 1) / 2.0) * step
    return SliceFrame(axis, name, ex, ey, n, centre, offsets)


# --------------------------------------------------------------------------- 2D parameters


def params_to_matrix_2d(params: np.ndarray, kind: TransformKind = "rigid") -> np.ndarray:
    """Network parameters -> 3x3 homogeneous 2D matrices, ``(..., P) -> (..., 3, 3)``.

    Slice-frame convention (module docstring): centred in-plane mm coordinates, resampling
    direction (fixed point -> moving point). Rigid: ``(theta_deg, tx_mm, ty_mm)``; affine:
    ``(a11-1, a12, a21, a22-1, tx_mm, ty_mm)``.
    """
    p = np.asarray(params, dtype=np.float64)
    out = np.zeros(p.shape[:-1] + (3, 3))
    out[..., 2, 2] = 1.0
    if kind == "rigid":
        t = np.deg2rad(p[..., 0])
        c, s = np.cos(t), np.sin(t)
        out[..., 0, 0], out[..., 0, 1], out[..., 1, 0], out[..., 1, 1] = c, -s, s, c
        out[..., 0, 2], out[..., 1, 2] = p[..., 1], p[..., 2]
    elif kind == "affine":
        out[..., 0, 0] = 1.0 + p[..., 0]
        out[..., 0, 1] = p[..., 1]
        out[..., 1, 0] = p[..., 2]
        out[..., 1, 1] = 1.0 + p[..., 3]
        out[..., 0, 2], out[..., 1, 2] = p[..., 4], p[..., 5]
    else:
        raise ValueError(f"transform kind must be rigid or affine, not {kind!r}")
    return out


def matrix_to_params_2d(matrix: np.ndarray, kind: TransformKind = "rigid") -> np.ndarray:
    """Inverse of :func:`params_to_matrix_2d`, ``(..., 3, 3) -> (..., P)``.

    For ``rigid`` the angle is read with ``atan2`` (the matrix is assumed rigid).
    """
    m = np.asarray(matrix, dtype=np.float64)
    if kind == "rigid":
        theta = np.degrees(np.arctan2(m[..., 1, 0], m[..., 0, 0]))
        return np.stack([theta, m[..., 0, 2], m[..., 1, 2]], axis=-1)
    if kind == "affine":
        return np.stack(
            [m[..., 0, 0] - 1.0, m[..., 0, 1], m[..., 1, 0], m[..., 1, 1] - 1.0, m[..., 0, 2], m[..., 1, 2]],
            axis=-1,
        )
    raise ValueError(f"transform kind must be rigid or affine, not {kind!r}")


def invert_params_2d(params: np.ndarray, kind: TransformKind = "rigid") -> np.ndarray:
    """Parameters of the inverse 2D transform (same centre, opposite direction)."""
    return matrix_to_params_2d(np.linalg.inv(params_to_matrix_2d(params, kind)), kind)


#: Sign of each slice-frame parameter under the in-plane mirror of ``ex`` (the network image's
#: columns, ``flip(-1)`` of a ``(..., H, W)`` slice; :func:`mirror_params_2d`).
MIRROR_SIGNS: dict[str, tuple[float, ...]] = {"rigid": (-1.0, -1.0, 1.0), "affine": (1.0, -1.0, -1.0, 1.0, -1.0, 1.0)}


def mirror_params_2d(params: np.ndarray, kind: TransformKind = "rigid") -> np.ndarray:
    """Parameters ``(..., P)`` of the 2D transform seen in mirrored slices.

    Mirroring both slices of a pair along ``ex`` through the grid centre (the network image's
    columns reversed, ``x -> -x`` in the centred slice frame: ``F = diag(-1, 1)``) turns the
    resampling map ``A`` between them into ``F A F``: rigid ``(theta, tx, ty) -> (-theta, -tx, ty)``;
    affine: the off-diagonal terms and ``tx`` change sign. The map is its own inverse and exact (a
    sign per parameter, :data:`MIRROR_SIGNS`). Slice-frame parameters, resampling direction.
    """
    if kind not in MIRROR_SIGNS:
        raise ValueError(f"transform kind must be rigid or affine, not {kind!r}")
    return np.asarray(params, dtype=np.float64) * np.asarray(MIRROR_SIGNS[kind])


def symmetric_params_2d(forward: np.ndarray, backward: np.ndarray, kind: TransformKind = "rigid") -> np.ndarray:
    """Inverse-consistent estimate ``(..., P)`` from two estimates of one slice pair.

    ``forward`` registers (fixed, moving): the resampling map fixed point -> moving point;
    ``backward`` registers the swapped pair (moving, fixed), i.e. estimates the inverse map. Both
    in the slice frame (centred in-plane mm, rotation about the grid centre). Returns the mean of
    ``forward`` and the inverse of ``backward``, parameter by parameter (rigid: degrees, mm; the
    two agree to within a few degrees, where the mean of angles is the midpoint rotation).

    An error the estimator makes whatever the order of the images (a bias that depends on the
    content, not on the direction of the motion) enters the two with opposite signs and cancels
    to first order. For two identical images (``forward == backward``, a pure bias) a rigid result
    has no rotation at all and a translation of ``|t| sin(theta / 2)`` (0.0003 mm for a bias of
    0.2 deg and 0.2 mm).
    """
    return 0.5 * (np.asarray(forward, dtype=np.float64) + invert_params_2d(backward, kind))


def symmetric_params_2d_interpolated(
    forward: np.ndarray, backward: np.ndarray, kind: TransformKind = "rigid", positions: np.ndarray | None = None
) -> np.ndarray:
    """:func:`symmetric_params_2d` for a stack of slices ``(S, P)`` of which only some were
    predicted in both orders (``backward`` is NaN on the rows predicted in one order).

    Rows with both orders get the symmetric estimate. Every other row gets its ``forward``
    estimate minus the order-independent error (``forward - symmetric``) interpolated linearly
    along the stack between the two-order rows around it, and held constant beyond the first and
    last of them. ``positions`` ``(S,)``: where each row lies along the stack (its slice index;
    increasing), so that gaps between slices count; None: consecutive slices. This relies on that error varying slowly from slice to slice: it
    depends on the slices' content (on held-out scans its correlation between neighbouring
    slices is about 0.9). Slice-frame parameters (rigid: degrees, mm), resampling direction.
    """
    fwd = np.asarray(forward, dtype=np.float64)
    bwd = np.asarray(backward, dtype=np.float64)
    both = np.all(np.isfinite(bwd), axis=-1)
    if fwd.ndim != 2 or bwd.shape != fwd.shape or not both.any():
        raise ValueError("forward and backward must be (S, P) with at least one row predicted in both orders")
    out = fwd.copy()
    out[both] = symmetric_params_2d(fwd[both], bwd[both], kind)
    if not both.all():
        rows = np.arange(len(fwd), dtype=np.float64) if positions is None else np.asarray(positions, dtype=np.float64)
        if rows.shape != (len(fwd),) or np.any(np.diff(rows) <= 0):
            raise ValueError("positions must be (S,) and increasing")
        error = fwd[both] - out[both]
        one = ~both
        out[one] = fwd[one] - np.column_stack(
            [np.interp(rows[one], rows[both], error[:, p]) for p in range(fwd.shape[1])])
    return out


def compose_params_2d(first: np.ndarray, then: np.ndarray, kind: TransformKind = "rigid") -> np.ndarray:
    """Parameters of the point map ``p -> then(first(p))`` (both in the same slice frame)."""
    m = params_to_matrix_2d(then, kind) @ params_to_matrix_2d(first, kind)
    return matrix_to_params_2d(m, kind)


def embed_2d_in_3d(matrix_2d: np.ndarray, frame: SliceFrame, slice_index: int | None = None) -> np.ndarray:
    """3D RAS 4x4 transform of a 2D slice-frame transform (same direction as the 2D one).

    ``X -> c + E blockdiag(A, 1) E^T (X - c) + E [t, 0]`` with ``E = frame.basis`` and ``c`` the
    slice centre (volume centre when ``slice_index`` is None). Because slice centres lie on the
    normal through the volume centre, all slices give the same 3D transform for equal 2D ones.
    """
    m2 = np.asarray(matrix_2d, dtype=np.float64)
    e = frame.basis
    a = np.eye(3)
    a[:2, :2] = m2[:2, :2]
    t = np.array([m2[0, 2], m2[1, 2], 0.0])
    c = frame.centre if slice_index is None else frame.slice_centre(slice_index)
    lin = e @ a @ e.T
    out = np.eye(4)
    out[:3, :3] = lin
    out[:3, 3] = c - lin @ c + e @ t
    return out


def params_to_ras(
    params: np.ndarray, frame: SliceFrame, kind: TransformKind = "rigid", slice_index: int | None = None
) -> np.ndarray:
    """Network parameters -> 4x4 RAS resampling transform (fixed -> moving) of the whole volume."""
    return embed_2d_in_3d(params_to_matrix_2d(params, kind), frame, slice_index)


def ras_to_params(matrix_ras: np.ndarray, frame: SliceFrame, kind: TransformKind = "rigid") -> np.ndarray:
    """In-plane part of a 4x4 RAS transform, as slice-frame parameters about the volume centre.

    Exact for transforms that rotate about ``n`` only (through-plane components are dropped).
    """
    m = np.asarray(matrix_ras, dtype=np.float64)
    e = frame.basis
    c = frame.centre
    lin = e.T @ m[:3, :3] @ e
    t = e.T @ (m[:3, :3] @ c + m[:3, 3] - c)
    m2 = np.eye(3)
    m2[:2, :2] = lin[:2, :2]
    m2[:2, 2] = t[:2]
    return matrix_to_params_2d(m2, kind)


def network_grid_plane(size: tuple[int, int], spacing_mm: float) -> np.ndarray:
    """In-plane slice-frame coordinates ``(x, y)`` in mm of the network grid's pixels, ``(H, W, 2)``:
    pixel ``[r, c]`` is at ``((c - (W-1)/2) s, (r - (H-1)/2) s)`` from the slice centre (columns
    along ``ex``, rows along ``ey``)."""
    h, w = size
    xs = (np.arange(w) - (w - 1) / 2.0) * spacing_mm
    ys = (np.arange(h) - (h - 1) / 2.0) * spacing_mm
    return np.stack(np.meshgrid(xs, ys, indexing="xy"), axis=-1)


def network_grid_points(
    frame: SliceFrame, size: tuple[int, int], spacing_mm: float, slices: np.ndarray | None = None
) -> np.ndarray:
    """RAS points of the network input grid for the given slices, shape ``(S, H, W, 3)``.

    Pixel ``[r, c]`` of slice ``s`` is at ``centre_s + (c - (W-1)/2) s ex + (r - (H-1)/2) s ey``:
    image columns run along ``ex``, rows along ``ey`` (:func:`network_grid_plane`).
    """
    idx = np.arange(len(frame.offsets)) if slices is None else np.asarray(slices)
    xy = network_grid_plane(size, spacing_mm)
    plane = xy[..., :1] * frame.ex + xy[..., 1:] * frame.ey  # (H, W, 3)
    centres = frame.centre + frame.offsets[idx][:, None] * frame.n  # (S, 3)
    return centres[:, None, None, :] + plane[None]


def network_grid_affine(
    frame: SliceFrame, size: tuple[int, int], spacing_mm: float, slices: np.ndarray | None = None
) -> np.ndarray:
    """``(S, 4, 4)`` maps from network-grid index ``(0, row, col, 1)`` of each slice to RAS: the
    affine form of :func:`network_grid_points` (column 0 is zero: each map holds one slice)."""
    h, w = size
    idx = np.arange(len(frame.offsets)) if slices is None else np.asarray(slices)
    out = np.zeros((len(idx), 4, 4))
    out[:, :3, 1] = spacing_mm * frame.ey  # one row down
    out[:, :3, 2] = spacing_mm * frame.ex  # one column right
    first = -(w - 1) / 2.0 * spacing_mm * frame.ex - (h - 1) / 2.0 * spacing_mm * frame.ey
    out[:, :3, 3] = frame.centre + frame.offsets[idx][:, None] * frame.n + first
    out[:, 3, 3] = 1.0
    return out


def params_error_2d(estimated: np.ndarray, truth: np.ndarray, kind: TransformKind = "rigid") -> tuple[np.ndarray, np.ndarray]:
    """Errors of slice-frame parameter estimates ``(..., P)`` against the truth.

    Returns ``(rotation_error_deg, translation_error_mm)``, each ``(...)``: the angle of the
    residual 2D rotation (rigid part) and the distance between where the two transforms send the
    grid centre.
    """
    e = params_to_matrix_2d(estimated, kind)
    t = params_to_matrix_2d(truth, kind)
    ang_e = np.arctan2(e[..., 1, 0] - e[..., 0, 1], e[..., 0, 0] + e[..., 1, 1])
    ang_t = np.arctan2(t[..., 1, 0] - t[..., 0, 1], t[..., 0, 0] + t[..., 1, 1])
    rot = np.abs(np.degrees(np.angle(np.exp(1j * (ang_e - ang_t)))))
    trans = np.linalg.norm(e[..., :2, 2] - t[..., :2, 2], axis=-1)
    return rot, trans
