"""The overview picture (``overview.png``), drawn with Pillow only (no plotting library).

One row per slice (a few slices spread over the registered ones), five panels:
fixed | moving as given | registered | |difference| before | |difference| after.

* Every panel is a plane of the *fixed* voxel grid. ``registered`` and ``|difference| after`` are
  planes of the caller's ``result.registered`` and ``result.difference`` volumes (the ones the
  command line writes and the Slicer panel shows, made with the final transform), not a new
  resampling. ``moving`` is the moving volume resampled onto the fixed grid through the headers
  (or an initial transform) and ``|difference| before`` its difference with the fixed plane, on
  the scale of ``difference.nii.gz`` (:func:`engine.difference_image`).
* Panels are shown as in Slicer's slice views (radiological): axial with the patient's right on
  the left and anterior up, coronal with right on the left and superior up, sagittal with
  anterior on the left and superior up, along the fixed voxel axes closest to those directions
  (a 2D image is shown as stored). Each panel edge is labelled with the anatomical direction it
  faces, from the fixed volume's ``ijk_to_ras`` (:func:`edge_labels`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .engine import RegistrationResult, difference_image, scale_to_unit
from .geometry import voxel_directions
from .io import atomic_path
from .preprocess import Volume, as_float_tensor, intensity_range, torch_view
from .resample import resample_volume

#: RAS directions towards a panel's right edge and its top edge, as in Slicer's slice views.
SCREEN_DIRECTIONS: dict[str, tuple[np.ndarray, np.ndarray]] = {
    "axial": (np.array([-1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])),
    "coronal": (np.array([-1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0])),
    "sagittal": (np.array([0.0, -1.0, 0.0]), np.array([0.0, 0.0, 1.0])),
}
#: Letters of the positive and negative R, A and S directions.
LETTERS = (("R", "L"), ("A", "P"), ("S", "I"))
#: A direction's further letters are shown when their component exceeds sin(22.5 deg).
MINOR_LETTER = float(np.sin(np.deg2rad(22.5)))

PANELS = ("fixed", "moving", "registered", "difference before", "difference after")
TITLES = {
    "fixed": "fixed",
    "moving": "moving (before)",
    "registered": "registered (final)",
    "difference before": "|difference| before",
    "difference after": "|difference| after",
}
PANEL_PX = 200  # the longer side of a panel, in pixels
MARGIN = 16  # around each panel: the orientation letters
LEFT, TOP, HEADER, FOOTER = 70, 44, 20, 30
BACKGROUND, TEXT, LABEL = (20, 20, 20), (235, 235, 235), (255, 196, 40)
#: magma at 0, 1/8, ..., 1 (interpolated linearly between): the difference panels' colours
MAGMA = np.array([[0, 0, 4], [28, 16, 68], [79, 18, 123], [129, 37, 129], [181, 54, 122], [229, 80, 100],
                  [251, 135, 97], [254, 194, 135], [252, 253, 191]], dtype=np.float64)


# --------------------------------------------------------------------------- orientation


def direction_letters(direction: np.ndarray) -> str:
    """Anatomical letters of a RAS direction: the main one first (``[-1, 0, 0]`` -> ``"L"``), then
    those of the other components larger than :data:`MINOR_LETTER` (``[1, 1, 0]`` -> ``"RA"``)."""
    d = np.asarray(direction, dtype=np.float64)
    d = d / np.linalg.norm(d)
    order = np.argsort(-np.abs(d), kind="stable")
    return "".join(LETTERS[a][0 if d[a] > 0 else 1] for rank, a in enumerate(order)
                   if rank == 0 or abs(d[a]) > MINOR_LETTER)


@dataclass(frozen=True)
class PanelLayout:
    """How a plane of a volume array (``array.take(index, axis)``) is shown: array axis
    ``col_axis`` runs along the panel's columns (its index growing to the right when ``col_step``
    is 1, to the left when -1) and ``row_axis`` along its rows (growing downwards when
    ``row_step`` is 1, upwards when -1)."""

    axis: int
    col_axis: int
    col_step: int
    row_axis: int
    row_step: int


def panel_layout(ijk_to_ras: np.ndarray, axis: int, orientation: str) -> PanelLayout:
    """Layout of slices along array ``axis`` of a volume, shown as Slicer shows ``orientation``
    (:data:`SCREEN_DIRECTIONS`): the in-plane voxel axes closest to the screen's right and up
    directions, signed towards them."""
    right, up = SCREEN_DIRECTIONS[orientation]
    dirs = voxel_directions(ijk_to_ras)
    a0, a1 = (a for a in range(3) if a != axis)
    keep = abs(right @ dirs[:, a0]) + abs(up @ dirs[:, a1])
    swap = abs(right @ dirs[:, a1]) + abs(up @ dirs[:, a0])
    col, row = (a0, a1) if keep >= swap else (a1, a0)
    return PanelLayout(axis, col, 1 if right @ dirs[:, col] >= 0 else -1, row, 1 if up @ dirs[:, row] <= 0 else -1)


def stored_layout(axis: int) -> PanelLayout:
    """A 2D image as stored: its first in-plane array axis along the columns, left to right, the
    second along the rows, top to bottom."""
    a0, a1 = (a for a in range(3) if a != axis)
    return PanelLayout(axis, a0, 1, a1, 1)


def edge_labels(ijk_to_ras: np.ndarray, layout: PanelLayout) -> dict[str, str]:
    """The anatomical direction each edge of a panel faces (``left``, ``right``, ``top``,
    ``bottom`` -> letters, :func:`direction_letters`), for planes of a volume with ``ijk_to_ras``
    shown with ``layout``."""
    dirs = voxel_directions(ijk_to_ras)
    right = dirs[:, layout.col_axis] * layout.col_step
    down = dirs[:, layout.row_axis] * layout.row_step
    return {"left": direction_letters(-right), "right": direction_letters(right),
            "top": direction_letters(-down), "bottom": direction_letters(down)}


def panel_pixels(plane: np.ndarray, layout: PanelLayout) -> np.ndarray:
    """A plane ``array.take(index, layout.axis)`` (its axes: the two other array axes in order) as
    a panel: rows top to bottom, columns left to right."""
    in_plane = [a for a in range(3) if a != layout.axis]
    image = plane if layout.row_axis == in_plane[0] else plane.T
    return image[:: layout.row_step, :: layout.col_step]


# --------------------------------------------------------------------------- panels


def overview_slices(result: RegistrationResult, count: int = 4) -> np.ndarray:
    """Indices of ``count`` used slices spread evenly through the volume."""
    used = np.flatnonzero(result.used)
    if len(used) == 0:
        return used
    pick = np.linspace(0, len(used) - 1, min(count, len(used)) + 2)[1:-1] if len(used) > count else np.arange(len(used))
    return used[np.round(pick).astype(int)]


def _plane_grid(fixed: Volume, axis: int, index: int) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and ``ijk_to_ras`` of plane ``index`` along ``axis`` of the fixed grid (one voxel thick)."""
    shape = list(fixed.shape)
    shape[axis] = 1
    shift = np.eye(4)
    shift[axis, 3] = index
    return (shape[0], shape[1], shape[2]), fixed.ijk_to_ras @ shift


def overview_layout(fixed: Volume, result: RegistrationResult) -> PanelLayout:
    """The overview's layout: a 2D image as stored, a volume's slices as Slicer shows them."""
    axis = result.frame.axis
    if fixed.shape[axis] == 1:
        return stored_layout(axis)
    return panel_layout(fixed.ijk_to_ras, axis, result.frame.orientation)


def _voxels(volume: Volume) -> torch.Tensor:
    """The volume's voxels as a float32 tensor ``[i, j, k]``: a view when they are float32 already
    (a NIfTI volume's Fortran order as it is: the panels read a few planes of it), else a copy."""
    view = torch_view(volume.array) if np.asarray(volume.array).dtype == np.float32 else None
    return view if view is not None else as_float_tensor(volume)


def _plane(array: np.ndarray, axis: int, index: int) -> torch.Tensor:
    """Plane ``index`` along ``axis`` of a volume's voxels as a new float32 tensor (a view, then one
    plane's copy: ``np.take`` would walk the whole volume)."""
    return torch.from_numpy(np.array(np.moveaxis(np.asarray(array), axis, 0)[index], dtype=np.float32, order="C"))


def overview_panels(
    fixed: Volume,
    moving: Volume,
    result: RegistrationResult,
    count: int = 4,
    initial_fixed_to_moving_ras: np.ndarray | None = None,
) -> list[tuple[int, dict[str, np.ndarray]]]:
    """For each overview slice: ``(slice index, {panel name: image})``, every image ``(rows, cols)``
    in ``[0, 1]`` on the fixed voxel grid, laid out by :func:`overview_layout`.

    ``fixed``, ``moving``: the registration's inputs; ``result``: its result, with its
    ``registered`` volume (required) and ``difference`` volume (recomputed from ``registered`` when
    None); ``initial_fixed_to_moving_ras``: the RAS resampling transform the moving panel is shown
    with (identity, i.e. the headers alone, when None). Grey panels are scaled by their volume's
    1st/99th percentiles.
    """
    if result.registered is None:
        raise ValueError("the overview shows the registered volume: register with compute_registered=True")
    layout = overview_layout(fixed, result)
    axis = layout.axis
    m_t = _voxels(moving)
    if result.intensity_ranges is not None:  # the registration's own (no copy of the fixed volume needed)
        f_range, m_range = result.intensity_ranges
    else:
        f_range, m_range = intensity_range(as_float_tensor(fixed)), intensity_range(m_t)
    rows = []
    for s in overview_slices(result, count):
        shape, grid = _plane_grid(fixed, axis, int(s))
        f = _plane(fixed.array, axis, int(s))
        before = resample_volume(m_t, moving.ijk_to_ras, shape, grid, initial_fixed_to_moving_ras).select(axis, 0)
        registered = _plane(result.registered.array, axis, int(s))
        after = (_plane(result.difference.array, axis, int(s)) if result.difference is not None
                 else difference_image(f, registered, f_range, m_range))
        images = {
            "fixed": scale_to_unit(f, f_range),
            "moving": scale_to_unit(before, m_range),
            "registered": scale_to_unit(registered, m_range),
            "difference before": difference_image(f, before, f_range, m_range),
            "difference after": after,
        }
        rows.append((int(s), {name: panel_pixels(images[name].numpy(), layout) for name in PANELS}))
    return rows


# --------------------------------------------------------------------------- drawing


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 (FreeType): scalable
    except TypeError:
        return ImageFont.load_default()


def _to_rgb(image: np.ndarray, size: tuple[int, int], colour: bool):
    """A ``[0, 1]`` image scaled (bilinear) to ``size`` (width, height), grey or magma."""
    from PIL import Image

    scaled = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32)).resize(size, Image.BILINEAR)
    values = np.clip(np.asarray(scaled), 0.0, 1.0)
    if not colour:
        return Image.fromarray(np.round(values * 255).astype(np.uint8)).convert("RGB")
    at = np.linspace(0.0, 1.0, len(MAGMA))
    rgb = np.stack([np.interp(values, at, MAGMA[:, c]) for c in range(3)], axis=-1)
    return Image.fromarray(np.round(rgb).astype(np.uint8))


def _final_transform(result: RegistrationResult) -> str:
    if result.mode == "slices":
        return "one transform per slice" + (" (refined)" if result.refinement else "")
    if result.refinement is None:
        return "network estimate, not refined"
    if result.refinement.get("rejected"):
        return "network estimate (refinement rejected)"
    return f"network estimate refined on {str(result.refinement['metric']).upper()}"


def overview_figure(
    fixed: Volume,
    moving: Volume,
    result: RegistrationResult,
    path: str | Path,
    count: int = 4,
    initial_fixed_to_moving_ras: np.ndarray | None = None,
) -> dict[tuple[int, str], tuple[int, int, int, int]]:
    """Write the overview PNG (module docstring) to ``path``; arguments as :func:`overview_panels`.

    Returns where each panel was drawn: ``{(slice index, panel name): (left, top, right, bottom)}``
    in pixels of the PNG (right and bottom exclusive).
    """
    from PIL import Image, ImageDraw

    rows = overview_panels(fixed, moving, result, count, initial_fixed_to_moving_ras)
    layout = overview_layout(fixed, result)
    labels = edge_labels(fixed.ijk_to_ras, layout)
    n_rows, n_cols = rows[0][1]["fixed"].shape if rows else (1, 1)
    height_mm = n_rows * float(fixed.spacing[layout.row_axis])
    width_mm = n_cols * float(fixed.spacing[layout.col_axis])
    scale = PANEL_PX / max(width_mm, height_mm)
    pw, ph = max(1, round(width_mm * scale)), max(1, round(height_mm * scale))
    cw, ch = pw + 2 * MARGIN, ph + 2 * MARGIN
    width = LEFT + len(PANELS) * cw + 8
    height = TOP + HEADER + max(1, len(rows)) * ch + FOOTER
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font, small = _font(13), _font(12)

    def text(xy: tuple[float, float], s: str, fill=TEXT, f=font, anchor: str = "mm") -> None:
        """``anchor``: horizontal l/m/r, vertical a(top)/m (placed by the text's box: Pillow's own
        anchors need FreeType, which the bitmap default font of older Pillow lacks)."""
        x0, y0, x1, y1 = draw.textbbox((0, 0), s, font=f)
        x = xy[0] - x0 - {"l": 0.0, "m": (x1 - x0) / 2, "r": float(x1 - x0)}[anchor[0]]
        y = xy[1] - y0 - (0.0 if anchor[1] == "a" else (y1 - y0) / 2)
        draw.text((round(x), round(y)), s, fill=fill, font=f)

    sim = result.similarity
    what = "2D image" if fixed.shape[layout.axis] == 1 else f"{result.frame.orientation} slices of the fixed volume"
    text((8, 6), f"{what}, mode {result.mode}: NCC {sim['ncc_before']:.3f} -> "
         f"{sim['ncc_after']:.3f}, MI {sim['mi_before']:.3f} -> {sim['mi_after']:.3f}", anchor="la")
    start = "headers only (identity)" if initial_fixed_to_moving_ras is None else "initial transform"
    text((8, 24), f"moving: as given, {start}; registered: final transform ({_final_transform(result)})",
         f=small, anchor="la")
    for c, name in enumerate(PANELS):
        text((LEFT + c * cw + cw / 2, TOP + HEADER / 2), TITLES[name])
    boxes: dict[tuple[int, str], tuple[int, int, int, int]] = {}
    for r, (s, images) in enumerate(rows):
        y0 = TOP + HEADER + r * ch + MARGIN
        text((LEFT / 2, y0 + ph / 2), f"slice {s}")
        for c, name in enumerate(PANELS):
            x0 = LEFT + c * cw + MARGIN
            canvas.paste(_to_rgb(images[name], (pw, ph), name.startswith("difference")), (x0, y0))
            boxes[(s, name)] = (x0, y0, x0 + pw, y0 + ph)
            for edge, xy in (("left", (x0 - MARGIN / 2, y0 + ph / 2)), ("right", (x0 + pw + MARGIN / 2, y0 + ph / 2)),
                             ("top", (x0 + pw / 2, y0 - MARGIN / 2)), ("bottom", (x0 + pw / 2, y0 + ph + MARGIN / 2))):
                text(xy, labels[edge], fill=LABEL, f=small)
    # the difference panels' colour scale
    bar_x0, bar_y = LEFT + 3 * cw + MARGIN, height - FOOTER + 8
    bar = _to_rgb(np.linspace(0.0, 1.0, 256)[None, :], (2 * cw - 2 * MARGIN, 10), True)
    canvas.paste(bar, (bar_x0, bar_y))
    text((bar_x0 - 4, bar_y + 5), "0", f=small, anchor="rm")
    text((bar_x0 + bar.width + 4, bar_y + 5), "1", f=small, anchor="lm")
    text((LEFT, bar_y + 5), "differences: |fixed - moving|, each scaled to [0, 1] (as difference.nii.gz)", f=small, anchor="lm")
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG", compress_level=1)  # 6 (the default) takes 4x as long for a few % less
    return boxes
