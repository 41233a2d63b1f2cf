"""Files: NIfTI and 2D images in, NIfTI / ITK ``.tfm`` / CSV / JSON out (written atomically).

Volumes are read with nibabel into ``array[i, j, k]`` + ``ijk_to_ras`` (the NIfTI affine, RAS).
2D images (PNG, JPEG, single-slice NIfTI) become one-slice volumes. ``.tfm`` files hold the
*resampling* transform (fixed point -> moving point) in **LPS**, as ITK, ANTs and Slicer expect.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .geometry import lps_to_ras, ras_to_lps
from .preprocess import InputError, Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def read_volume(path: str | Path, name: str | None = None) -> Volume:
    """Read a NIfTI volume or a 2D image as a :class:`Volume` (float data, RAS affine).

    A trailing size-1 4th axis is dropped; a real 4D or vector image is an :class:`InputError`.
    2D images get 1 mm pixels, columns along +R and rows along -A (image top = anterior).
    """
    p = Path(path)
    label = name or p.name
    if not p.exists():
        raise InputError(f"{label}: file not found: {p}")
    if p.is_dir():
        raise InputError(f"{label}: is a folder, not an image file: {p}")
    if not os.access(p, os.R_OK):
        raise InputError(f"{label}: file is not readable (permission denied): {p}")
    suffix = _suffix(p)
    if suffix in NIFTI_SUFFIXES:
        return _read_nifti(p, label)
    if suffix in IMAGE_SUFFIXES:
        return _read_image_2d(p, label)
    raise InputError(f"{label}: unsupported file type {suffix or '(none)'}; use NIfTI (.nii, .nii.gz) or PNG/JPEG")


def _read_nifti(p: Path, label: str) -> Volume:
    import nibabel as nib

    try:
        img = nib.load(str(p))
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for broken files
        raise InputError(f"{label}: not a readable NIfTI image ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if data.size == 0:  # nibabel flattens a zero-length axis away: the header keeps the shape
        raise InputError(f"{label}: the volume is empty (shape {tuple(img.shape)})")
    if data.dtype.fields is not None:  # RGB / structured voxels
        raise InputError(f"{label}: vector (multi-component) voxels; a 3D scalar volume is needed")
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise InputError(
            f"{label}: a 3D scalar volume is needed, got shape {tuple(data.shape)} (4D or vector image)"
        )
    return Volume(np.asarray(data), affine, label)


def _read_image_2d(p: Path, label: str) -> Volume:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as im:
            rows = _grey_pixels(im, label)
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{label}: not a readable image ({exc.__class__.__name__})") from None
    # array[i, j, 0]: i = column (+R), j = row (downwards = -A)
    data = rows.T[:, :, None].copy()
    affine = np.diag([1.0, -1.0, 1.0, 1.0])
    affine[1, 3] = float(rows.shape[0] - 1)
    return Volume(data, affine, label)


def _grey_pixels(im: Any, label: str) -> np.ndarray:
    """A PIL image's pixels as float32 grey rows. A colour image (RGB, RGBA, palette, ...) is read
    only when it is grey saved as colour: every pixel's channels equal and fully opaque; otherwise
    it is an :class:`InputError` (a scalar image is needed, and no single grey mix is right)."""
    if len(im.getbands()) == 1 and im.mode != "P":
        return np.asarray(im if im.mode in ("I", "I;16", "F") else im.convert("F"), dtype=np.float32)
    rgba = np.asarray(im.convert("RGBA"))
    if not (rgba[..., 3] == 255).all():
        raise InputError(f"{label}: an image with transparent pixels ({im.mode}); a greyscale image is needed")
    if not ((rgba[..., 0] == rgba[..., 1]) & (rgba[..., 1] == rgba[..., 2])).all():
        raise InputError(f"{label}: a colour image ({im.mode}) whose channels differ; a greyscale image is needed")
    return rgba[..., 0].astype(np.float32)


def _new_file_mode() -> int:
    """The mode a new file gets from ``open()``: 0o666 less the process's umask (read by setting it
    and putting it back: there is no other portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds.

    The file that appears has the usual permissions of a new file (0o666 less the umask), not the
    private 0o600 of its temporary name.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part" + "".join(target.suffixes), dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _new_file_mode())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist, outermost first."""
    missing: list[Path] = []
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.insert(0, folder)
        folder = folder.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        with contextlib.suppress(OSError):  # not empty (someone else wrote there): left alone
            folder.rmdir()


@contextlib.contextmanager
def staged_outputs(outdir: str | Path) -> Iterator[Path]:
    """Yield a new private folder inside ``outdir`` to write a run's outputs into.

    ``outdir`` (and its missing parents) is created if needed. When the block succeeds, every file
    in the private folder is moved into ``outdir`` (``os.replace``: same file system, each file
    appears whole); when it fails or is interrupted (any exception, including
    ``KeyboardInterrupt``), the private folder and everything in it are removed, and so are the
    folders this call created. So ``outdir`` gets all of a run's outputs or none of them, never a
    half-written file, and a failed run leaves it as it was (absent if it was absent). A folder
    that cannot be created or written to is an :class:`InputError` raised before any work.
    """
    out = Path(outdir)
    created = _missing_folders(out)
    try:
        for folder in created:
            folder.mkdir()
    except OSError as exc:
        _remove_empty(created)
        raise InputError(f"cannot create output folder {out} ({exc.strerror or exc.__class__.__name__})") from None
    try:
        stage = Path(tempfile.mkdtemp(prefix=".rigid-resnet-", suffix=".tmp", dir=out))
    except OSError as exc:
        _remove_empty(created)
        raise InputError(f"output folder is not writable: {out} ({exc.strerror or exc.__class__.__name__})") from None
    done = False
    try:
        yield stage
        for item in sorted(stage.iterdir()):
            os.replace(item, out / item.name)
        done = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if not done:
            _remove_empty(created)


def write_volume(volume: Volume, path: str | Path, dtype: Any = np.float32) -> None:
    """Write a volume as NIfTI (affine = ``ijk_to_ras``), atomically."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(volume.array, dtype=dtype), np.asarray(volume.ijk_to_ras, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    with atomic_path(path) as tmp:  # the temporary name keeps the suffix: nibabel compresses .gz
        nib.save(img, str(tmp))


def write_image_2d(image: np.ndarray, path: str | Path) -> None:
    """Write a 2D array (rows, columns) scaled to 8-bit grey as PNG, atomically."""
    from PIL import Image

    a = np.asarray(image, dtype=np.float64)
    lo, hi = np.percentile(a, [0.5, 99.5]) if a.size else (0.0, 1.0)
    scaled = np.clip((a - lo) / (hi - lo if hi > lo else 1.0), 0, 1) * 255
    with atomic_path(path) as tmp:
        Image.fromarray(scaled.astype(np.uint8)).save(tmp, format="PNG")


def format_tfm(fixed_to_moving_ras: np.ndarray) -> str:
    """ITK text transform of a RAS *resampling* transform (fixed -> moving), converted to LPS."""
    m = ras_to_lps(fixed_to_moving_ras)
    params = [*m[:3, :3].reshape(-1), *m[:3, 3]]
    text = " ".join(repr(float(v)) for v in params)
    return (
        "#Insight Transform File V1.0\n"
        "#Transform 0\n"
        "Transform: AffineTransform_double_3_3\n"
        f"Parameters: {text}\n"
        "FixedParameters: 0 0 0\n"
    )


def write_tfm(fixed_to_moving_ras: np.ndarray, path: str | Path) -> None:
    """Write :func:`format_tfm` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(format_tfm(fixed_to_moving_ras), encoding="utf-8")


def read_tfm(path: str | Path) -> np.ndarray:
    """Read a single affine ITK text transform; return the RAS resampling matrix (fixed -> moving)."""
    params: list[float] | None = None
    fixed: list[float] = [0.0, 0.0, 0.0]
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("Parameters:"):
            params = [float(v) for v in line.split(":", 1)[1].split()]
        elif line.startswith("FixedParameters:"):
            fixed = [float(v) for v in line.split(":", 1)[1].split()]
    if params is None or len(params) != 12:
        raise InputError(f"{path}: not a 3D affine ITK transform file")
    a = np.array(params[:9]).reshape(3, 3)
    c = np.array(fixed[:3])
    m = np.eye(4)
    m[:3, :3] = a
    m[:3, 3] = np.array(params[9:]) + c - a @ c  # ITK: y = A (x - c) + t + c
    return lps_to_ras(m)


def write_json(data: dict[str, Any], path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Write a list of dicts as CSV (columns from the first row), atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            if rows:
                writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
                writer.writeheader()
                writer.writerows(rows)
