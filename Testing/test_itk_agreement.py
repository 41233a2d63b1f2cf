"""Our geometry and resampling against an independent implementation: ITK through SimpleITK.

The command line's ``transform.tfm`` (LPS, fixed -> moving points), read by SimpleITK and
applied with its resampler to the moving file, must reproduce ``registered.nii.gz``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import phantom_volume

from RigidResNetRegistrationLib import geometry as geo
from RigidResNetRegistrationLib.cli import main
from RigidResNetRegistrationLib.io import format_tfm, read_tfm, write_tfm, write_volume
from RigidResNetRegistrationLib.resample import resample_volume, sample_volume_at_ras
from RigidResNetRegistrationLib.volume import Volume

sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is a test dependency: pip install SimpleITK")


def sitk_array_ijk(path) -> np.ndarray:
    """SimpleITK image as array[i, j, k] (sitk arrays are [k, j, i])."""
    return np.transpose(sitk.GetArrayFromImage(sitk.ReadImage(str(path), sitk.sitkFloat32)), (2, 1, 0))


def sitk_resample(moving_path, fixed_path, tfm_path) -> np.ndarray:
    moving = sitk.ReadImage(str(moving_path), sitk.sitkFloat32)
    fixed = sitk.ReadImage(str(fixed_path), sitk.sitkFloat32)
    tfm = sitk.ReadTransform(str(tfm_path))
    out = sitk.Resample(moving, fixed, tfm, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0))


GRIDS = {
    "RAS 2mm": dict(codes="RAS", spacing=(2.0, 2.0, 2.0)),
    "LPS anisotropic": dict(codes="LPS", spacing=(1.7, 2.1, 3.0)),
    "oblique": dict(codes="LAS", spacing=(2.2, 1.9, 2.5), rotation_deg=(8.0, -6.0, 15.0)),
    "sagittal RPS-like": dict(codes="SRA", spacing=(1.8, 2.4, 2.0), rotation_deg=(0.0, 3.0, 0.0)),
}


def test_tfm_text_round_trip_and_sitk_reading(tmp_path):
    m = geo.rigid_matrix_3d((3, -4, 5), (1.5, -2.5, 4.0), np.array([10.0, 20.0, -5.0]))
    path = tmp_path / "t.tfm"
    write_tfm(m, path)
    assert np.allclose(read_tfm(path), m)
    t = sitk.ReadTransform(str(path))
    p_ras = np.array([12.0, -7.0, 33.0])
    flip = np.array([-1.0, -1.0, 1.0])
    # SimpleITK maps the LPS point to the LPS image of our RAS mapping
    assert np.allclose(np.array(t.TransformPoint(tuple(p_ras * flip))), geo.apply_to_points(m, p_ras) * flip)
    assert "AffineTransform_double_3_3" in format_tfm(m)


@pytest.mark.parametrize("fixed_grid,moving_grid", [("RAS 2mm", "LPS anisotropic"), ("oblique", "RAS 2mm"),
                                                    ("sagittal RPS-like", "oblique"), ("LPS anisotropic", "sagittal RPS-like")])
def test_resampler_matches_sitk_with_transform(tmp_path, fixed_grid, moving_grid):
    fixed = phantom_volume(shape=(40, 44, 36), **GRIDS[fixed_grid])
    moving = phantom_volume(shape=(42, 38, 34), seed=1, **GRIDS[moving_grid])
    t = geo.rigid_matrix_3d((4.0, -3.0, 6.0), (2.5, -1.5, 3.0), geo.volume_centre_ras(fixed.ijk_to_ras, fixed.shape))
    ours = resample_volume(torch.from_numpy(moving.array), moving.ijk_to_ras, fixed.shape, fixed.ijk_to_ras, t).numpy()
    write_volume(fixed, tmp_path / "f.nii.gz")
    write_volume(moving, tmp_path / "m.nii.gz")
    write_tfm(t, tmp_path / "t.tfm")
    ref = sitk_resample(tmp_path / "m.nii.gz", tmp_path / "f.nii.gz", tmp_path / "t.tfm")
    scale = float(np.abs(moving.array).max())
    assert np.mean(np.abs(ours - ref)) < 1e-3 * scale
    assert np.percentile(np.abs(ours - ref), 99.5) < 1e-2 * scale
    assert np.count_nonzero(ours) > 0.3 * ours.size


@pytest.mark.parametrize("fixed_grid,moving_grid", [("LPS anisotropic", "RAS 2mm"), ("sagittal RPS-like", "oblique")])
def test_cli_transform_file_reproduces_registered_volume(tmp_path, card_factory, fixed_grid, moving_grid):
    """End to end through the command line with a real weights file whose network predicts a
    constant non-trivial motion: SimpleITK + transform.tfm must give registered.nii.gz."""
    card = card_factory(bias=[5.0, 4.0, -3.0])
    fixed = phantom_volume(shape=(44, 48, 36), **GRIDS[fixed_grid])
    moving = phantom_volume(shape=(40, 46, 38), seed=1, **GRIDS[moving_grid])
    write_volume(fixed, tmp_path / "fixed.nii.gz")
    write_volume(moving, tmp_path / "moving.nii.gz")
    out = tmp_path / "out"
    code = main([str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), "-o", str(out), "--weights", str(card), "--iterations", "1", "--no-refine",
                 "--quiet", "--no-overview", "--device", "cpu", "--no-symmetric"])  # constant network: one order
    assert code == 0
    registered = sitk_array_ijk(out / "registered.nii.gz")
    ref = sitk_resample(tmp_path / "moving.nii.gz", tmp_path / "fixed.nii.gz", out / "transform.tfm")
    scale = float(np.abs(moving.array).max())
    assert registered.shape == fixed.shape
    assert np.mean(np.abs(registered - ref)) < 1e-3 * scale
    # and the transform is the non-trivial one the network predicted, in the fixed slice frame
    report = json.loads((out / "report.json").read_text())
    frame = geo.slice_frame(fixed.ijk_to_ras, fixed.shape)
    expected = geo.params_to_ras(np.array([5.0, 4.0, -3.0]), frame)
    assert np.allclose(report["fixed_to_moving_RAS"]["matrix"], expected, atol=1e-3)
    assert np.allclose(report["moving_to_fixed_RAS"]["matrix"], np.linalg.inv(expected), atol=1e-3)
    assert np.allclose(geo.lps_to_ras(_sitk_matrix(out / "transform.tfm")), expected, atol=1e-3)


def _sitk_matrix(path) -> np.ndarray:
    t = sitk.AffineTransform(sitk.ReadTransform(str(path)))
    m = np.eye(4)
    a = np.array(t.GetMatrix()).reshape(3, 3)
    c = np.array(t.GetCenter())
    m[:3, :3] = a
    m[:3, 3] = np.array(t.GetTranslation()) + c - a @ c
    return m


def test_affine_header_conventions_match_sitk(tmp_path):
    """nibabel's affine (our IJK -> RAS) and ITK's origin/direction (LPS) describe the same voxels."""
    for grid in GRIDS.values():
        vol = phantom_volume(shape=(20, 22, 18), **grid)
        write_volume(vol, tmp_path / "v.nii.gz")
        img = sitk.ReadImage(str(tmp_path / "v.nii.gz"))
        idx = (3, 7, 11)
        lps = np.array(img.TransformIndexToPhysicalPoint(idx))
        assert np.allclose(lps * [-1, -1, 1], geo.apply_to_points(vol.ijk_to_ras, np.array(idx, float)), atol=1e-4)


@pytest.mark.parametrize("ref_grid,rotation,separable", [
    ("RAS 2mm", (0, 0, 7), True),  # in-plane rotation: slices along S stay apart
    ("LPS anisotropic", (0, 0, -4), True),
    ("sagittal RPS-like", (0, 0, 0), True),  # its tilt is about A: its A axis meets the moving P axis
    ("sagittal RPS-like", (4, 0, 0), False),
    ("RAS 2mm", (3, 0, 7), False),  # out-of-plane rotation: general path
])
def test_plane_by_plane_resampling_equals_the_general_path_and_itk(tmp_path, ref_grid, rotation, separable):
    """The fast path (whole planes, when the grid-to-grid map keeps slices apart) must give the
    same voxels as the general trilinear path and as SimpleITK."""
    from RigidResNetRegistrationLib.resample import separable_axes

    moving = phantom_volume(shape=(36, 40, 26), codes="LPS", spacing=(1.7, 2.1, 3.0))
    ref = phantom_volume(shape=(30, 34, 22), **GRIDS[ref_grid])
    t = geo.rigid_matrix_3d(rotation, (2.5, -1.5, 1.0), geo.volume_centre_ras(ref.ijk_to_ras, ref.shape))
    vol = torch.from_numpy(moving.array.astype(np.float32))
    fast = resample_volume(vol, moving.ijk_to_ras, ref.shape, ref.ijk_to_ras, t).numpy()
    slow = resample_volume(vol, moving.ijk_to_ras, ref.shape, ref.ijk_to_ras, t, allow_separable=False).numpy()
    index_map = geo.compose(geo.invert(moving.ijk_to_ras), t, ref.ijk_to_ras)
    assert (separable_axes(index_map) is not None) == separable
    assert np.allclose(fast, slow, atol=1e-4 * np.abs(slow).max())
    write_volume(moving, tmp_path / "m.nii.gz")
    write_volume(ref, tmp_path / "f.nii.gz")
    write_tfm(t, tmp_path / "t.tfm")
    assert np.allclose(fast, sitk_resample(tmp_path / "m.nii.gz", tmp_path / "f.nii.gz", tmp_path / "t.tfm"), atol=1e-3 * np.abs(slow).max())


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_one_plane_of_a_shifted_grid_reads_few_planes_and_equals_itk(tmp_path, axis):
    """Grids that differ by a shift keep slices apart along every axis: for one plane of the
    reference (what the overview draws) the cheapest axis is that plane's own (one or two moving
    planes read, not the whole volume), with the same voxels as the general path and ITK."""
    from RigidResNetRegistrationLib.resample import separable_axes

    moving = phantom_volume(shape=(36, 40, 26), codes="RAS", spacing=(2.0, 2.0, 2.0))
    shape = list(moving.shape)
    shape[axis] = 1
    shift = np.eye(4)
    shift[axis, 3] = 11.3  # a plane between two moving planes
    ref_ijk_to_ras = moving.ijk_to_ras @ shift
    t = geo.rigid_matrix_3d((0, 0, 0), (1.0, -2.0, 0.5) if axis != 2 else (0.0, 0.0, 0.5))
    index_map = geo.compose(geo.invert(moving.ijk_to_ras), t, ref_ijk_to_ras)
    assert separable_axes(index_map) == (0, 0)  # first found, shapes unknown
    assert separable_axes(index_map, reference_shape=tuple(shape), moving_shape=moving.shape)[0] == axis
    vol = torch.from_numpy(moving.array.astype(np.float32))
    fast = resample_volume(vol, moving.ijk_to_ras, tuple(shape), ref_ijk_to_ras, t).numpy()
    slow = resample_volume(vol, moving.ijk_to_ras, tuple(shape), ref_ijk_to_ras, t, allow_separable=False).numpy()
    assert np.allclose(fast, slow, atol=1e-4 * np.abs(slow).max()) and np.abs(fast).max() > 0
    ref = Volume(np.zeros(shape, np.float32), ref_ijk_to_ras, "plane")
    write_volume(moving, tmp_path / "m.nii.gz")
    write_volume(ref, tmp_path / "f.nii.gz")
    write_tfm(t, tmp_path / "t.tfm")
    assert np.allclose(fast, sitk_resample(tmp_path / "m.nii.gz", tmp_path / "f.nii.gz", tmp_path / "t.tfm"), atol=1e-3 * np.abs(slow).max())


@pytest.mark.parametrize("ref_grid,unrotated", [("RAS 2mm", False), ("LPS anisotropic", False), ("RAS 2mm", True)])
def test_per_slice_resampling_batched_equals_slice_by_slice(ref_grid, unrotated, monkeypatch):
    """``slices`` mode output: one in-plane transform per fixed slice. The batched plane path must
    give the voxels of the general trilinear path applied slice by slice, and be taken also when
    some slices are only shifted (their maps keep slices apart along every axis)."""
    from RigidResNetRegistrationLib import resample as resample_module
    from RigidResNetRegistrationLib.resample import resample_per_slice

    batched = []
    real = resample_module._resample_separable_per_slice
    monkeypatch.setattr(resample_module, "_resample_separable_per_slice", lambda *a: batched.append(1) or real(*a))
    moving = phantom_volume(shape=(36, 40, 26), codes="LPS", spacing=(1.7, 2.1, 3.0))
    ref = phantom_volume(shape=(30, 34, 22), **GRIDS[ref_grid])
    frame = geo.slice_frame(ref.ijk_to_ras, ref.shape)
    n = ref.shape[frame.axis]
    params = np.stack([np.linspace(-4, 5, n), np.linspace(2, -3, n), np.linspace(-1, 1.5, n)], axis=1)
    if unrotated:  # every third slice only shifted (as slices the network left unmoved)
        params[::3, 0] = 0.0
    transforms = np.stack([geo.params_to_ras(p, frame, "rigid", s) @ geo.rigid_matrix_3d(translation_mm=(0, 0, 0.4))
                           for s, p in enumerate(params)])
    vol = torch.from_numpy(moving.array.astype(np.float32))
    fast = resample_per_slice(vol, moving.ijk_to_ras, ref.shape, ref.ijk_to_ras, frame.axis, transforms).numpy()
    slow = np.zeros(ref.shape, dtype=np.float32)
    for s in range(n):
        shift = np.eye(4)
        shift[frame.axis, 3] = s
        one = list(ref.shape)
        one[frame.axis] = 1
        piece = resample_volume(vol, moving.ijk_to_ras, tuple(one), ref.ijk_to_ras @ shift, transforms[s], allow_separable=False)
        np.moveaxis(slow, frame.axis, 0)[s] = np.moveaxis(piece.numpy(), frame.axis, 0)[0]
    assert np.abs(slow).max() > 0
    assert np.allclose(fast, slow, atol=1e-4 * np.abs(slow).max())
    assert batched == [1]


@pytest.mark.parametrize("case,planes", [
    ("fixed itself", True),  # the network grid of the fixed volume's own slice frame
    ("moving, in-plane, one transform", True),
    ("moving, in-plane, one per slice", True),
    ("moving, out-of-plane", False),
])
def test_slice_stack_plane_path_equals_the_3d_path(case, planes):
    """Network-grid slice stacks: the plane path (two planes per slice, bilinear, blended) must
    give the values of the general trilinear path, through the same transforms."""
    from RigidResNetRegistrationLib.resample import _plane_axis, sample_slice_stack, slice_stack_index_maps

    fixed = phantom_volume(shape=(30, 34, 22), **GRIDS["LPS anisotropic"])
    moving = phantom_volume(shape=(36, 40, 26), codes="LPS", spacing=(1.7, 2.1, 3.0))
    frame = geo.slice_frame(fixed.ijk_to_ras, fixed.shape)
    size, spacing = (16, 20), 2.0  # grid of at least a quarter of a volume plane: the plane path is allowed
    slices = np.arange(2, fixed.shape[frame.axis] - 2)
    volume, t = moving, None
    if case == "fixed itself":
        volume = fixed
    elif case == "moving, in-plane, one transform":
        t = geo.params_to_ras(np.array([6.0, 2.5, -1.5]), frame) @ geo.rigid_matrix_3d(translation_mm=(0, 0, 0.7))
    elif case == "moving, in-plane, one per slice":
        t = np.stack([geo.params_to_ras(np.array([-3.0 + 0.5 * s, 1.0, 0.2 * s]), frame, "rigid", int(s)) for s in slices])
    else:
        t = geo.rigid_matrix_3d((4, 0, 3), (1.0, -2.0, 0.5), geo.volume_centre_ras(fixed.ijk_to_ras, fixed.shape))
    vol = torch.from_numpy(volume.array.astype(np.float32))
    maps = slice_stack_index_maps(volume.ijk_to_ras, frame, size, spacing, slices, t)
    assert (_plane_axis(maps) is not None) == planes
    fast = sample_slice_stack(vol, volume.ijk_to_ras, frame, size, spacing, slices, t)
    slow = sample_slice_stack(vol, volume.ijk_to_ras, frame, size, spacing, slices, t, allow_planes=False)
    assert float(slow.abs().max()) > 0
    assert torch.allclose(fast, slow, atol=1e-4 * float(slow.abs().max()))
    # and the general path is the plain trilinear sampling at the grid's RAS points
    pts = geo.network_grid_points(frame, size, spacing, slices)
    if t is not None:
        pts = np.stack([geo.apply_to_points(t if t.ndim == 2 else t[i], pts[i]) for i in range(len(slices))])
    direct = sample_volume_at_ras(vol, volume.ijk_to_ras, pts)
    assert torch.allclose(slow, direct, atol=1e-5 * float(slow.abs().max()))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_points_split_over_threads_sample_and_differentiate_as_one_batch(threads):
    """``grid_sample_points`` splits one image's points into a batch item per CPU thread: the
    values and the gradient with respect to the points are those of one plain grid_sample call."""
    import torch.nn.functional as F

    from RigidResNetRegistrationLib.resample import grid_sample_points

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        image = torch.rand(1, 2, 9, 11, 7, generator=gen)
        for p in (10_001, 4096 * threads + 5):  # a count that does not divide evenly
            grid = (torch.rand(1, p, 3, generator=gen) * 2.2 - 1.1).requires_grad_(True)
            ours = grid_sample_points(image, grid, min_points_per_thread=1000)
            (ours * torch.arange(1.0, 3.0)[None, :, None]).sum().backward()
            g_ours = grid.grad.clone()
            grid.grad = None
            ref = F.grid_sample(image, grid[:, None, None], mode="bilinear", padding_mode="border",
                                align_corners=True).reshape(1, 2, p)
            (ref * torch.arange(1.0, 3.0)[None, :, None]).sum().backward()
            assert ours.shape == (1, 2, p)
            assert torch.allclose(ours, ref, atol=1e-6)
            assert torch.allclose(g_ours, grid.grad, atol=1e-5)
    finally:
        torch.set_num_threads(before)


def test_inside_runs_match_the_per_point_itk_bounds():
    """The general resampler finds the inside points of each reference row as one run of ``k``;
    that must be exactly the points whose continuous index lies within half a voxel of the
    moving grid, point by point (float64)."""
    from RigidResNetRegistrationLib.resample import _inside_runs

    rng = np.random.default_rng(1)
    ni, nj, nk = 7, 9, 23
    sizes = np.array([12, 10, 15])
    partial = 0
    for trial in range(20):
        index_map = np.eye(4)
        index_map[:3, :3] = geo.rigid_matrix_3d(tuple(rng.uniform(-40, 40, 3)), (0, 0, 0), np.zeros(3))[:3, :3]
        if trial % 4 == 0:
            index_map[:3, :3] = np.eye(3)[rng.permutation(3)]  # rows constant along k on two axes
        index_map[:3, 3] = rng.uniform(-6, 12, 3)
        # the same normalised map as _resample_general: grid (x, y, z) = (k, j, i) of the moving volume
        scale = 2.0 / (sizes - 1)
        norm = np.diag(np.r_[scale, 1.0]) @ index_map
        norm[:3, 3] -= 1.0
        rows = norm[[2, 1, 0]]
        bound = 1.0 + 0.5 * scale[[2, 1, 0]]
        first, last = _inside_runs(rows, -bound, bound, ni, nj, nk)
        ijk = np.stack(np.meshgrid(np.arange(ni), np.arange(nj), np.arange(nk), indexing="ij"), -1).astype(np.float64)
        idx = ijk @ index_map[:3, :3].T + index_map[:3, 3]
        inside = np.all((idx >= -0.5) & (idx <= sizes - 0.5), axis=-1)
        runs = (np.arange(nk) >= first[..., None]) & (np.arange(nk) <= last[..., None])
        assert np.array_equal(runs, inside), trial
        partial += bool(0 < inside.sum() < inside.size)
    assert partial >= 10  # most trials cut rows at the volume's edges


def test_index_to_grid_samples_and_bounds_as_sample_at_indices():
    """The refinement composes ``index_to_grid`` with its index map once and samples the
    normalised points directly: the values and the inside rule must be those of
    ``sample_at_indices`` (which converts every point) at the same continuous indices."""
    from RigidResNetRegistrationLib.resample import grid_sample_points, index_to_grid, sample_at_indices

    gen = torch.Generator().manual_seed(2)
    image = torch.rand(1, 1, 12, 10, 15, generator=gen)
    idx = torch.rand(5000, 3, generator=gen, dtype=torch.float64) * torch.tensor([14.0, 12.0, 17.0], dtype=torch.float64) - 1.0
    to_grid, bound = index_to_grid((12, 10, 15))
    grid = idx @ torch.as_tensor(to_grid[:3, :3]).T + torch.as_tensor(to_grid[:3, 3])
    inside = (grid.abs() <= torch.as_tensor(bound)).all(dim=1)
    ref = sample_at_indices(image, idx[None].float())[0, 0]
    ours = grid_sample_points(image, grid[None].float())[0, 0] * inside
    itk_inside = ((idx >= -0.5) & (idx <= torch.tensor([11.5, 9.5, 14.5], dtype=torch.float64))).all(dim=1)
    assert torch.equal(inside, itk_inside) and 0.2 < float(inside.float().mean()) < 0.95
    assert torch.allclose(ours, ref, atol=1e-5)
    with pytest.raises(ValueError, match="3D shape"):
        index_to_grid((4, 5))


def test_nonzero_box_is_the_box_of_the_nonzero_voxels():
    from RigidResNetRegistrationLib.resample import nonzero_box

    rng = np.random.default_rng(3)
    for trial in range(12):
        vol = np.zeros((9, 11, 7), dtype=np.float32)
        lo = rng.integers(0, [9, 11, 7])
        hi = np.minimum(lo + rng.integers(0, 5, 3), [8, 10, 6])
        vol[tuple(lo)] = -2.0  # a negative value at one corner of the box
        vol[tuple(hi)] = 3.0
        if trial % 3 == 1:  # a lone NaN counts as signal
            vol[tuple(rng.integers(0, [9, 11, 7]))] = np.nan
        if trial % 3 == 2:  # scattered voxels of both signs, some columns only negative
            vol[rng.random(vol.shape) < 0.01] = -1.0
        where = np.argwhere(vol != 0)  # NaN != 0
        for layout in (torch.from_numpy(vol), torch.from_numpy(np.asfortranarray(vol))):
            first, last = nonzero_box(layout)
            assert np.array_equal(first, where.min(axis=0)) and np.array_equal(last, where.max(axis=0)), trial
    assert nonzero_box(torch.zeros(4, 5, 6)) is None
    full = torch.rand(4, 5, 6) + 0.1  # nonzero on every face: the whole volume, from the faces
    first, last = nonzero_box(full)
    assert first.tolist() == [0, 0, 0] and last.tolist() == [3, 4, 5]


@pytest.mark.parametrize("touching", [False, True])
def test_general_resampler_samples_only_near_the_signal_and_equals_every_point_sampled(touching):
    """The general resampler samples only the points that can interpolate a nonzero value (near the
    nonzero box of a skull-stripped volume, within ITK's bounds) and leaves the others 0: it must
    equal ITK-bounded linear interpolation of every point (``sample_at_indices``), to float
    rounding, for rotated and shifted maps that cut the box at its edges."""
    from RigidResNetRegistrationLib.resample import sample_at_indices

    rng = np.random.default_rng(4)
    moving = np.zeros((30, 26, 22), dtype=np.float32)
    box = (slice(0, 14), slice(5, 20), slice(3, 22)) if touching else (slice(8, 21), slice(6, 19), slice(5, 16))
    moving[box] = rng.uniform(-1.0, 2.0, moving[box].shape)  # negative values too
    vol = torch.from_numpy(moving)
    ref_shape = (28, 24, 25)
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in ref_shape), indexing="ij"), -1).reshape(-1, 3).astype(np.float64)
    near = 0
    for trial in range(6):
        index_map = geo.rigid_matrix_3d(tuple(rng.uniform(-25, 25, 3)), tuple(rng.uniform(-6, 6, 3)), np.array([14.0, 12.0, 12.0]))
        ours = resample_volume(vol, np.eye(4), ref_shape, index_map, None, allow_separable=False)
        idx = ijk @ index_map[:3, :3].T + index_map[:3, 3]
        every = sample_at_indices(vol[None, None], torch.as_tensor(idx[None], dtype=torch.float32))[0, 0].reshape(ref_shape)
        assert torch.allclose(ours, every, atol=1e-5), trial
        near += int((every != 0).sum())
    assert near > 1000  # the maps keep much of the signal in the reference grid
    assert torch.equal(resample_volume(torch.zeros(5, 6, 7), np.eye(4), (4, 4, 4), np.eye(4), allow_separable=False),
                       torch.zeros(4, 4, 4))


@pytest.mark.parametrize("touching", [False, True])
def test_per_slice_resampler_samples_only_near_the_signal_and_equals_every_point_sampled(touching):
    """``slices`` mode output: the batched plane path samples only the slices and the in-plane
    rectangle that can interpolate a nonzero value of a volume with zero margins
    (``_signal_region_per_slice``); it must equal ITK-bounded linear interpolation of every point
    (``sample_at_indices``), to float rounding, with slices reaching the box's edges and beyond."""
    from RigidResNetRegistrationLib.resample import _signal_region_per_slice, nonzero_box, resample_per_slice, sample_at_indices

    rng = np.random.default_rng(5)
    moving = np.zeros((30, 26, 22), dtype=np.float32)
    box = (slice(0, 14), slice(5, 26), slice(3, 19)) if touching else (slice(8, 21), slice(6, 19), slice(5, 16))
    moving[box] = rng.uniform(-1.0, 2.0, moving[box].shape)
    vol = torch.from_numpy(moving)
    ref_shape = (28, 24, 25)
    axis = 2  # one transform per reference slice along k; in-plane rotations keep the slices apart
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in ref_shape), indexing="ij"), -1).astype(np.float64)
    transforms = []
    for s in range(ref_shape[axis]):
        t = geo.rigid_matrix_3d((0.0, 0.0, float(rng.uniform(-20, 20))), (*rng.uniform(-4, 4, 2), 0.0), np.array([14.0, 12.0, 12.0]))
        t[2, 3] += 0.3 - 2.0  # slices between and beyond the moving planes
        transforms.append(t)
    transforms = np.stack(transforms)
    ours = resample_per_slice(vol, np.eye(4), ref_shape, np.eye(4), axis, transforms)
    idx = np.einsum("kab,ijkb->ijka", transforms[:, :3, :3], ijk) + transforms[:, :3, 3]
    every = sample_at_indices(vol[None, None], torch.as_tensor(idx.reshape(1, -1, 3), dtype=torch.float32))[0, 0].reshape(ref_shape)
    assert int((every != 0).sum()) > 1000
    assert torch.allclose(ours, every, atol=1e-5)
    region = _signal_region_per_slice(transforms, nonzero_box(vol), vol.shape, ref_shape, axis, axis)
    assert region is not None and (region[0].stop - region[0].start) < ref_shape[axis]  # some slices skipped


@pytest.mark.parametrize("rotation", [(0, 0, 7), (3, -2, 7)])  # in-plane: plane path; out-of-plane: general path
def test_fortran_ordered_volumes_resample_as_c_ordered_ones_and_itk_and_keep_their_layout(tmp_path, rotation):
    """A Fortran-ordered moving volume (a NIfTI file's order, kept by ``as_float_tensor``) is
    resampled through its reversed-axes view: the voxels must be those of its C-ordered copy and of
    ITK, through the plane and the general path and one transform per slice, laid out as the
    input (Fortran-ordered) so that the NIfTI writer needs no copy."""
    from RigidResNetRegistrationLib.resample import is_fortran_ordered, resample_per_slice

    moving = phantom_volume(shape=(36, 40, 26), codes="LPS", spacing=(1.7, 2.1, 3.0))
    ref = phantom_volume(shape=(30, 34, 22), **GRIDS["RAS 2mm"])
    t = geo.rigid_matrix_3d(rotation, (2.5, -1.5, 1.0), geo.volume_centre_ras(ref.ijk_to_ras, ref.shape))
    c_vol = torch.from_numpy(np.ascontiguousarray(moving.array, dtype=np.float32))
    f_vol = torch.from_numpy(np.ascontiguousarray(moving.array.T, dtype=np.float32)).permute(2, 1, 0)
    assert is_fortran_ordered(f_vol) and not is_fortran_ordered(c_vol) and torch.equal(f_vol, c_vol)
    scale = float(np.abs(moving.array).max())
    write_volume(moving, tmp_path / "m.nii.gz")
    write_volume(ref, tmp_path / "f.nii.gz")
    write_tfm(t, tmp_path / "t.tfm")
    itk = sitk_resample(tmp_path / "m.nii.gz", tmp_path / "f.nii.gz", tmp_path / "t.tfm")
    for allow_separable in (True, False):
        c = resample_volume(c_vol, moving.ijk_to_ras, ref.shape, ref.ijk_to_ras, t, allow_separable=allow_separable)
        f = resample_volume(f_vol, moving.ijk_to_ras, ref.shape, ref.ijk_to_ras, t, allow_separable=allow_separable)
        assert is_fortran_ordered(f) and tuple(f.shape) == ref.shape  # axial planes: the plane path's order too
        assert np.allclose(f.numpy(), c.numpy(), atol=1e-5 * scale)
        assert np.allclose(f.numpy(), itk, atol=1e-3 * scale) and np.abs(itk).max() > 0
    frame = geo.slice_frame(ref.ijk_to_ras, ref.shape)
    n = ref.shape[frame.axis]
    transforms = np.stack([geo.params_to_ras((s - n / 2, 0.3 * s, -1.0), frame, "rigid", s) for s in range(n)])
    c = resample_per_slice(c_vol, moving.ijk_to_ras, ref.shape, ref.ijk_to_ras, frame.axis, transforms)
    f = resample_per_slice(f_vol, moving.ijk_to_ras, ref.shape, ref.ijk_to_ras, frame.axis, transforms)
    assert is_fortran_ordered(f) and float(c.abs().max()) > 0
    assert np.allclose(f.numpy(), c.numpy(), atol=1e-5 * scale)
