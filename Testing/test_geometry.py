"""Geometry conventions: RAS/LPS, directions, slice frames, 2D <-> 3D embedding."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_affine

from RigidResNetRegistrationLib import geometry as geo

RNG = np.random.default_rng(7)


def random_rigid() -> np.ndarray:
    return geo.rigid_matrix_3d(tuple(RNG.uniform(-20, 20, 3)), tuple(RNG.uniform(-10, 10, 3)), RNG.uniform(-50, 50, 3))


def test_ras_lps_round_trip_and_point_meaning():
    m = random_rigid()
    assert np.allclose(geo.lps_to_ras(geo.ras_to_lps(m)), m)
    # the LPS matrix applied to an LPS point gives the LPS image of the RAS result
    p_ras = np.array([10.0, -20.0, 30.0])
    flip = np.array([-1.0, -1.0, 1.0])
    assert np.allclose(geo.apply_to_points(geo.ras_to_lps(m), p_ras * flip), geo.apply_to_points(m, p_ras) * flip)


def test_inverse_and_composition_order():
    a, b = random_rigid(), random_rigid()
    p = RNG.uniform(-50, 50, 3)
    assert np.allclose(geo.apply_to_points(geo.compose(a, b), p), geo.apply_to_points(a, geo.apply_to_points(b, p)))
    assert np.allclose(geo.compose(a, geo.invert(a)), np.eye(4))


@pytest.mark.parametrize("kind", ["rigid", "affine"])
def test_params_matrix_round_trip_inverse_compose(kind):
    p = RNG.uniform(-5, 5, (10, geo.N_PARAMS[kind]))
    if kind == "affine":
        p[:, :4] *= 0.01
    assert np.allclose(geo.matrix_to_params_2d(geo.params_to_matrix_2d(p, kind), kind), p)
    inv = geo.invert_params_2d(p, kind)
    assert np.allclose(geo.compose_params_2d(p, inv, kind), 0.0, atol=1e-9)
    q = RNG.uniform(-5, 5, p.shape) * (0.01 if kind == "affine" else 1)
    direct = geo.params_to_matrix_2d(q, kind) @ geo.params_to_matrix_2d(p, kind)
    assert np.allclose(geo.params_to_matrix_2d(geo.compose_params_2d(p, q, kind), kind), direct)


def test_rigid_param_meaning():
    # +90 deg sends the +x axis to +y (counter-clockwise), then translates
    m = geo.params_to_matrix_2d(np.array([90.0, 1.0, 2.0]))
    assert np.allclose(m @ [1.0, 0.0, 1.0], [1.0, 3.0, 1.0])


@pytest.mark.parametrize(
    "codes,orientation,axis",
    [("RAS", "auto", 2), ("LPS", "auto", 2), ("RPS", "auto", 2), ("SRA", "auto", 0), ("ASR", "auto", 1),
     ("RAS", "sagittal", 0), ("RAS", "coronal", 1), ("LSA", "auto", 1)],
)
def test_slice_axis_follows_anatomy_not_array_order(codes, orientation, axis):
    assert geo.slice_axis(make_affine(codes=codes), orientation) == axis


def test_slice_axis_rejects_unknown_orientation():
    with pytest.raises(ValueError, match="axis must be"):
        geo.slice_axis(np.eye(4), "oblique")


@pytest.mark.parametrize("codes", ["RAS", "LPS", "LAS", "RPS", "PIR", "SLA"])
@pytest.mark.parametrize("orientation", ["auto", "coronal", "sagittal"])
def test_slice_frame_is_right_handed_and_anatomical(codes, orientation):
    aff = make_affine(codes=codes, rotation_deg=(7, -5, 12), spacing=(1.0, 1.5, 2.5))
    f = geo.slice_frame(aff, (40, 50, 30), orientation)
    e = f.basis
    assert np.allclose(e.T @ e, np.eye(3), atol=1e-12)
    assert np.isclose(np.linalg.det(e), 1.0)
    name = "axial" if orientation == "auto" else orientation
    _, x_name, y_name = geo.ORIENTATION_AXES[name]
    assert f.ex @ geo.ANATOMICAL_DIRECTIONS[x_name] > 0.7
    assert f.ey @ geo.ANATOMICAL_DIRECTIONS[y_name] > 0.7
    # slice centres are the voxel planes' centres: on the normal through the volume centre
    mid = geo.apply_to_points(aff, (np.array([40, 50, 30]) - 1) / 2.0)
    assert np.allclose(f.centre, mid)
    last = np.array([19.5, 24.5, 14.5])
    last[f.axis] = [40, 50, 30][f.axis] - 1
    assert np.allclose(f.slice_centre(-1), geo.apply_to_points(aff, last))


def test_embedding_is_the_same_3d_transform_for_every_slice():
    aff = make_affine(codes="LPS", rotation_deg=(3, 4, 5))
    f = geo.slice_frame(aff, (48, 56, 40))
    p = np.array([4.0, 3.0, -2.0])
    whole = geo.params_to_ras(p, f)
    for s in (0, 13, 39):
        assert np.allclose(geo.params_to_ras(p, f, slice_index=s), whole)
    # rotation about the slice normal through the centre: the centre moves by the in-plane translation only
    assert np.allclose(geo.apply_to_points(whole, f.centre), f.centre + 3.0 * f.ex - 2.0 * f.ey)
    assert np.allclose(whole[:3, :3] @ f.n, f.n)
    assert np.allclose(geo.ras_to_params(whole, f), p)


def test_network_grid_points_geometry():
    f = geo.slice_frame(make_affine(codes="RAS"), (48, 56, 40))
    pts = geo.network_grid_points(f, (8, 10), 2.0, np.array([0, 5]))
    assert pts.shape == (2, 8, 10, 3)
    assert np.allclose(pts[0, 0, 1] - pts[0, 0, 0], 2.0 * f.ex)  # columns along ex
    assert np.allclose(pts[0, 1, 0] - pts[0, 0, 0], 2.0 * f.ey)  # rows along ey
    assert np.allclose(pts[1].mean(axis=(0, 1)), f.slice_centre(5))
    # the affine form gives the same points
    aff = geo.network_grid_affine(f, (8, 10), 2.0, np.array([0, 5]))
    rows, cols = np.meshgrid(np.arange(8), np.arange(10), indexing="ij")
    idx = np.stack([np.zeros_like(rows), rows, cols], axis=-1).astype(float)
    assert np.allclose(np.stack([geo.apply_to_points(a, idx) for a in aff]), pts)


def test_rigid_error_measures_rotation_and_translation():
    c = np.array([1.0, 2.0, 3.0])
    a = geo.rigid_matrix_3d((0, 0, 10), (1, 0, 0), c)
    b = geo.rigid_matrix_3d((0, 0, 7), (1, 4, 0), c)
    rot, trans = geo.rigid_error(a, b, c)
    assert np.isclose(rot, 3.0) and np.isclose(trans, 4.0)
    rot2, trans2 = geo.params_error_2d(np.array([10.0, 1, 0]), np.array([7.0, 1, 4]))
    assert np.isclose(rot2, 3.0) and np.isclose(trans2, 4.0)


@pytest.mark.parametrize("kind", ["rigid", "affine"])
def test_symmetric_estimate_is_the_forward_one_when_both_orders_agree(kind):
    """A backward estimate that is exactly the inverse of the forward one changes nothing."""
    p = RNG.uniform(-5, 5, (10, geo.N_PARAMS[kind]))
    if kind == "affine":
        p[:, :4] *= 0.01
    assert np.allclose(geo.symmetric_params_2d(p, geo.invert_params_2d(p, kind), kind), p, atol=1e-12)


def test_interpolated_symmetric_estimate_removes_an_error_that_varies_slowly_along_the_stack():
    """Both orders on rows 0, 3, 6, 9 only, an order-independent error that changes linearly from
    slice to slice: the other rows lose it too (to the symmetric estimate's own second-order
    residue), rows with both orders are the plain symmetric estimate, and the error is held
    constant beyond the last row with both orders."""
    n = 11
    truth = np.column_stack([RNG.uniform(-4, 4, n), RNG.uniform(-4, 4, (n, 2))])
    bias = np.outer(np.arange(n), [0.05, 0.04, -0.03]) + [0.3, 0.2, -0.1]
    forward = truth + bias
    backward = np.full_like(forward, np.nan)
    anchors = np.array([0, 3, 6, 9])
    backward[anchors] = geo.invert_params_2d(truth[anchors]) + bias[anchors]
    out = geo.symmetric_params_2d_interpolated(forward, backward)
    assert np.allclose(out[anchors], geo.symmetric_params_2d(forward[anchors], backward[anchors]))
    rot, trans = geo.params_error_2d(out, truth)
    rot_f, trans_f = geo.params_error_2d(forward, truth)
    inside = np.arange(n) <= 9
    assert np.all(rot[inside] < 0.02 * rot_f[inside]) and np.all(trans[inside] < 0.2 * trans_f[inside])
    held = forward[10] - (forward[9] - out[9])  # beyond the last anchor: its error, not extrapolated
    assert np.allclose(out[10], held)
    with pytest.raises(ValueError, match="at least one row"):
        geo.symmetric_params_2d_interpolated(forward, np.full_like(forward, np.nan))
    # slices with a gap between them (rows at slice indices 0, 1, 2, 20, 21): interpolated by
    # position, an error linear in the slice index is still removed; by row it would not be
    positions = np.array([0, 1, 2, 20, 21])
    gap_truth = truth[:5]
    gap_bias = np.outer(positions, [0.05, 0.04, -0.03]) + [0.3, 0.2, -0.1]
    gap_forward = gap_truth + gap_bias
    gap_backward = np.full_like(gap_forward, np.nan)
    gap_backward[[0, 4]] = geo.invert_params_2d(gap_truth[[0, 4]]) + gap_bias[[0, 4]]
    by_position = geo.symmetric_params_2d_interpolated(gap_forward, gap_backward, positions=positions)
    by_row = geo.symmetric_params_2d_interpolated(gap_forward, gap_backward)
    rot_p, _ = geo.params_error_2d(by_position, gap_truth)
    rot_r, _ = geo.params_error_2d(by_row, gap_truth)
    assert np.all(rot_p < 0.02) and rot_r[1:4].max() > 0.3
    with pytest.raises(ValueError, match="increasing"):
        geo.symmetric_params_2d_interpolated(gap_forward, gap_backward, positions=positions[::-1])


def test_symmetric_estimate_cancels_an_error_made_in_both_orders():
    """An estimator off by the same bias whichever image comes first: the symmetric estimate is
    far closer to the truth than either order alone, and for identical images (the truth is the
    identity, both orders answer the bias) it has no rotation and almost no translation."""
    truth = np.column_stack([RNG.uniform(-5, 5, 50), RNG.uniform(-5, 5, (50, 2))])
    bias = np.array([0.3, 0.25, -0.2])
    forward = truth + bias
    backward = geo.invert_params_2d(truth) + bias
    rot_f, trans_f = geo.params_error_2d(forward, truth)
    rot_s, trans_s = geo.params_error_2d(geo.symmetric_params_2d(forward, backward), truth)
    assert np.all(rot_s < 0.02 * rot_f) and np.all(trans_s < 0.2 * trans_f)
    same = geo.symmetric_params_2d(bias, bias)
    assert same[0] == 0.0
    assert np.isclose(np.hypot(*same[1:]), np.hypot(*bias[1:]) * np.sin(np.deg2rad(bias[0]) / 2), rtol=1e-9)


def test_network_grid_plane_is_centred_columns_along_x_rows_along_y():
    xy = geo.network_grid_plane((2, 3), 2.0)
    assert xy.shape == (2, 3, 2)
    assert np.allclose(xy[..., 0], [[-2, 0, 2], [-2, 0, 2]]) and np.allclose(xy[..., 1], [[-1, -1, -1], [1, 1, 1]])


@pytest.mark.parametrize("kind", ["rigid", "affine"])
def test_mirror_params_is_the_transform_conjugated_by_the_column_mirror(kind):
    rng = np.random.default_rng(4)
    p = rng.normal(0, 0.1 if kind == "affine" else 3.0, (5, geo.N_PARAMS[kind]))
    flip = np.diag([-1.0, 1.0, 1.0])  # x -> -x in the centred slice frame
    expected = geo.matrix_to_params_2d(flip @ geo.params_to_matrix_2d(p, kind) @ flip, kind)
    assert np.allclose(geo.mirror_params_2d(p, kind), expected)
    assert np.allclose(geo.mirror_params_2d(geo.mirror_params_2d(p, kind), kind), p)
    with pytest.raises(ValueError, match="rigid or affine"):
        geo.mirror_params_2d(p, "similarity")


def test_mirrored_slices_are_the_mirrored_volume_through_the_mirrored_transform():
    """Independent of the network: network-grid slices sampled through in-plane transform T, their
    columns reversed, are the slices of the volume reflected across the plane through the volume's
    centre normal to ``ex`` (a new header, the same voxels), sampled through mirror_params(T)."""
    from conftest import phantom_volume

    from RigidResNetRegistrationLib.preprocess import as_float_tensor
    from RigidResNetRegistrationLib.resample import sample_slice_stack

    vol = phantom_volume(shape=(40, 48, 20), codes="LPS")
    frame = geo.slice_frame(vol.ijk_to_ras, vol.shape)
    reflect = np.eye(4)
    reflect[:3, :3] -= 2.0 * np.outer(frame.ex, frame.ex)
    reflect[:3, 3] = 2.0 * np.dot(frame.centre, frame.ex) * frame.ex
    data = as_float_tensor(vol)
    slices = np.array([5, 10, 14])
    params = np.array([7.0, 3.0, -2.0])
    through = np.stack([geo.params_to_ras(params, frame, "rigid", int(s)) for s in slices])
    mirrored = np.stack([geo.params_to_ras(geo.mirror_params_2d(params), frame, "rigid", int(s)) for s in slices])
    seen = sample_slice_stack(data, vol.ijk_to_ras, frame, (32, 32), 1.5, slices, through).flip(-1)
    reflected = sample_slice_stack(data, reflect @ vol.ijk_to_ras, frame, (32, 32), 1.5, slices, mirrored)
    unmirrored = sample_slice_stack(data, reflect @ vol.ijk_to_ras, frame, (32, 32), 1.5, slices, through)
    assert float(seen.abs().mean()) > 0.1
    assert np.allclose(seen.numpy(), reflected.numpy(), atol=1e-4)
    assert not np.allclose(seen.numpy(), unmirrored.numpy(), atol=1e-2)
