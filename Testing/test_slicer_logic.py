"""The Slicer module's Logic and its MRML adapter against REAL MRML (the ``slicer-core`` wheel).

No Qt and no Slicer application: ``slicer-core`` provides MRML (scenes, volume, transform, table
and storage nodes, the transform logic) and ``slicer.util``. The module file is imported with
tiny stand-ins for the parts that need the application (``qt``, ``slicer.ScriptedLoadableModule``,
``slicer.parameterNodeWrapper``, ``slicer.i18n``), so ``RigidResNetRegistrationLogic.register``
runs exactly as in Slicer; the widget is not exercised here (see test_module_static.py).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from conftest import ROOT, ConstantPredictor, moved_copy, phantom_volume, write_card

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML for Python) is not installed: pip install slicer-core")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the importable 'slicer' package is not slicer-core (no vtkMRMLScene)", allow_module_level=True)
import slicer.util  # noqa: E402
import vtk  # noqa: E402

from RigidResNetRegistrationLib import geometry as geo  # noqa: E402
from RigidResNetRegistrationLib import slicer_nodes  # noqa: E402
from RigidResNetRegistrationLib.engine import RegistrationCancelled, RegistrationOptions, difference_image  # noqa: E402
from RigidResNetRegistrationLib.io import format_tfm, read_tfm, write_volume  # noqa: E402
from RigidResNetRegistrationLib.model import ModelCard  # noqa: E402
from RigidResNetRegistrationLib.preprocess import intensity_range  # noqa: E402
from RigidResNetRegistrationLib.resample import resample_volume  # noqa: E402

MODULE_FILE = ROOT / "RigidResNetRegistration" / "RigidResNetRegistration.py"
SHAPE = (44, 50, 30)
MOTION = np.array([4.0, 3.0, -2.0])  # theta_deg, tx_mm, ty_mm in the fixed slice frame
ORACLE = ModelCard.from_dict({"name": "oracle", "transform": "rigid", "input": {"size": [48, 48], "spacing_mm": 2.0}})

GRIDS = {
    "RAS": dict(codes="RAS", spacing=(2.0, 2.0, 2.0)),
    "LPS anisotropic": dict(codes="LPS", spacing=(1.8, 2.2, 3.0)),
    "oblique": dict(codes="LAS", spacing=(2.2, 1.9, 2.5), rotation_deg=(8.0, -6.0, 15.0)),
    "sagittal": dict(codes="SRA", spacing=(1.8, 2.4, 2.0), rotation_deg=(0.0, 3.0, 0.0)),
}


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def module():
    """The module file, imported with stand-ins for the application-only imports."""
    stubs = {}

    qt = types.ModuleType("qt")
    stubs["qt"] = qt

    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    stubs["slicer.i18n"] = i18n

    pnw = types.ModuleType("slicer.parameterNodeWrapper")

    class _Annotation:
        def __init__(self, *args):
            self.args = args

    pnw.parameterNodeWrapper = lambda cls: cls
    pnw.Choice = type("Choice", (_Annotation,), {})
    pnw.WithinRange = type("WithinRange", (_Annotation,), {})
    stubs["slicer.parameterNodeWrapper"] = pnw

    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = type(self).__name__[: -len("Logic")]

    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleTest"):
        setattr(slm, name, type(name, (), {}))
    slm.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    stubs["slicer.ScriptedLoadableModule"] = slm

    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location("RigidResNetRegistration_under_test", MODULE_FILE)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
        for attr in ("i18n", "parameterNodeWrapper", "ScriptedLoadableModule"):
            if getattr(slicer, attr, None) is stubs.get(f"slicer.{attr}"):
                delattr(slicer, attr)
    return mod


@pytest.fixture(scope="module")
def constant_card(tmp_path_factory):
    """A real model card + weights whose network outputs MOTION for any input."""
    return write_card(tmp_path_factory.mktemp("card"), bias=MOTION.tolist())


def add_volume(scene, volume, name):
    return slicer_nodes.add_volume_node(scene, volume.array, volume.ijk_to_ras, name)


def case(scene, fixed_grid="LPS anisotropic", moving_grid=None, moving_shape=(40, 46, 32)):
    """Fixed and moving phantom nodes; the moving one shows the head moved by the known MOTION.
    Returns (fixed node, moving node, true RAS resampling transform fixed -> moving)."""
    fixed = phantom_volume(shape=SHAPE, **GRIDS[fixed_grid])
    frame = geo.slice_frame(fixed.ijk_to_ras, fixed.shape)
    truth = geo.params_to_ras(MOTION, frame)
    if moving_grid is None:
        moving = moved_copy(fixed, truth)
    else:
        moving = moved_copy(fixed, truth, shape=moving_shape, **GRIDS[moving_grid])
    return add_volume(scene, fixed, "fixed"), add_volume(scene, moving, "moving"), truth


def state(node):
    """Everything about a volume node the registration must not change."""
    return (slicer.util.arrayFromVolume(node).copy(), slicer_nodes.ijk_to_ras_of(node), node.GetTransformNodeID(),
            node.GetName())


def assert_same_state(a, b):
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2:] == b[2:]


def array_ijk(node):
    return np.transpose(slicer.util.arrayFromVolume(node), (2, 1, 0))


def linear_transform(scene, matrix, name="T"):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(np.asarray(matrix, dtype=float)))
    return node


def compare_images(a, b, scale):
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    assert np.mean(d) < 1e-4 * scale, np.mean(d)
    # a voxel right on the +-0.5 voxel border may fall inside or outside by rounding
    assert np.count_nonzero(d > 1e-2 * scale) <= 0.002 * d.size


# --------------------------------------------------------------------------- adapter


@pytest.mark.parametrize("grid", list(GRIDS))
def test_volume_node_round_trip_keeps_voxels_and_ijk_to_ras(grid):
    scene = slicer.vtkMRMLScene()
    vol = phantom_volume(shape=(12, 9, 7), **GRIDS[grid])
    node = add_volume(scene, vol, "v")
    kji = slicer.util.arrayFromVolume(node)
    assert kji.shape == (7, 9, 12)  # MRML arrays are [k, j, i]
    assert kji[3, 5, 10] == vol.array[10, 5, 3]
    # MRML's own IJKToRAS maps voxel (i, j, k) where the Lib matrix does
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    assert np.allclose(m.MultiplyPoint((10, 5, 3, 1)), vol.ijk_to_ras @ [10, 5, 3, 1])
    back = slicer_nodes.volume_from_node(node, "fixed volume")
    assert np.array_equal(back.array, vol.array) and np.allclose(back.ijk_to_ras, vol.ijk_to_ras)
    back.array[:] = 0  # a copy: the node is untouched
    assert np.array_equal(array_ijk(node), vol.array)
    assert "fixed volume 'v'" == back.name


def test_volume_from_node_composes_linear_parent_transforms():
    scene = slicer.vtkMRMLScene()
    vol = phantom_volume(shape=(12, 9, 7), **GRIDS["oblique"])
    node = add_volume(scene, vol, "v")
    outer = linear_transform(scene, geo.rigid_matrix_3d((0, 0, 20), (5, 0, 0), np.zeros(3)), "outer")
    inner = linear_transform(scene, geo.rigid_matrix_3d((10, 0, 0), (0, -3, 2), np.zeros(3)), "inner")
    inner.SetAndObserveTransformNodeID(outer.GetID())
    node.SetAndObserveTransformNodeID(inner.GetID())
    world = slicer_nodes.parent_to_world(node, "v")
    assert np.allclose(world, slicer.util.arrayFromTransformMatrix(outer) @ slicer.util.arrayFromTransformMatrix(inner))
    assert np.allclose(slicer_nodes.volume_from_node(node, "v", world).ijk_to_ras, world @ vol.ijk_to_ras)


def test_table_from_rows_has_typed_columns():
    scene = slicer.vtkMRMLScene()
    table = scene.AddNewNodeByClass("vtkMRMLTableNode")
    slicer_nodes.set_table(table, [{"slice": 0, "used": True, "x": 1.5, "y": None}, {"slice": 1, "used": False, "x": 2, "y": 3.0}])
    assert table.GetNumberOfRows() == 2 and table.GetNumberOfColumns() == 4
    assert table.GetTable().GetColumnByName("used").GetValue(0) == 1
    assert np.isnan(table.GetTable().GetColumnByName("y").GetValue(0))
    assert table.GetTable().GetColumnByName("x").GetValue(1) == 2.0


def test_adapter_imports_no_torch_and_describes_devices():
    code = (
        "import sys; from RigidResNetRegistrationLib import slicer_nodes as s; "
        "print(s.describe_devices()); print([c.label for c in s.list_model_cards()]); "
        "assert 'torch' not in sys.modules, 'slicer_nodes imported torch'"
    )
    env_path = str(ROOT / "RigidResNetRegistration")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": env_path})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "CPU" in run.stdout and "rigid_resnet34" in run.stdout


def test_torch_status_reads_the_build_without_importing():
    status = slicer_nodes.torch_status()
    assert status["installed"] and status["version"]
    text = slicer_nodes.describe_devices({"installed": True, "imported": False, "version": "2.0", "cuda_build": None,
                                          "cuda_available": None, "gpu": None})
    assert "CPU only" in text
    assert "not installed" in slicer_nodes.describe_devices({"installed": False})


def test_model_cards_are_listed_and_resolved():
    keys = [c.key for c in slicer_nodes.list_model_cards()]
    assert "rigid_resnet34" in keys
    assert slicer_nodes.model_card_path(None).name == "rigid_resnet34.json"
    with pytest.raises(ValueError, match="unknown model"):
        slicer_nodes.model_card_path("no_such_model")


# --------------------------------------------------------------------------- the Logic


def test_logic_register_with_a_real_model_card(module, constant_card):
    """Through the module's Logic with a model card + weights (network outputs the known MOTION):
    transform node, references, outputs on the fixed grid, table, inputs unchanged."""
    scene = slicer.vtkMRMLScene()
    fixed_node, moving_node, truth = case(scene, "LPS anisotropic", "oblique")
    before = state(fixed_node), state(moving_node)
    out = module.RigidResNetRegistrationLogic().register(fixed_node, moving_node, iterations=1, refine=False, device="cpu", model=str(constant_card),
                                                         symmetric=False)  # a constant network: one order

    # transform: modeling direction, "to parent" of the moving volume, linear, with references
    t = out.transform_node
    assert t.IsA("vtkMRMLLinearTransformNode") and t.IsLinear()
    assert np.allclose(slicer.util.arrayFromTransformMatrix(t), geo.invert(truth), atol=1e-5)
    assert np.allclose(out.moving_to_fixed_world, geo.invert(truth), atol=1e-5)
    assert t.GetNodeReference(t.GetFixedNodeReferenceRole()) is fixed_node
    assert t.GetNodeReference(t.GetMovingNodeReferenceRole()) is moving_node
    assert moving_node.GetParentTransformNode() is t  # applied (default)
    assert '"trained": true' in t.GetAttribute("RigidResNetRegistration.Report")
    # registered and difference volumes on the fixed grid
    for node in (out.registered_volume_node, out.difference_volume_node):
        assert node.GetImageData().GetDimensions() == fixed_node.GetImageData().GetDimensions()
        assert np.allclose(slicer_nodes.ijk_to_ras_of(node), slicer_nodes.ijk_to_ras_of(fixed_node))
    fixed_a = array_ijk(fixed_node)
    err = np.abs(array_ijk(out.registered_volume_node) - fixed_a).mean()
    assert err < 0.2 * np.abs(fixed_a).mean()
    # table: one row per fixed slice, the Lib's slice table
    rows = out.result.slice_table()
    table = out.table_node.GetTable()
    assert out.table_node.GetNumberOfRows() == len(rows) == SHAPE[out.result.frame.axis]
    assert [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())] == list(rows[0])
    used = [r for r in rows if r["used"]]
    assert used and all(abs(r["theta_deg"] - MOTION[0]) < 1e-3 for r in used)
    assert "cpu" in out.summary() and "NCC" in out.summary() and out.similarity["ncc_after"] > out.similarity["ncc_before"]
    # the quality verdict: on the result line (the panel shows it, styled by verdict) and in the result
    assert out.verdict == out.result.verdict == "ok" and out.summary().startswith("quality ok:")
    assert slicer_nodes.VERDICT_STYLE[out.verdict] == ""
    # inputs unchanged (only the moving volume's parent transform was set, because asked)
    assert_same_state(state(fixed_node), before[0])
    moving_now = state(moving_node)
    assert_same_state(moving_now[:2] + before[1][2:], before[1])


@pytest.mark.parametrize("fixed_grid,moving_grid,initial", [
    ("LPS anisotropic", None, False),
    ("oblique", "RAS", False),
    ("sagittal", "LPS anisotropic", False),
    ("RAS", "oblique", True),
])
def test_hardened_transform_reproduces_the_registered_volume(module, fixed_grid, moving_grid, initial):
    """The output transform observed by the moving volume and hardened (MRML's transform logic)
    gives, resampled onto the fixed grid, the registered volume; also when the moving volume
    starts under a linear transform (used as initial position and included)."""
    scene = slicer.vtkMRMLScene()
    fixed_node, moving_node, truth = case(scene, fixed_grid, moving_grid)
    expected = geo.invert(truth)
    if initial:  # the user pre-positioned the moving volume: move it away, then back by hand
        shift = geo.rigid_matrix_3d((0, 0, 7), (6, -4, 3), np.zeros(3))
        stored = slicer_nodes.ijk_to_ras_of(moving_node)
        moving_node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(shift @ stored))
        moving_node.SetAndObserveTransformNodeID(linear_transform(scene, geo.invert(shift), "initial").GetID())
        expected = expected @ geo.invert(shift)
    oracle = ConstantPredictor(ORACLE, MOTION)
    out = module.RigidResNetRegistrationLogic().register(fixed_node, moving_node, iterations=1, refine=False, predictor=oracle, device="cpu")
    assert np.allclose(out.moving_to_fixed_world, expected, atol=1e-6)
    assert moving_node.GetParentTransformNode() is out.transform_node

    assert slicer.vtkSlicerTransformLogic().hardenTransform(moving_node)
    assert moving_node.GetParentTransformNode() is None
    hardened = slicer_nodes.volume_from_node(moving_node, "hardened")
    fixed = slicer_nodes.volume_from_node(fixed_node, "fixed")
    resampled = resample_volume(torch.from_numpy(hardened.array.astype(np.float32)), hardened.ijk_to_ras,
                                fixed.shape, fixed.ijk_to_ras).numpy()
    compare_images(resampled, array_ijk(out.registered_volume_node), float(np.abs(hardened.array).max()))


def test_refined_outputs_come_from_the_final_transform(module):
    """With the refinement moving the transform away from the network's estimate (a network 2 deg
    / 1.5 mm off), the transform node holds the final transform, and the registered and difference
    volume nodes are made with it: hardening the transform on the moving volume reproduces them."""
    scene = slicer.vtkMRMLScene()
    fixed_node, moving_node, truth = case(scene, "LPS anisotropic", "oblique")
    off = ConstantPredictor(ORACLE, MOTION + np.array([2.0, 1.5, -1.0]))
    out = module.RigidResNetRegistrationLogic().register(fixed_node, moving_node, iterations=1, predictor=off, device="cpu")
    result = out.result
    assert result.refinement is not None and not result.refinement.get("rejected")
    centre = result.frame.centre
    net_rot, net_mm = geo.rigid_error(result.network_fixed_to_moving_ras, truth, centre)
    rot, mm = geo.rigid_error(result.fixed_to_moving_ras, truth, centre)
    assert net_rot > 1.5 and rot < 0.5 * net_rot and mm < 0.5 * net_mm  # the two transforms differ
    assert np.allclose(slicer.util.arrayFromTransformMatrix(out.transform_node), geo.invert(result.fixed_to_moving_ras), atol=1e-6)

    assert slicer.vtkSlicerTransformLogic().hardenTransform(moving_node)
    hardened = slicer_nodes.volume_from_node(moving_node, "hardened")
    fixed = slicer_nodes.volume_from_node(fixed_node, "fixed")
    m_t = torch.from_numpy(hardened.array.astype(np.float32))
    resampled = resample_volume(m_t, hardened.ijk_to_ras, fixed.shape, fixed.ijk_to_ras)
    scale = float(np.abs(hardened.array).max())
    compare_images(resampled.numpy(), array_ijk(out.registered_volume_node), scale)
    by_network = resample_volume(m_t, hardened.ijk_to_ras, fixed.shape, fixed.ijk_to_ras,
                                 geo.invert(result.fixed_to_moving_ras) @ result.network_fixed_to_moving_ras)
    # the network's transform gives a volume 20 times further away than compare_images allows
    assert np.abs(by_network.numpy() - array_ijk(out.registered_volume_node)).mean() > 2e-3 * scale
    f_t = torch.from_numpy(fixed.array.astype(np.float32))
    difference = difference_image(f_t, resampled, intensity_range(f_t), intensity_range(m_t)).numpy()
    compare_images(difference, array_ijk(out.difference_volume_node), 1.0)


def test_hardened_volume_matches_registered_volume_with_simpleitk(module):
    """Independent resampler: SimpleITK on the hardened node's array + geometry."""
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is a test dependency")
    scene = slicer.vtkMRMLScene()
    fixed_node, moving_node, _ = case(scene, "oblique", "LPS anisotropic")
    out = module.RigidResNetRegistrationLogic().register(fixed_node, moving_node, iterations=1, refine=False, predictor=ConstantPredictor(ORACLE, MOTION))
    moving_node.HardenTransform()

    def to_sitk(node):
        m = slicer_nodes.ijk_to_ras_of(node)
        lps = np.diag([-1.0, -1.0, 1.0]) @ m[:3, :3]
        spacing = np.linalg.norm(lps, axis=0)
        image = sitk.GetImageFromArray(slicer.util.arrayFromVolume(node).astype(np.float32))  # [k, j, i] -> (i, j, k)
        image.SetSpacing(spacing.tolist())
        image.SetDirection((lps / spacing).ravel().tolist())
        image.SetOrigin((np.diag([-1.0, -1.0, 1.0]) @ m[:3, 3]).tolist())
        return image

    ref = sitk.Resample(to_sitk(moving_node), to_sitk(fixed_node), sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    compare_images(sitk.GetArrayFromImage(ref), slicer.util.arrayFromVolume(out.registered_volume_node),
                   float(slicer.util.arrayFromVolume(moving_node).max()))


def test_mrml_transform_file_equals_the_command_line_transform_file(module, constant_card, tmp_path):
    """MRML's own transform storage node writes the output transform to a .tfm equal to the
    command line's transform.tfm for the same inputs; MRML reads the command line's file back
    as the same transform node."""
    from RigidResNetRegistrationLib.cli import main

    scene = slicer.vtkMRMLScene()
    fixed_node, moving_node, truth = case(scene, "oblique", "LPS anisotropic")
    fixed = slicer_nodes.volume_from_node(fixed_node, "fixed")
    moving = slicer_nodes.volume_from_node(moving_node, "moving")
    out = module.RigidResNetRegistrationLogic().register(fixed_node, moving_node, iterations=1, refine=False, device="cpu", model=str(constant_card), symmetric=False,
                                                          differenceVolume=False, sliceTable=False)

    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(tmp_path / "mrml.tfm"))
    assert storage.WriteData(out.transform_node)
    from_mrml = read_tfm(tmp_path / "mrml.tfm")

    write_volume(fixed, tmp_path / "fixed.nii.gz")
    write_volume(moving, tmp_path / "moving.nii.gz")
    cli_out = tmp_path / "cli"
    code = main([str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), "-o", str(cli_out), "--device", "cpu", "--iterations", "1", "--no-refine", "--no-symmetric",
                 "--weights", str(constant_card), "--no-overview", "--quiet"])
    assert code == 0
    from_cli = read_tfm(cli_out / "transform.tfm")
    assert np.allclose(from_mrml, from_cli, atol=1e-4)  # NIfTI stores the affine in float32
    assert np.allclose(from_mrml, out.result.fixed_to_moving_ras, atol=1e-9)
    assert np.allclose(from_mrml, truth, atol=1e-5)
    # the Lib's text (what the CLI writes) read by MRML: the same transform node
    (tmp_path / "lib.tfm").write_text(format_tfm(out.result.fixed_to_moving_ras))
    reader = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    reader.SetFileName(str(tmp_path / "lib.tfm"))
    loaded = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "loaded")
    assert reader.ReadData(loaded)
    assert np.allclose(slicer.util.arrayFromTransformMatrix(loaded), slicer.util.arrayFromTransformMatrix(out.transform_node), atol=1e-9)


def test_outputs_are_optional_and_existing_nodes_are_reused(module):
    scene = slicer.vtkMRMLScene()
    fixed_node, moving_node, truth = case(scene)
    logic = module.RigidResNetRegistrationLogic()
    n0 = scene.GetNumberOfNodes()
    out = logic.register(fixed_node, moving_node, iterations=1, refine=False, predictor=ConstantPredictor(ORACLE, MOTION), registeredVolume=False,
                         differenceVolume=False, sliceTable=False, applyTransform=False)
    assert out.registered_volume_node is None and out.difference_volume_node is None and out.table_node is None
    assert out.result.registered is None  # not computed either
    assert moving_node.GetParentTransformNode() is None
    assert scene.GetNumberOfNodes() == n0 + 1  # only the transform node
    # second run into chosen nodes, moving volume already under the output transform: it is
    # replaced, not composed with the previous result
    transform = out.transform_node
    moving_node.SetAndObserveTransformNodeID(transform.GetID())
    registered = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "mine")
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "my table")
    again = logic.register(fixed_node, moving_node, iterations=1, refine=False, predictor=ConstantPredictor(ORACLE, MOTION), transformNode=transform,
                           registeredVolume=registered, differenceVolume=False, sliceTable=table)
    assert again.transform_node is transform and again.registered_volume_node is registered and again.table_node is table
    assert np.allclose(slicer.util.arrayFromTransformMatrix(transform), geo.invert(truth), atol=1e-6)
    assert registered.GetImageData().GetDimensions() == fixed_node.GetImageData().GetDimensions()
    assert table.GetNumberOfRows() == len(again.result.used)


def test_slices_mode_fills_the_table_with_per_slice_motion(module):
    scene = slicer.vtkMRMLScene()
    fixed_node, moving_node, _ = case(scene, "RAS")
    first = module.RigidResNetRegistrationLogic().register(fixed_node, moving_node, iterations=1, refine=False, predictor=ConstantPredictor(ORACLE, MOTION),
                                                           registeredVolume=False, differenceVolume=False, applyTransform=False)
    n_used = int(first.result.informative.sum())  # slices mode registers every informative slice
    n_common = int(first.result.used.sum())  # ... after the common motion, from the slices volume mode uses
    per_slice = np.tile(MOTION, (n_used, 1)) + np.linspace(-1, 1, n_used)[:, None] * [1.0, 0.5, 0.0]
    residual = geo.compose_params_2d(per_slice, geo.invert_params_2d(np.asarray(MOTION, dtype=float)))  # MOTION o residual = per_slice
    answers = np.vstack([np.tile(MOTION, (n_common, 1)), residual])
    out = module.RigidResNetRegistrationLogic().register(fixed_node, moving_node, iterations=1, refine=False, mode="slices", predictor=ConstantPredictor(ORACLE, answers))
    table = out.table_node.GetTable()
    theta = np.array([table.GetColumnByName("theta_deg").GetValue(i) for i in range(table.GetNumberOfRows())])
    used = np.array([table.GetColumnByName("used").GetValue(i) for i in range(table.GetNumberOfRows())], bool)
    assert np.allclose(theta[used], per_slice[:, 0], atol=1e-5)
    assert out.table_node.GetAttribute("RigidResNetRegistration.Mode") == "slices"


def test_refine_slices_reaches_the_engine(module):
    scene = slicer.vtkMRMLScene()
    fixed_node, moving_node, _ = case(scene, "RAS")
    kw = dict(iterations=1, refine=False, mode="slices", registeredVolume=False, differenceVolume=False, applyTransform=False)
    plain = module.RigidResNetRegistrationLogic().register(fixed_node, moving_node, predictor=ConstantPredictor(ORACLE, MOTION), **kw)
    refined = module.RigidResNetRegistrationLogic().register(fixed_node, moving_node, predictor=ConstantPredictor(ORACLE, MOTION),
                                                             refineSlices=True, **kw)
    assert plain.result.refinement is None
    assert refined.result.refinement["scope"] == "slices" and refined.result.refinement["slices_refined"] > 0
    assert not np.allclose(refined.result.slice_params, plain.result.slice_params)


def _self_test_case(module):
    """The module's own Test class (its cases from ``slicer_selftest``) as a unittest case on
    slicer-core: each case gets a fresh real MRML scene instead of the application's."""
    import unittest

    class SelfTest(module.RigidResNetRegistrationTest, unittest.TestCase):
        def setUp(self):
            self.scene = slicer.vtkMRMLScene()

        def delayDisplay(self, message, msec=None):
            print(message)

        def runTest(self):  # unittest needs a method named by the constructor
            self.runAll()

    return SelfTest()


def test_the_modules_self_test_cases_pass_on_real_mrml_with_the_bundled_model(module):
    """``RigidResNetRegistrationTest.runTest`` (what Slicer's Reload and Test and ctest run): the
    bundled sample against a copy moved by the demo motion in volume mode (within 1.5 deg / 1.5 mm,
    difference volume smaller), slices mode with the per-slice refinement (median within 0.1 deg /
    0.1 mm), bad inputs and a cancelled run, all through the module's Logic on real MRML nodes."""
    import unittest

    from RigidResNetRegistrationLib.model_card import read_model_card

    if not read_model_card(slicer_nodes.model_card_path(None)).trained:
        pytest.skip("the bundled model is an untrained placeholder")
    result = unittest.TestResult()
    _self_test_case(module).run(result)
    assert result.testsRun == 1
    assert result.wasSuccessful(), [text for _, text in result.failures + result.errors]


def test_the_self_test_fails_when_the_registration_is_wrong(module, monkeypatch):
    """The self-test can fail: a Logic whose transform is off by a few degrees is caught."""
    case_ = _self_test_case(module)
    real = module.RigidResNetRegistrationLogic.register

    def off(self, fixed, moving, **kw):
        out = real(self, fixed, moving, **kw)
        out.moving_to_fixed_world = geo.rigid_matrix_3d((0, 0, 4.0), (3.0, 0, 0), np.zeros(3)) @ out.moving_to_fixed_world
        slicer.util.updateTransformMatrixFromArray(out.transform_node, out.moving_to_fixed_world)
        return out

    monkeypatch.setattr(module.RigidResNetRegistrationLogic, "register", off)
    case_.setUp()
    with pytest.raises(AssertionError, match=r"not less than 1\.5"):  # the rotation or the translation error
        case_.test_RegisterSampleWithKnownMotion()


def test_cancel_leaves_no_nodes_and_inputs_untouched(module):
    scene = slicer.vtkMRMLScene()
    fixed_node, moving_node, _ = case(scene)
    before = state(fixed_node), state(moving_node)
    n0 = scene.GetNumberOfNodes()
    calls = []
    with pytest.raises(RegistrationCancelled) as caught:
        module.RigidResNetRegistrationLogic().register(fixed_node, moving_node, iterations=1, refine=False, predictor=ConstantPredictor(ORACLE, MOTION),
                                                       progress=lambda f, m: calls.append(f), cancel=lambda: len(calls) > 1)
    assert slicer_nodes.is_cancellation(caught.value)
    assert scene.GetNumberOfNodes() == n0
    assert_same_state(state(fixed_node), before[0])
    assert_same_state(state(moving_node), before[1])


def test_a_failure_while_writing_outputs_removes_the_created_nodes(module, monkeypatch):
    scene = slicer.vtkMRMLScene()
    fixed_node, moving_node, _ = case(scene)
    n0 = scene.GetNumberOfNodes()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(slicer_nodes, "set_table", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        module.RigidResNetRegistrationLogic().register(fixed_node, moving_node, iterations=1, refine=False, predictor=ConstantPredictor(ORACLE, MOTION))
    assert scene.GetNumberOfNodes() == n0
    assert moving_node.GetParentTransformNode() is None


# --------------------------------------------------------------------------- bad inputs


def _vector_volume(scene):
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    slicer.util.updateVolumeFromArray(node, np.ones((4, 5, 6, 3), np.float32))
    return node


def _two_component_scalar(scene):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "two components")
    image = vtk.vtkImageData()
    image.SetDimensions(6, 5, 4)
    image.AllocateScalars(vtk.VTK_FLOAT, 2)
    node.SetAndObserveImageData(image)
    return node


def _constant(scene):
    vol = phantom_volume(shape=(20, 20, 12))
    vol.array[:] = 7.0
    return add_volume(scene, vol, "flat")


def _under_grid_transform(scene):
    node = case(scene)[1]
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    node.SetAndObserveTransformNodeID(grid.GetID())
    return node


_KEEP_ALIVE: list = []


def _other_scene():
    scene = slicer.vtkMRMLScene()
    _KEEP_ALIVE.append(scene)  # a node's scene pointer is weak: keep the scene alive
    return scene


BAD = {
    "no fixed volume": (lambda s, f, m: dict(fixedVolume=None), "select a fixed volume"),
    "same node": (lambda s, f, m: dict(movingVolume=f), "same node"),
    "vector volume": (lambda s, f, m: dict(movingVolume=_vector_volume(s)), "vector"),
    "two-component image": (lambda s, f, m: dict(movingVolume=_two_component_scalar(s)), "components"),
    "label map": (lambda s, f, m: dict(fixedVolume=s.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "seg")), "label map"),
    "no image data": (lambda s, f, m: dict(fixedVolume=s.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")), "no image data"),
    "not a volume": (lambda s, f, m: dict(fixedVolume=s.AddNewNodeByClass("vtkMRMLModelNode", "surface")), "scalar volume node"),
    "other scene": (lambda s, f, m: dict(movingVolume=case(_other_scene())[1]), "different scenes"),
    "output is an input": (lambda s, f, m: dict(registeredVolume=f), "is an input volume"),
    "same output twice": (lambda s, f, m: (lambda n: dict(registeredVolume=n, differenceVolume=n))(
        s.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "out")), "different nodes"),
    "transform moves the fixed": (lambda s, f, m: (lambda t: (f.SetAndObserveTransformNodeID(t.GetID()), dict(transformNode=t))[1])(
        linear_transform(s, np.eye(4))), "moves the fixed volume"),
    "non-linear parent": (lambda s, f, m: dict(movingVolume=_under_grid_transform(s)), "non-linear"),
    "constant volume": (lambda s, f, m: dict(movingVolume=_constant(s)), "constant"),
    "bad mode": (lambda s, f, m: dict(mode="sideways"), "mode must be"),
    "bad device": (lambda s, f, m: dict(device="tpu"), "device must be"),
    "bad symmetric stride": (lambda s, f, m: dict(mode="slices", symmetricStride=0), "symmetric stride must be"),
    "unknown model": (lambda s, f, m: dict(model="no_such_model", predictor=None), "unknown model"),
}


@pytest.mark.parametrize("what", list(BAD))
def test_bad_inputs_raise_value_error_and_create_nothing(module, what):
    scene = slicer.vtkMRMLScene()
    fixed_node, moving_node, _ = case(scene)
    make, message = BAD[what]
    args = dict(fixedVolume=fixed_node, movingVolume=moving_node, predictor=ConstantPredictor(ORACLE, MOTION), device="cpu")
    args.update(make(scene, fixed_node, moving_node))
    n0 = scene.GetNumberOfNodes()
    fixed_before, moving_before = state(fixed_node), state(moving_node)
    with pytest.raises(ValueError, match=message) as caught:
        module.RigidResNetRegistrationLogic().register(**args)
    assert "\n" not in str(caught.value)
    assert scene.GetNumberOfNodes() == n0
    assert_same_state(state(fixed_node), fixed_before)
    assert moving_node.GetParentTransformNode() is None and np.array_equal(state(moving_node)[0], moving_before[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda_is_a_clear_error(module, constant_card):
    scene = slicer.vtkMRMLScene()
    fixed_node, moving_node, _ = case(scene)
    with pytest.raises(RuntimeError, match="CUDA"):
        module.RigidResNetRegistrationLogic().register(fixed_node, moving_node, iterations=1, refine=False, device="cuda", model=str(constant_card))
    with pytest.raises(ValueError, match="CUDA"):
        module.RigidResNetRegistrationLogic().register(fixed_node, moving_node, iterations=1, refine=False, device="cuda",
                                                       predictor=ConstantPredictor(ORACLE, MOTION))


def test_register_nodes_directly_with_options(constant_card):
    """The adapter on its own (what the Logic calls), with engine options."""
    from RigidResNetRegistrationLib.model import load_model

    scene = slicer.vtkMRMLScene()
    fixed_node, moving_node, truth = case(scene, "sagittal")
    out = slicer_nodes.register_nodes(fixed_node, moving_node, load_model(constant_card, "cpu"),
                                      RegistrationOptions(device="cpu", batch_size=7, iterations=1, refine=False, symmetric=False),
                                      apply_transform=False)
    assert out.result.frame.orientation == "axial"
    assert np.allclose(out.moving_to_fixed_world, geo.invert(truth), atol=1e-5)
    assert out.created == [out.transform_node, out.registered_volume_node, out.difference_volume_node, out.table_node]


def test_logic_result_line_shows_a_failed_quality_verdict(module, tmp_path, caplog):
    """A network that answers the wrong motion: the Logic's result line (what the panel shows, styled
    by verdict, and what it logs, as a warning) says FAILED with the verdict's reasons."""
    import logging

    wrong = write_card(tmp_path, bias=(-MOTION).tolist(), name="wrong")
    scene = slicer.vtkMRMLScene()
    fixed_node, moving_node, truth = case(scene)
    with caplog.at_level(logging.INFO):
        out = module.RigidResNetRegistrationLogic().register(fixed_node, moving_node, iterations=1, refine=False,
                                                             device="cpu", model=str(wrong), symmetric=False)
    assert out.verdict == "failed" and out.result.warnings
    line = out.summary()
    assert line.startswith("quality FAILED:") and all(f"WARNING: {r}" in line for r in out.result.warnings)
    assert any(r.levelno == logging.WARNING and "quality FAILED" in r.getMessage() for r in caplog.records)
    assert "font-weight: bold" in slicer_nodes.VERDICT_STYLE["failed"]


# --------------------------------------------------------------------------- where a registration starts

#: 90 degrees about S and 112 mm away (RAS resampling, fixed -> moving): the headers share nothing
FAR = geo.rigid_matrix_3d((0.0, 0.0, 90.0), (100.0, -40.0, 30.0))


def _far_case(scene):
    fixed = phantom_volume(shape=(48, 56, 40))
    moving = moved_copy(fixed, FAR, shape=(40, 56, 48), codes="PSR", centre=tuple(FAR[:3, 3]))
    return add_volume(scene, fixed, "fixed"), add_volume(scene, moving, "far moving")


def test_logic_initial_transform_node_and_parent_transform_give_the_start(module):
    """An initial transform node (modeling direction, as if the moving volume were under it) and a
    parent transform on the moving volume both place it before the network; the output includes
    them; the node in the wrong direction leaves the volumes apart."""
    scene = slicer.vtkMRMLScene()
    fixed_node, moving_node = _far_case(scene)
    logic = module.RigidResNetRegistrationLogic()
    kw = dict(iterations=1, refine=False, device="cpu", init="header", registeredVolume=False, differenceVolume=False,
              sliceTable=False, applyTransform=False)
    start = linear_transform(scene, geo.invert(FAR), "start")
    before = state(moving_node)
    out = logic.register(fixed_node, moving_node, predictor=ConstantPredictor(ORACLE, [0.0, 0.0, 0.0]),
                         initialTransformNode=start, **kw)
    assert np.allclose(out.moving_to_fixed_world, geo.invert(FAR), atol=1e-6)
    assert out.result.initialisation.used == "given"
    assert_same_state(state(moving_node), before)
    # the same start as the moving volume's parent transform (the output replaces it and includes it)
    moving_node.SetAndObserveTransformNodeID(start.GetID())
    p = np.array([3.0, 1.0, -2.0])
    out = logic.register(fixed_node, moving_node, predictor=ConstantPredictor(ORACLE, p), **kw)
    frame = out.result.frame
    assert np.allclose(out.moving_to_fixed_world, geo.invert(geo.params_to_ras(p, frame)) @ geo.invert(FAR), atol=1e-6)
    moving_node.SetAndObserveTransformNodeID(None)
    with pytest.raises(ValueError, match="do not overlap"):
        logic.register(fixed_node, moving_node, predictor=ConstantPredictor(ORACLE, [0.0, 0.0, 0.0]),
                       initialTransformNode=linear_transform(scene, FAR, "wrong way"), **kw)
    with pytest.raises(ValueError, match="init must be one of"):
        logic.register(fixed_node, moving_node, predictor=ConstantPredictor(ORACLE, [0.0, 0.0, 0.0]), **{**kw, "init": "x"})


def test_logic_default_start_registers_a_pair_without_shared_header(module):
    scene = slicer.vtkMRMLScene()
    fixed_node, moving_node = _far_case(scene)
    out = module.RigidResNetRegistrationLogic().register(fixed_node, moving_node, iterations=1, device="cpu",
                                                         predictor=ConstantPredictor(ORACLE, [0.0, 0.0, 0.0]))
    fixed = slicer_nodes.volume_from_node(fixed_node)
    rot, mm = geo.rigid_error(geo.invert(out.moving_to_fixed_world), FAR, geo.volume_centre_ras(fixed.ijk_to_ras, fixed.shape))
    assert rot < 1.0 and mm < 1.0, (rot, mm)
    assert out.result.initialisation.used == "moments"
    assert json.loads(out.transform_node.GetAttribute("RigidResNetRegistration.Report"))["init"]["used"] == "moments"


# --------------------------------------------------------------------------- the panel (Qt-free part)


def _panel_settings(fixed=None, moving=None, **overrides):
    """The parameter node's fields with their defaults (the module's own), as the panel reads them."""
    from types import SimpleNamespace

    from RigidResNetRegistrationLib.options import DEFAULTS

    fields = dict(fixedVolume=fixed, movingVolume=moving, device="cpu", mode=DEFAULTS.mode, model="rigid_resnet34",
                  axis=DEFAULTS.axis, iterations=1, refine=False, symmetric=DEFAULTS.symmetric,
                  refineSlices=DEFAULTS.refine_slices, batchSize=DEFAULTS.batch_size, init=DEFAULTS.init,
                  initialTransform=None, outputTransform=None, applyTransform=True, createRegisteredVolume=True,
                  registeredVolume=None, createDifferenceVolume=False, differenceVolume=None, createSliceTable=True,
                  sliceTable=None)
    fields.update(overrides)
    return SimpleNamespace(**fields)


def test_panel_keywords_are_the_parameter_node_fields_and_reach_the_logic(module):
    """Every parameter node field is either passed to ``register`` by the panel or is one of the
    output switches; the keywords are accepted by the Logic and give the outputs asked for."""
    import ast
    import inspect

    from RigidResNetRegistrationLib import slicer_panel

    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    node_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "RigidResNetRegistrationParameterNode")
    fields = {n.target.id for n in node_class.body if isinstance(n, ast.AnnAssign)}
    settings = _panel_settings()
    assert set(vars(settings)) == fields
    keywords = slicer_panel.register_keywords(settings)
    assert set(keywords) <= set(inspect.signature(module.RigidResNetRegistrationLogic.register).parameters)
    assert keywords["registeredVolume"] is True and keywords["differenceVolume"] is False and keywords["sliceTable"] is True

    scene = slicer.vtkMRMLScene()
    fixed_node, moving_node, _ = case(scene, "RAS")
    existing = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "mine")
    settings = _panel_settings(fixed_node, moving_node, registeredVolume=existing, mode="slices", applyTransform=False)
    keywords = slicer_panel.register_keywords(settings)
    out = module.RigidResNetRegistrationLogic().register(fixed_node, moving_node, predictor=ConstantPredictor(ORACLE, MOTION),
                                                         **{k: v for k, v in keywords.items() if k != "model"})
    assert out.registered_volume_node is existing and out.difference_volume_node is None and out.table_node is not None
    assert out.result.mode == "slices" and moving_node.GetParentTransformNode() is None


def test_panel_says_why_register_cannot_run(module):
    from RigidResNetRegistrationLib import slicer_panel

    scene = slicer.vtkMRMLScene()
    fixed_node, moving_node, _ = case(scene, "RAS")
    assert slicer_panel.register_problem(None) == "Select the fixed volume"
    assert slicer_panel.register_problem(_panel_settings(fixed_node)) == "Select the moving volume"
    assert "different" in slicer_panel.register_problem(_panel_settings(fixed_node, fixed_node))
    assert slicer_panel.register_problem(_panel_settings(fixed_node, moving_node)) is None
    # an output node that is an input would overwrite it: the adapter's check, as one line
    problem = slicer_panel.register_problem(_panel_settings(fixed_node, moving_node, registeredVolume=moving_node))
    assert problem and "\n" not in problem and "moving" in problem.lower()
    # switched off, the same node is not an output and is no problem
    assert slicer_panel.register_problem(_panel_settings(fixed_node, moving_node, registeredVolume=moving_node,
                                                         createRegisteredVolume=False)) is None


def test_panel_enables_selectors_and_refinements_by_setting():
    from RigidResNetRegistrationLib import slicer_panel

    assert slicer_panel.enabled_widgets(None) == {}
    volume = slicer_panel.enabled_widgets(_panel_settings(mode="volume", createDifferenceVolume=False))
    assert volume["refineCheckBox"] and not volume["refineSlicesCheckBox"]
    assert volume["registeredVolumeSelector"] and not volume["differenceVolumeSelector"]
    slices = slicer_panel.enabled_widgets(_panel_settings(mode="slices", createSliceTable=False))
    assert slices["refineSlicesCheckBox"] and not slices["refineCheckBox"] and not slices["sliceTableSelector"]


def test_panel_preselects_two_scalar_volumes_and_keeps_a_choice():
    from RigidResNetRegistrationLib import slicer_panel

    scene = slicer.vtkMRMLScene()
    assert slicer_panel.default_inputs(scene, None, None) == (None, None)
    scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")  # never preselected
    a = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "a")
    assert slicer_panel.default_inputs(scene, None, None) == (a, None)
    b = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "b")
    assert slicer_panel.default_inputs(scene, None, None) == (a, b)
    assert slicer_panel.default_inputs(scene, b, None) == (b, a)
    assert slicer_panel.default_inputs(scene, b, b) == (b, b)  # the user's choice is kept (and flagged by register_problem)


def test_panel_result_line_names_the_outputs_and_is_styled_by_verdict(module, monkeypatch):
    from RigidResNetRegistrationLib import slicer_panel

    scene = slicer.vtkMRMLScene()
    fixed_node, moving_node, _ = case(scene, "RAS")
    out = module.RigidResNetRegistrationLogic().register(fixed_node, moving_node, iterations=1, refine=False,
                                                         predictor=ConstantPredictor(ORACLE, MOTION), differenceVolume=False)
    text, style = slicer_panel.result_text(out)
    first, second = text.split("\n")
    assert first == out.summary()
    assert out.transform_node.GetName() in second and out.registered_volume_node.GetName() in second
    assert out.table_node.GetName() in second and style == slicer_nodes.VERDICT_STYLE[out.verdict]
    monkeypatch.setattr(slicer_nodes.RegistrationNodes, "verdict", property(lambda self: "failed"))
    text, style = slicer_panel.result_text(out)
    assert text.startswith("quality FAILED") and "bold" in style


def test_panel_lists_the_bundled_models_and_describes_them():
    from RigidResNetRegistrationLib import slicer_panel

    keys, default = slicer_panel.model_choices()
    assert default == "rigid_resnet34" and default in keys
    label, notes = slicer_panel.model_description(default)
    assert label and "rigid" in label.lower()
    assert slicer_panel.model_description("no_such_model") == ("", "")


# --------------------------------------------------------------------------- installing PyTorch


def test_a_bad_model_key_is_an_error_before_anything_is_installed(monkeypatch):
    from RigidResNetRegistrationLib import slicer_install

    asked = []
    monkeypatch.setattr(slicer_install, "ensure_torch", lambda *a, **k: asked.append(1))
    with pytest.raises(ValueError, match="unknown model"):
        slicer_install.load_predictor("no_such_model", "cpu")
    assert not asked
    messages = []
    predictor = slicer_install.load_predictor(None, "cpu", progress=lambda f, m: messages.append(m))
    assert asked == [1] and predictor.card.name and messages == ["loading the model"]


def test_installing_torch_asks_first_and_a_refusal_is_a_clear_error(monkeypatch):
    """Without torch (simulated) and without the PyTorch extension or pip_ensure, the user is asked;
    declining installs nothing and raises one line; accepting calls pip_install."""
    from RigidResNetRegistrationLib import slicer_install

    monkeypatch.setattr(slicer_install, "torch_importable", lambda: False)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # import fails: extension absent
    monkeypatch.setattr(slicer, "packaging", types.SimpleNamespace(), raising=False)  # no pip_ensure (Slicer < 5.11)
    monkeypatch.setitem(sys.modules, "slicer.packaging", slicer.packaging)
    questions, installed = [], []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, *a, **k: questions.append(text) or False, raising=False)
    monkeypatch.setattr(slicer.util, "pip_install", lambda req, *a, **k: installed.append(req), raising=False)
    with pytest.raises(RuntimeError, match="declined"):
        slicer_install.ensure_torch()
    assert len(questions) == 1 and "PyTorch" in questions[0] and not installed
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, *a, **k: True, raising=False)
    with pytest.raises(RuntimeError, match="could not be installed"):  # torch_importable stays False here
        slicer_install.ensure_torch()
    assert installed == ["torch>=2.1"]
