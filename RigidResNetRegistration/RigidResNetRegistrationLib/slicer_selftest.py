"""The module's self-test cases (``RigidResNetRegistrationTest`` in ``RigidResNetRegistration.py``
runs them in Slicer; ``Testing/test_slicer_logic.py`` runs the same cases on ``slicer-core``).

The bundled sample is registered against a copy moved by a known motion, in ``volume`` and
``slices`` mode, through the module's Logic, on real MRML nodes; then bad inputs and a cancelled
run. With an untrained bundled model (its card says ``"trained": false``) the network predicts the
identity, so only geometry and plumbing are checked, and the log says so.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import slicer
import slicer.util

from . import slicer_nodes


class SelfTestCases:
    """Mixed into a ``unittest.TestCase`` (Slicer's ``ScriptedLoadableModuleTest``) that provides
    ``delayDisplay`` and sets ``logicClass`` (the module's Logic class) and ``scene`` (None: the
    application's ``slicer.mrmlScene``)."""

    logicClass: Any = None
    scene: Any = None

    def _scene(self) -> Any:
        return self.scene if self.scene is not None else slicer.mrmlScene

    def _logic(self) -> Any:
        """The module's Logic, with PyTorch importable (in an automated run nothing is installed)."""
        from .slicer_install import torch_importable

        app = getattr(slicer, "app", None)
        if not torch_importable() and app is not None and app.testingEnabled():
            self.fail("PyTorch is not installed in this Slicer's Python: install the PyTorch extension "
                      "(or register once interactively, which offers to install it)")
        logic = self.logicClass()
        logic.ensureDependencies()
        return logic

    def _sampleWithKnownMotion(self) -> tuple[Any, Any, np.ndarray]:
        """Nodes of the bundled sample and of a copy moved by the known motion, and the motion
        (RAS resampling transform, fixed -> moving)."""
        from . import sample

        fixed = sample.load_sample()
        moving, truth = sample.apply_known_motion(fixed)
        scene = self._scene()
        fixedNode = slicer_nodes.add_volume_node(scene, fixed.array, fixed.ijk_to_ras, "MNI152_T1")
        movingNode = slicer_nodes.add_volume_node(scene, moving.array, moving.ijk_to_ras, "MNI152_T1 with known motion")
        return fixedNode, movingNode, truth

    def test_RegisterSampleWithKnownMotion(self) -> None:
        from . import geometry

        self.delayDisplay("Registering the bundled sample against a copy with a known motion")
        logic = self._logic()
        fixedNode, movingNode, truth = self._sampleWithKnownMotion()
        fixedBefore = slicer.util.arrayFromVolume(fixedNode).copy()
        movingBefore = slicer.util.arrayFromVolume(movingNode).copy()
        nodesBefore = self._scene().GetNumberOfNodes()

        out = logic.register(fixedNode, movingNode, device="auto", mode="volume")
        logging.info(f"self-test: {out.summary()}")

        # geometry and plumbing (whatever the model)
        self.assertTrue(np.allclose(slicer.util.arrayFromTransformMatrix(out.transform_node), out.moving_to_fixed_world, atol=1e-6))
        self.assertEqual(movingNode.GetParentTransformNode(), out.transform_node)
        self.assertEqual(out.transform_node.GetNodeReference(out.transform_node.GetFixedNodeReferenceRole()), fixedNode)
        self.assertEqual(out.transform_node.GetNodeReference(out.transform_node.GetMovingNodeReferenceRole()), movingNode)
        for node in (out.registered_volume_node, out.difference_volume_node):
            self.assertEqual(node.GetImageData().GetDimensions(), fixedNode.GetImageData().GetDimensions())
            self.assertTrue(np.allclose(slicer_nodes.ijk_to_ras_of(node), slicer_nodes.ijk_to_ras_of(fixedNode)))
        self.assertEqual(out.table_node.GetNumberOfRows(), len(out.result.used))
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(fixedNode), fixedBefore))
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(movingNode), movingBefore))
        self.assertGreater(self._scene().GetNumberOfNodes(), nodesBefore)

        # accuracy against the known motion
        centre = out.result.frame.centre
        rot, trans = geometry.rigid_error(out.moving_to_fixed_world, geometry.invert(truth), centre)
        rot0, trans0 = geometry.rigid_error(np.eye(4), geometry.invert(truth), centre)
        self.delayDisplay(f"error {rot:.2f} deg, {trans:.2f} mm (motion {rot0:.2f} deg, {trans0:.2f} mm)")
        if not out.model_trained:
            logging.warning("self-test: the bundled model is an UNTRAINED placeholder (it predicts the identity): "
                            "only geometry and plumbing were checked, not accuracy against the known motion")
            self.assertTrue(np.allclose(out.moving_to_fixed_world, np.eye(4), atol=1e-6))
            return
        self.assertLess(rot, 1.5)
        self.assertLess(trans, 1.5)
        self.assertLess(rot + trans, 0.5 * (rot0 + trans0))
        self.assertGreater(out.similarity["ncc_after"], out.similarity["ncc_before"])
        # the difference volume shrank: compare with |fixed - moving| scaled the same way
        after = float(np.mean(slicer.util.arrayFromVolume(out.difference_volume_node)))
        self.assertLess(after, _scaledDifference(fixedNode, movingNode))
        self.delayDisplay("Test passed")

    def test_SlicesModeWithRefinement(self) -> None:
        from . import geometry

        self.delayDisplay("Slices mode with the per-slice refinement")
        logic = self._logic()
        fixedNode, movingNode, truth = self._sampleWithKnownMotion()
        out = logic.register(fixedNode, movingNode, device="auto", mode="slices", refineSlices=True,
                             registeredVolume=False, differenceVolume=False, applyTransform=False)
        logging.info(f"self-test (slices): {out.summary()}")
        self.assertEqual(out.table_node.GetTable().GetNumberOfRows(), len(out.result.used))
        self.assertEqual(out.result.refinement["scope"], "slices")
        used = out.result.used
        motion = geometry.ras_to_params(truth, out.result.frame)  # the same in-plane motion on every slice
        rot, trans = geometry.params_error_2d(out.result.slice_params[used], np.tile(motion, (int(used.sum()), 1)))
        self.delayDisplay(f"per-slice error, median {np.median(rot):.3f} deg / {np.median(trans):.3f} mm")
        if out.model_trained:
            self.assertLess(float(np.median(rot)), 0.1)
            self.assertLess(float(np.median(trans)), 0.1)
        self.delayDisplay("Test passed")

    def test_BadInputsAndCancel(self) -> None:
        self.delayDisplay("Bad inputs and cancel")
        logic = self._logic()
        fixedNode, movingNode, _truth = self._sampleWithKnownMotion()
        with self.assertRaises(ValueError):
            logic.register(None, movingNode)
        with self.assertRaises(ValueError):
            logic.register(fixedNode, fixedNode)
        with self.assertRaises(ValueError):
            logic.register(fixedNode, movingNode, registeredVolume=fixedNode)
        nodesBefore = self._scene().GetNumberOfNodes()
        with self.assertRaises(RuntimeError) as caught:
            logic.register(fixedNode, movingNode, cancel=lambda: True)
        self.assertTrue(slicer_nodes.is_cancellation(caught.exception))
        self.assertEqual(self._scene().GetNumberOfNodes(), nodesBefore)
        self.assertIsNone(movingNode.GetParentTransformNode())
        self.delayDisplay("Test passed")

    def runAll(self) -> None:
        """Every case, each on a cleared scene (``setUp``)."""
        for case in (self.test_RegisterSampleWithKnownMotion, self.test_SlicesModeWithRefinement, self.test_BadInputsAndCancel):
            self.setUp()
            case()


def _scaledDifference(fixedNode: Any, movingNode: Any) -> float:
    """Mean ``|fixed - moving|`` with each scaled by its 1st-99th percentiles to [0, 1], as the
    difference volume is."""

    def scaled(a: np.ndarray) -> np.ndarray:
        lo, hi = np.percentile(a, [1, 99])
        return np.clip((a - lo) / (hi - lo if hi > lo else 1.0), 0, 1)

    f = slicer.util.arrayFromVolume(fixedNode).astype(np.float64)
    m = slicer.util.arrayFromVolume(movingNode).astype(np.float64)
    return float(np.mean(np.abs(scaled(f) - scaled(m))))
