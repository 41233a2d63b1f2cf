"""Rigid ResNet Registration: the 3D Slicer module (Module, parameter node, Widget, Logic, Test).

Thin on purpose: the ``RigidResNetRegistrationLib`` package registers (``engine``, ``model``, ...),
converts MRML nodes (``slicer_nodes``), computes what the panel shows (``slicer_panel``), installs
PyTorch (``slicer_install``) and holds the self-test cases (``slicer_selftest``). torch is imported
only when a registration runs: opening Slicer or this module never imports or installs anything.
"""

import inspect
import logging
import os
from pathlib import Path
from typing import Annotated, Callable, Optional, Union

import vtk

import slicer
from slicer import vtkMRMLLinearTransformNode, vtkMRMLScalarVolumeNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest,
                                           ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from RigidResNetRegistrationLib import slicer_install, slicer_nodes, slicer_panel  # no torch at import time
from RigidResNetRegistrationLib.slicer_selftest import SelfTestCases
from RigidResNetRegistrationLib.options import (  # torch-free: every choice, default and range
    AXES, BATCH_SIZE_RANGE, DEFAULTS, DEVICES, INIT_MODES, ITERATIONS_RANGE, MODES, RegistrationOptions)

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
README_URL = "https://github.com/RigidResNetRegistration/RigidResNetRegistration#3d-slicer"
SAMPLE_FILE_NAME = "MNI152_2009a_T1.nii.gz"
SAMPLE_PATH = os.path.join(MODULE_DIR, "Resources", "SampleData", SAMPLE_FILE_NAME)
#: SHA256 of the bundled sample (Testing/test_module_static.py checks it against the file).
SAMPLE_SHA256 = "642c992cfbff943b93ab9fd5e2a0d738c54d5efcfc59a5ba45341e9fe27b21b5"


#
# RigidResNetRegistration
#


class RigidResNetRegistration(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Rigid ResNet Registration")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["RigidResNetRegistration developers"]
        self.parent.helpText = _(
            """
Fast rigid registration of brain MRI: a ResNet-34 predicts the in-plane motion of every slice pair,
combined into one rigid transform (<b>volume</b> mode) or kept per slice (<b>slices</b> mode, motion
during a scan). Outputs: the transform moving the moving volume onto the fixed one, the registered
and difference volumes, a per-slice table. CPU or CUDA. See the <a href="{url}">documentation</a>.
"""
        ).format(url=README_URL)
        self.parent.acknowledgementText = _(
            """
Method after Hu Wanting (2024), "Registration of brain MRI based on residual neural network".
The sample volume is a crop of the MNI ICBM152 2009a nonlinear symmetric T1 template
(Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological
Institute, McGill University; see Resources/SampleData/LICENSE.txt). Built on 3D Slicer and PyTorch.
"""
        )
        # Additional initialization step after application startup is complete
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Register sample data sets in Sample Data module
#


def registerSampleData():
    """Add the bundled T1 sample (a local file, checked by SHA256) to the Sample Data module."""
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="Rigid ResNet Registration", sampleName="RigidResNetRegistrationT1",
        thumbnailFileName=os.path.join(MODULE_DIR, "Resources", "Icons", "RigidResNetRegistration.png"),
        uris=Path(SAMPLE_PATH).as_uri(),  # bundled with the module: no download
        fileNames=SAMPLE_FILE_NAME, checksums=f"SHA256:{SAMPLE_SHA256}", nodeNames="MNI152_T1")


#
# RigidResNetRegistrationParameterNode
#

MODEL_KEYS, DEFAULT_MODEL_KEY = slicer_panel.model_choices()


@parameterNodeWrapper
class RigidResNetRegistrationParameterNode:
    """The module's parameters (saved with the scene): the inputs (never modified), the engine's
    options as :meth:`RigidResNetRegistrationLogic.register` takes them, and the outputs (a node
    None is created on Register; ``create...`` False: not made)."""

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    device: Annotated[str, Choice(list(DEVICES))] = DEFAULTS.device
    mode: Annotated[str, Choice(list(MODES))] = DEFAULTS.mode
    model: Annotated[str, Choice(MODEL_KEYS)] = DEFAULT_MODEL_KEY
    axis: Annotated[str, Choice(list(AXES))] = DEFAULTS.axis
    iterations: Annotated[int, WithinRange(*ITERATIONS_RANGE)] = DEFAULTS.iterations
    refine: bool = DEFAULTS.refine
    symmetric: bool = DEFAULTS.symmetric
    refineSlices: bool = DEFAULTS.refine_slices
    batchSize: Annotated[int, WithinRange(*BATCH_SIZE_RANGE)] = DEFAULTS.batch_size
    init: Annotated[str, Choice(list(INIT_MODES))] = DEFAULTS.init
    initialTransform: vtkMRMLLinearTransformNode
    outputTransform: vtkMRMLLinearTransformNode
    applyTransform: bool = True
    createRegisteredVolume: bool = True
    registeredVolume: vtkMRMLScalarVolumeNode
    createDifferenceVolume: bool = True
    differenceVolume: vtkMRMLScalarVolumeNode
    createSliceTable: bool = True
    sliceTable: vtkMRMLTableNode


#
# RigidResNetRegistrationWidget
#


class RigidResNetRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._running = False
        self._cancelRequested = False

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.setup(self)

        # Load widget from .ui file (created by Qt Designer).
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RigidResNetRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)

        # Set scene in MRML widgets ("mrmlSceneChanged(vtkMRMLScene*)" is connected in the .ui file).
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = RigidResNetRegistrationLogic()

        # These connections ensure that we update parameter node when scene is closed
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Buttons
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.progressBar.setVisible(False)
        self.ui.statusLabel.text = ""
        self.ui.resultLabel.text = ""
        self.updateDeviceInfo()
        # Make sure parameter node is initialized (needed for module reload)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self._cancelRequested = True  # a running registration stops at its next batch
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()
        self.updateDeviceInfo()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        # Do not react to parameter node changes (GUI will be updated when the user enters into the module)
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed."""
        self._cancelRequested = True
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure parameter node exists and observed."""
        self.setParameterNode(self.logic.getParameterNode())
        # Select default input nodes if nothing is selected yet to save a few clicks for the user
        p = self._parameterNode
        p.fixedVolume, p.movingVolume = slicer_panel.default_inputs(slicer.mrmlScene, p.fixedVolume, p.movingVolume)

    def setParameterNode(self, inputParameterNode: Optional[RigidResNetRegistrationParameterNode]) -> None:
        """Set and observe parameter node (so that the GUI follows its changes at once)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # the .ui file names each widget's parameter in its "SlicerParameterName" dynamic property
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        self._checkCanApply()
        self.ui.modelInfoLabel.text, self.ui.modelInfoLabel.toolTip = slicer_panel.model_description(p.model if p else None)
        for name, enabled in slicer_panel.enabled_widgets(p).items():
            getattr(self.ui, name).enabled = enabled

    def _checkCanApply(self, caller=None, event=None) -> None:
        """Register is enabled only when the inputs are valid (and is Cancel while running)."""
        if self._running:
            return
        problem = slicer_panel.register_problem(self._parameterNode)
        self.ui.applyButton.enabled = problem is None
        self.ui.applyButton.toolTip = problem or _("Register the moving volume to the fixed volume")

    def updateDeviceInfo(self) -> None:
        """Show which devices can run the model (without importing torch)."""
        self.ui.deviceInfoLabel.text = _("Available: {devices}").format(devices=slicer_nodes.describe_devices())

    def _setRunning(self, running: bool) -> None:
        self._running = running
        for widget in (self.ui.inputsCollapsibleButton, self.ui.settingsCollapsibleButton,
                       self.ui.advancedCollapsibleButton, self.ui.outputsCollapsibleButton):
            widget.enabled = not running
        self.ui.progressBar.setVisible(running)
        self.ui.progressBar.value = 0
        self.ui.applyButton.text = _("Cancel") if running else _("Register")
        self.ui.applyButton.toolTip = _("Stop the registration (no output is created)") if running else ""
        self.ui.applyButton.enabled = True
        if not running:
            self._checkCanApply()

    def _onProgress(self, fraction: float, message: str) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = message
        slicer.app.processEvents()  # keeps the GUI alive and lets the user press Cancel

    def onApplyButton(self) -> None:
        """Register (or, while running, request cancellation)."""
        if self._running:
            self._cancelRequested = True
            self.ui.applyButton.enabled = False
            self.ui.applyButton.text = _("Cancelling...")
            return
        p = self._parameterNode
        self._cancelRequested = False
        self.ui.resultLabel.text = ""
        self.ui.resultLabel.styleSheet = ""
        self._setRunning(True)
        try:
            with slicer.util.tryWithErrorDisplay(_("Registration failed."), waitCursor=False):
                try:
                    out = self.logic.register(p.fixedVolume, p.movingVolume, **slicer_panel.register_keywords(p),
                                              progress=self._onProgress, cancel=lambda: self._cancelRequested)
                except Exception as exc:
                    if slicer_nodes.is_cancellation(exc):
                        self.ui.resultLabel.text = _("Cancelled: no output was created.")
                        return
                    raise
                # output selectors left on "Create new ...": the next run never overwrites these results
                self.ui.resultLabel.text, self.ui.resultLabel.styleSheet = slicer_panel.result_text(out)
                slicer.util.setSliceViewerLayers(background=p.fixedVolume, foreground=out.registered_volume_node or p.movingVolume,
                                                 foregroundOpacity=0.5, fit=True)
        finally:
            self.ui.statusLabel.text = ""
            self._setRunning(False)
            self.updateDeviceInfo()


#
# RigidResNetRegistrationLogic
#


class RigidResNetRegistrationLogic(ScriptedLoadableModuleLogic):
    """All the module's computation, usable from the Python console without the widget::

        logic = slicer.util.getModuleLogic("RigidResNetRegistration")  # or RigidResNetRegistrationLogic()
        out = logic.register(fixedVolumeNode, movingVolumeNode)  # out.transform_node, out.summary(), ...
        results = logic.registerMany([(fixed1, moving1), (fixed2, moving2)])  # model loaded once

    Uses ScriptedLoadableModuleLogic base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def getParameterNode(self):
        return RigidResNetRegistrationParameterNode(super().getParameterNode())

    def ensureDependencies(self, askConfirmation: bool = True) -> None:
        """Make torch importable, installing it after asking the user (RuntimeError when it is still not)."""
        slicer_install.ensure_torch(askConfirmation)

    def register(
        self, fixedVolume: vtkMRMLScalarVolumeNode, movingVolume: vtkMRMLScalarVolumeNode,
        device: str = DEFAULTS.device, mode: str = DEFAULTS.mode, model: Optional[str] = None, axis: str = DEFAULTS.axis,
        iterations: int = DEFAULTS.iterations, batchSize: int = DEFAULTS.batch_size, refine: bool = DEFAULTS.refine,
        symmetric: bool = DEFAULTS.symmetric, symmetricStride: int = DEFAULTS.symmetric_stride,
        refineSlices: bool = DEFAULTS.refine_slices, init: str = DEFAULTS.init,
        initialTransformNode: Optional[vtkMRMLLinearTransformNode] = None, transformNode: Optional[vtkMRMLLinearTransformNode] = None,
        registeredVolume: Union[bool, vtkMRMLScalarVolumeNode, None] = True, differenceVolume: Union[bool, vtkMRMLScalarVolumeNode, None] = True,
        sliceTable: Union[bool, vtkMRMLTableNode, None] = True, applyTransform: bool = True,
        progress: Optional[Callable[[float, str], None]] = None, cancel: Optional[Callable[[], bool]] = None, predictor=None,
    ) -> "slicer_nodes.RegistrationNodes":
        """Register ``movingVolume`` to ``fixedVolume`` (neither is modified).

        :param device, mode, axis, iterations, batchSize, refine, symmetric, symmetricStride, refineSlices, init:
            the engine's options as ``RigidResNetRegistrationLib.options.RegistrationOptions`` and the
            command line's ``--help`` describe them (``cuda`` without CUDA is an error, no fallback).
        :param model: a bundled model key (``rigid_resnet34``), a model card path or None (default); or ``predictor``, a loaded model.
        :param initialTransformNode: optional linear transform placing the moving volume first
            (modeling direction); the result includes it, as it includes the moving volume's parent.
        :param transformNode: linear transform node to write into; None creates one.
        :param registeredVolume: moving volume resampled on the fixed grid: a node to write into,
            True (create one) or False (not made). Same for ``differenceVolume`` (``|fixed -
            registered|``, both scaled to [0, 1]) and ``sliceTable``; ``applyTransform``: the moving
            volume observes the transform node. ``progress(fraction, message)``; ``cancel()``
            polled between batches, True stops the run and creates nothing.
        :return: ``slicer_nodes.RegistrationNodes``: the output nodes, the engine result (``.result``), ``.summary()``.
        :raises ValueError: bad inputs or options (the message names the volume or option and the problem).
        :raises RuntimeError: PyTorch missing, model or device problems; ``RegistrationCancelled``.
        """
        outputs = (registeredVolume, differenceVolume, sliceTable)
        slicer_nodes.check_inputs(fixedVolume, movingVolume, transformNode, *outputs)  # before any heavy import
        options, predictor = self._optionsAndModel(device, mode, model, axis, iterations, batchSize, refine, symmetric,
                                                   symmetricStride, refineSlices, init, progress, predictor)
        out = slicer_nodes.register_nodes(fixedVolume, movingVolume, predictor, options, transform_node=transformNode,
                                          registered_volume=registeredVolume, difference_volume=differenceVolume,
                                          slice_table=sliceTable, apply_transform=applyTransform, progress=progress,
                                          cancel=cancel, initial_transform_node=initialTransformNode)
        (logging.info if out.verdict == "ok" else logging.warning)(f"Rigid ResNet Registration: {out.summary()}")
        return out

    def registerMany(self, pairs: list, **settings) -> list:
        """Register each ``(fixedVolume, movingVolume)`` node pair of ``pairs`` with the model loaded
        once, as :meth:`register` does, with a new transform node (and new output nodes) for each.

        :param settings: keyword arguments of :meth:`register` for every pair (outputs True or False);
            ``progress`` runs over the whole list; ``cancel()`` True stops it (the pairs done keep their nodes).
        :return: one ``RigidResNetRegistrationLib.batch.PairResult`` per pair, in order: ``status``,
            ``error`` (a failed pair is recorded, never raised, and leaves no nodes), ``verdict``,
            ``similarity``, ``seconds``, ``output`` (the nodes, as from :meth:`register`).
        :raises ValueError: bad options (before any pair); TypeError: an unknown keyword; RuntimeError: as :meth:`register`.
        """
        for name in {"transformNode", "initialTransformNode"} & set(settings):
            raise ValueError(f"{name} is a node for one pair: registerMany makes a transform node for each pair")
        bound = inspect.signature(self.register).bind(None, None, **settings)  # register's keywords and defaults
        bound.apply_defaults()
        s = bound.arguments
        options, predictor = self._optionsAndModel(**{k: s[k] for k in inspect.signature(self._optionsAndModel).parameters})
        return slicer_nodes.register_node_pairs(list(pairs), predictor, options, s["registeredVolume"], s["differenceVolume"],
                                                s["sliceTable"], s["applyTransform"], s["progress"], s["cancel"])

    def _optionsAndModel(self, device, mode, model, axis, iterations, batchSize, refine, symmetric, symmetricStride,
                         refineSlices, init, progress, predictor) -> tuple:
        """The engine's options (checked before anything is imported) and the model (``predictor``, else loaded)."""
        options = RegistrationOptions(mode=mode, axis=axis, device=(device or "").lower(), batch_size=batchSize, iterations=iterations,
                                      refine=refine, symmetric=symmetric, symmetric_stride=symmetricStride, refine_slices=refineSlices, init=init)
        options.validate()  # torch-free: a bad choice is a ValueError before anything is installed or loaded
        return options, predictor if predictor is not None else slicer_install.load_predictor(model, device, progress)


#
# RigidResNetRegistrationTest
#


class RigidResNetRegistrationTest(SelfTestCases, ScriptedLoadableModuleTest):
    """Self-test: the bundled sample against a copy moved by a known motion (volume and slices mode),
    bad inputs, a cancelled run. The cases (``slicer_selftest.py``) run on slicer-core in pytest too."""

    logicClass = RigidResNetRegistrationLogic

    def setUp(self):
        """Reset the state: clear the scene."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run every case, each on a cleared scene."""
        self.runAll()
