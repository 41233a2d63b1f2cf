"""Files: volumes and 2D images in, NIfTI (or NRRD / MetaImage) / ITK ``.tfm`` / CSV / JSON out
(written atomically).

Readers (:func:`read_volume`) give ``array[i, j, k]`` + ``ijk_to_ras`` (RAS). NIfTI is recognised
by its content (magic bytes, gzip or not, whatever the file is called) and read with nibabel, as
the trainer reads it; NRRD, MetaImage, DICOM (a series folder or one file) and 2D images (PNG,
JPEG, TIFF, BMP) are read with SimpleITK's ImageIO, which gives them ITK's physical frame: a 2D
image is the plane ``k = 0`` with ITK's origin, spacing and direction (a PNG: origin 0, 1 mm
pixels, identity direction in LPS), so ``.tfm`` files written for it work on the file itself.
``.tfm`` files hold the *resampling* transform (fixed point -> moving point) in **LPS**, as ITK,
ANTs and Slicer expect; for 2D inputs it is a 2D transform (SimpleITK applies only a 2D
transform to a 2D image).
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .geometry import lps_to_ras, ras_to_lps
from .errors import InputError
from .volume import Volume, volume_from_sitk, volume_to_sitk

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: 3D formats read through SimpleITK's ImageIO (besides 2D images and DICOM series folders).
ITK_VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
#: ``--output-format`` choices -> the suffix of the written volumes (``input``: see :func:`output_suffix`).
OUTPUT_FORMATS = {"nifti": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha"}
_SUPPORTED = ("NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd), a DICOM series folder, "
              "or a 2D image (PNG, JPEG, TIFF, BMP)")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def read_volume(path: str | Path, name: str | None = None) -> Volume:
    """Read a volume or a 2D image as a :class:`Volume` (voxel type kept, RAS affine).

    NIfTI by content (gzip or not, whatever its name; nibabel), then by suffix: NRRD, MetaImage,
    DICOM files and 2D images through SimpleITK; a folder is read as one DICOM series. A trailing
    size-1 4th axis is dropped; a real 4D or vector image is an :class:`InputError`, except a
    grey 2D image stored as RGB(A) (R = G = B, as BMP and palette PNG files are read), which is
    read as grey. 2D images get the frame ITK gives them (module docstring).
    """
    p = Path(path)
    label = name or p.name
    if not p.exists():
        raise InputError(f"{label}: file not found: {p}")
    if not os.access(p, os.R_OK):
        raise InputError(f"{label}: file is not readable (permission denied): {p}")
    if p.is_dir():
        return _read_dicom_series(p, label)
    content = _nifti_content(p)
    suffix = _suffix(p)
    if content is not None or suffix in NIFTI_SUFFIXES:
        return _read_nifti(p, label, content)
    if suffix in ITK_VOLUME_SUFFIXES or suffix in IMAGE_SUFFIXES:
        return _read_itk(p, label)
    raise InputError(f"{label}: unsupported file type {suffix or '(none)'}; use {_SUPPORTED}")


def _gzip() -> Any:
    """The gzip implementation for NIfTI files: ``isal.igzip`` (Intel ISA-L, same format, about 10x
    faster at level 1: 0.03 s instead of 0.27 s for a 240 x 240 x 155 float32 volume) where it is
    installed, the standard library's ``gzip`` otherwise."""
    try:
        from isal import igzip

        return igzip
    except ImportError:
        return gzip


#: gzip level of written ``.nii.gz`` files: 1, nibabel's own default (level 6 was 1.4-2.5x slower
#: with the standard library for files 4% smaller).
NIFTI_GZIP_LEVEL = 1


def _nifti_content(p: Path) -> tuple[bool, int] | None:
    """``(gzipped, 1 or 2)`` when the file holds a single-file NIfTI-1/-2 image, else None."""
    try:
        with open(p, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        with (gzip.open(p, "rb") if gz else open(p, "rb")) as f:
            head = f.read(348)
    except (OSError, EOFError):  # unreadable, or a truncated gzip stream
        return None
    if len(head) == 348 and head[344:348] == b"n+1\x00":
        return gz, 1
    if len(head) >= 12 and head[4:12] == b"n+2\x00\r\n\x1a\n":
        return gz, 2
    return None


def _read_nifti(p: Path, label: str, content: tuple[bool, int] | None) -> Volume:
    import nibabel as nib

    try:
        if content is not None and (content[0] or p.name.lower().endswith(".gz") or _suffix(p) not in NIFTI_SUFFIXES):
            # gzipped NIfTI (decompressed here: nibabel's gzip reader is the slow standard one), or
            # NIfTI under another name (nibabel picks its reader from the name): give it the bytes
            with (_gzip().open(p, "rb") if content[0] else open(p, "rb")) as f:
                raw = f.read()
            img = (nib.Nifti2Image if content[1] == 2 else nib.Nifti1Image).from_bytes(raw)
        else:
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


def itk_dimension(path: str | Path) -> int:
    """2 or 3: the dimension ITK gives the image at ``path`` (a folder: a DICOM series, 3); 3 when
    ITK cannot tell. Transform files for two 2D images must be 2D for ITK to apply them."""
    import SimpleITK as sitk

    p = Path(path)
    if p.is_dir():
        return 3
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return 3
    return 2 if reader.GetDimension() == 2 else 3


def _sitk_message(exc: Exception) -> str:
    """The informative line of a SimpleITK exception (its text spans several lines with paths)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    line = next((line for line in reversed(lines) if "ERROR" in line or "Description" in line), lines[-1] if lines else "")
    for prefix in ("sitk::ERROR:", "Description:", "itk::ERROR:"):
        line = line.split(prefix, 1)[-1].strip()
    return line or exc.__class__.__name__


def _read_itk(p: Path, label: str) -> Volume:
    import SimpleITK as sitk

    kind = "2D image" if _suffix(p) in IMAGE_SUFFIXES else f"{_suffix(p)[1:].upper()} image"
    try:
        image = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        raise InputError(f"{label}: not a readable {kind} ({_sitk_message(exc)})") from None
    return _scalar_volume(image, label)


def _read_dicom_series(p: Path, label: str) -> Volume:
    import SimpleITK as sitk

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # "No Series were found" goes to stderr otherwise
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    if not series:
        raise InputError(f"{label}: is a folder without a DICOM series: {p} (a folder is read as one DICOM series)")
    if len(series) > 1:
        raise InputError(f"{label}: the folder holds {len(series)} DICOM series; give a folder with one series: {p}")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(p), series[0]))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{label}: not a readable DICOM series ({_sitk_message(exc)})") from None
    return _scalar_volume(image, label)


def _scalar_volume(image: Any, label: str) -> Volume:
    """A SimpleITK image as a :class:`Volume`, with the checks of :func:`read_volume`."""
    import SimpleITK as sitk

    size = tuple(image.GetSize())
    while image.GetDimension() > 3 and size[-1] == 1:  # a trailing size-1 axis: drop it
        image = sitk.Extract(image, [*size[:-1], 0], [0] * len(size))
        size = tuple(image.GetSize())
    components = image.GetNumberOfComponentsPerPixel()
    if image.GetDimension() > 3 or (components > 1 and image.GetDimension() == 3):
        what = f" x {components} components" if components > 1 else ""
        raise InputError(f"{label}: a 3D scalar volume is needed, got size {size}{what} (4D or vector image)")
    if components > 1:  # 2D colour: grey stored as RGB(A) and opaque is grey, real colour is refused
        channels = sitk.GetArrayFromImage(image)
        if components not in (3, 4):
            raise InputError(f"{label}: vector (multi-component) pixels ({components} components); a greyscale image is needed")
        if components == 4 and not (channels[..., 3] == np.iinfo(channels.dtype).max
                                    if np.issubdtype(channels.dtype, np.integer) else channels[..., 3] == 1).all():
            raise InputError(f"{label}: an image with transparent pixels (RGBA); a greyscale image is needed")
        if not (np.array_equal(channels[..., 0], channels[..., 1]) and np.array_equal(channels[..., 0], channels[..., 2])):
            raise InputError(f"{label}: a colour image (RGB) whose channels differ; a greyscale image is needed")
        image = sitk.VectorIndexSelectionCast(image, 0)
    return volume_from_sitk(image, label)


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


def fortran_order(array: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """``array`` as ``dtype`` in Fortran order (``i`` fastest), the order of the voxels in a NIfTI
    file, so that nibabel writes it without a copy of its own: no copy when it is already so;
    otherwise the reordering copy is made by torch on every CPU thread from a
    :func:`preprocess.torch_view` (numpy's copy, which nibabel would make, is single-threaded)."""
    import torch

    from .preprocess import torch_view

    a = np.asarray(array)
    source = None if a.ndim < 2 or a.flags.f_contiguous else torch_view(a)
    if source is None:
        return np.asarray(a, dtype=dtype, order="F")
    out = torch.empty(tuple(reversed(a.shape)), dtype=torch.from_numpy(np.empty(0, dtype=dtype)).dtype)
    out.copy_(source.permute(*reversed(range(a.ndim))))
    return out.numpy().T  # a Fortran-ordered view of the C-ordered reversed-axes copy


def write_volume(volume: Volume, path: str | Path, dtype: Any = np.float32) -> None:
    """Write a volume, atomically: NIfTI (``.nii``, ``.nii.gz``; affine = ``ijk_to_ras``, sform
    and qform) with nibabel, any other suffix (``.nrrd``, ``.mha``, ...) with SimpleITK (its LPS
    header from ``ijk_to_ras``)."""
    with atomic_path(path) as tmp:  # the temporary name keeps the suffix: it picks the format (.gz compresses)
        if _suffix(Path(path)) in NIFTI_SUFFIXES:
            import nibabel as nib

            img = nib.Nifti1Image(fortran_order(volume.array, dtype), np.asarray(volume.ijk_to_ras, dtype=np.float64))
            img.set_qform(img.affine, code=1)
            img.set_sform(img.affine, code=1)
            if str(tmp).lower().endswith(".gz"):  # compressed here (_gzip: the fast implementation)
                from nibabel.fileholders import FileHolder

                with _gzip().open(tmp, "wb", compresslevel=NIFTI_GZIP_LEVEL) as f:
                    # header and voxels streamed into the compressor: the bytes of img.to_bytes()
                    # without first building them in memory (30 ms less for 240 x 240 x 155 float32)
                    img.to_file_map({"image": FileHolder(fileobj=f), "header": FileHolder(fileobj=f)})
            else:
                nib.save(img, str(tmp))
        else:
            import SimpleITK as sitk

            sitk.WriteImage(volume_to_sitk(volume, dtype), str(tmp), useCompression=True)


def output_suffix(output_format: str, fixed_path: str | Path | None) -> str:
    """Suffix of the written volumes for ``--output-format``: ``nifti`` (``.nii.gz``), ``nrrd``,
    ``mha``, or ``input``: the fixed image's own format where it is a single-file volume format
    (NRRD ``.nrrd``/``.nhdr`` -> ``.nrrd``, MetaImage ``.mha``/``.mhd`` -> ``.mha``, NIfTI ->
    ``.nii.gz``); NIfTI for anything else (DICOM, 2D images, the embedded sample)."""
    if output_format != "input":
        return OUTPUT_FORMATS[output_format]
    p = Path(fixed_path) if fixed_path else None
    if p is None or not p.is_file() or _nifti_content(p) is not None:
        return OUTPUT_FORMATS["nifti"]
    return {".nrrd": ".nrrd", ".nhdr": ".nrrd", ".mha": ".mha", ".mhd": ".mha"}.get(_suffix(p), OUTPUT_FORMATS["nifti"])


def write_image_2d(image: np.ndarray, path: str | Path) -> None:
    """Write a 2D array (rows, columns) scaled to 8-bit grey as PNG, atomically."""
    from PIL import Image

    a = np.asarray(image, dtype=np.float64)
    lo, hi = np.percentile(a, [0.5, 99.5]) if a.size else (0.0, 1.0)
    scaled = np.clip((a - lo) / (hi - lo if hi > lo else 1.0), 0, 1) * 255
    with atomic_path(path) as tmp:
        Image.fromarray(scaled.astype(np.uint8)).save(tmp, format="PNG")


def format_tfm(fixed_to_moving_ras: np.ndarray, dimension: int = 3) -> str:
    """ITK text transform of a RAS *resampling* transform (fixed -> moving), converted to LPS.

    ``dimension=2``: a 2D ``AffineTransform_double_2_2`` for 2D images, which are the plane z = 0
    of their ITK frame: the map of the points (x, y, 0) to the moving image's (x', y'); z' is
    dropped, as sampling a one-slice moving image ignores it.
    """
    m = ras_to_lps(fixed_to_moving_ras)
    if dimension == 2:
        params = [*m[:2, :2].reshape(-1), *m[:2, 3]]
    elif dimension == 3:
        params = [*m[:3, :3].reshape(-1), *m[:3, 3]]
    else:
        raise ValueError(f"dimension must be 2 or 3, not {dimension}")
    text = " ".join(repr(float(v)) for v in params)
    return (
        "#Insight Transform File V1.0\n"
        "#Transform 0\n"
        f"Transform: AffineTransform_double_{dimension}_{dimension}\n"
        f"Parameters: {text}\n"
        f"FixedParameters: {' '.join(['0'] * dimension)}\n"
    )


def write_tfm(fixed_to_moving_ras: np.ndarray, path: str | Path, dimension: int = 3) -> None:
    """Write :func:`format_tfm` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(format_tfm(fixed_to_moving_ras, dimension), encoding="utf-8")


def read_tfm(path: str | Path) -> np.ndarray:
    """Read a single affine ITK text transform (3D, or 2D: embedded in the plane z = 0); return
    the RAS resampling matrix (fixed -> moving), 4x4."""
    params: list[float] | None = None
    fixed: list[float] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("Parameters:"):
            params = [float(v) for v in line.split(":", 1)[1].split()]
        elif line.startswith("FixedParameters:"):
            fixed = [float(v) for v in line.split(":", 1)[1].split()]
    n = {12: 3, 6: 2}.get(len(params or []))
    if params is None or n is None:
        raise InputError(f"{path}: not a 2D or 3D affine ITK transform file")
    a = np.eye(3)
    a[:n, :n] = np.array(params[: n * n]).reshape(n, n)
    t = np.zeros(3)
    t[:n] = params[n * n:]
    c = np.zeros(3)
    c[:n] = (fixed + [0.0] * n)[:n]
    m = np.eye(4)
    m[:3, :3] = a
    m[:3, 3] = t + c - a @ c  # ITK: y = A (x - c) + t + c
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
