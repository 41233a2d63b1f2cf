"""Rigid ResNet Registration: the 3D Slicer module (Module, parameter node, Widget, Logic, Test).

Thin on purpose: the registration is done by the ``RigidResNetRegistrationLib`` package
(``engine``, ``model``, ...), MRML nodes are converted by ``RigidResNetRegistrationLib.slicer_nodes``.
torch is imported only when a registration runs (``engine``/``model`` are imported inside
functions): opening Slicer or this module never imports or installs anything.
"""

import importlib
import importlib.util
import inspect
import logging
import os
from pathlib import Path
from typing import Annotated, Callable, Optional, Union

import qt
import vtk

import slicer
from slicer import vtkMRMLLinearTransformNode, vtkMRMLScalarVolumeNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from RigidResNetRegistrationLib import slicer_nodes  # no torch at import time
from RigidResNetRegistrationLib.options import (  # torch-free: every choice, default and range
    AXES, BATCH_SIZE_RANGE, DEFAULTS, DEVICES, INIT_MODES, ITERATIONS_RANGE, MODES, RegistrationOptions,
)

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
README_URL = "https://github.com/RigidResNetRegistration/RigidResNetRegistration#3d-slicer"
SAMPLE_FILE_NAME = "MNI152_2009a_T1.nii.gz"
SAMPLE_PATH = os.path.join(MODULE_DIR, "Resources", "SampleData", SAMPLE_FILE_NAME)
#: SHA256 of the bundled sample (Testing/test_module_static.py checks it against the file).
SAMPLE_SHA256 = "642c992cfbff943b93ab9fd5e2a0d738c54d5efcfc59a5ba45341e9fe27b21b5"
#: Requirements installed (after asking) when the PyTorch extension is absent.
TORCH_REQUIREMENTS = ["torch>=2.1"]  # the network is built without torchvision (RigidResNetRegistrationLib.resnet)


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
Fast rigid registration of brain MRI with a deep network: a ResNet-34 regressor predicts the
in-plane rigid motion of every slice pair (fixed, moving); the estimates are combined robustly into
one rigid transform (<b>volume</b> mode) or kept per slice (<b>slices</b> mode, motion during a scan).
Outputs: a linear transform that moves the moving volume onto the fixed volume (applied to the
moving volume if asked), the registered and difference volumes on the fixed volume's grid and a
table of per-slice parameters. Runs on the CPU or a CUDA GPU.
See the <a href="{url}">documentation</a>.
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

    iconsPath = os.path.join(MODULE_DIR, "Resources", "Icons")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="Rigid ResNet Registration",
        sampleName="RigidResNetRegistrationT1",
        thumbnailFileName=os.path.join(iconsPath, "RigidResNetRegistration.png"),
        uris=Path(SAMPLE_PATH).as_uri(),  # bundled with the module: no download
        fileNames=SAMPLE_FILE_NAME,
        checksums=f"SHA256:{SAMPLE_SHA256}",
        nodeNames="MNI152_T1",
    )


#
# RigidResNetRegistrationParameterNode
#

MODEL_KEYS = [card.key for card in slicer_nodes.list_model_cards()] or [slicer_nodes.DEFAULT_MODEL]
DEFAULT_MODEL_KEY = slicer_nodes.DEFAULT_MODEL if slicer_nodes.DEFAULT_MODEL in MODEL_KEYS else MODEL_KEYS[0]


@parameterNodeWrapper
class RigidResNetRegistrationParameterNode:
    """The module's parameters (saved with the scene).

    fixedVolume, movingVolume - the inputs (never modified).
    device - auto (CUDA when available), cpu or cuda.
    mode - volume (one rigid transform) or slices (one in-plane transform per slice).
    model - key of a bundled model card (Resources/Models/<key>.json).
    axis, iterations, batchSize, refine, symmetric, refineSlices - advanced engine options.
    init - where the registration starts (auto, header, centre, moments).
    initialTransform - optional linear transform placing the moving volume first (None: none).
    outputTransform - the output transform (None: created on Register).
    applyTransform - make the moving volume observe the output transform.
    createRegisteredVolume/registeredVolume, createDifferenceVolume/differenceVolume,
    createSliceTable/sliceTable - optional outputs (node None: created on Register).
    """

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
        if not self._parameterNode.fixedVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.fixedVolume = firstVolumeNode
        if not self._parameterNode.movingVolume:
            volumes = slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
            others = [v for v in volumes if v != self._parameterNode.fixedVolume and v.GetClassName() == "vtkMRMLScalarVolumeNode"]
            if others:
                self._parameterNode.movingVolume = others[0]

    def setParameterNode(self, inputParameterNode: Optional[RigidResNetRegistrationParameterNode]) -> None:
        """Set and observe parameter node.
        Observation is needed because when the parameter node is changed then the GUI must be updated immediately.
        """
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Note: in the .ui file, a Qt dynamic property called "SlicerParameterName" is set on each
            # ui element that needs connection.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self._checkCanApply()
        self._updateModelInfo()
        p = self._parameterNode
        if p:
            self.ui.registeredVolumeSelector.enabled = p.createRegisteredVolume
            self.ui.differenceVolumeSelector.enabled = p.createDifferenceVolume
            self.ui.sliceTableSelector.enabled = p.createSliceTable
            # each refinement belongs to one mode: the 6-DOF one to volume mode, the per-slice one to slices mode
            self.ui.refineCheckBox.enabled = p.mode == "volume"
            self.ui.refineSlicesCheckBox.enabled = p.mode == "slices"

    def _checkCanApply(self, caller=None, event=None) -> None:
        """Register is enabled only when the inputs are valid (and is Cancel while running)."""
        if self._running:
            return
        p = self._parameterNode
        problem = None
        if not p or not p.fixedVolume:
            problem = _("Select the fixed volume")
        elif not p.movingVolume:
            problem = _("Select the moving volume")
        elif p.fixedVolume == p.movingVolume:
            problem = _("Fixed and moving volumes must be different")
        else:
            try:
                slicer_nodes.check_inputs(p.fixedVolume, p.movingVolume, p.outputTransform, *self._outputChoices())
            except ValueError as exc:
                problem = str(exc)
        self.ui.applyButton.enabled = problem is None
        self.ui.applyButton.toolTip = problem or _("Register the moving volume to the fixed volume")

    def _outputChoices(self) -> tuple:
        """Registered, difference and table outputs as Logic arguments: node, True (create) or False."""
        p = self._parameterNode
        return (
            (p.registeredVolume or True) if p.createRegisteredVolume else False,
            (p.differenceVolume or True) if p.createDifferenceVolume else False,
            (p.sliceTable or True) if p.createSliceTable else False,
        )

    def _updateModelInfo(self) -> None:
        p = self._parameterNode
        cards = {card.key: card for card in slicer_nodes.list_model_cards()}
        card = cards.get(p.model) if p else None
        self.ui.modelInfoLabel.text = card.label if card else ""
        self.ui.modelInfoLabel.toolTip = card.notes if card else ""

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
                registered, difference, table = self._outputChoices()
                try:
                    out = self.logic.register(
                        p.fixedVolume,
                        p.movingVolume,
                        device=p.device,
                        mode=p.mode,
                        model=p.model,
                        axis=p.axis,
                        iterations=p.iterations,
                        refine=p.refine,
                        symmetric=p.symmetric,
                        refineSlices=p.refineSlices,
                        batchSize=p.batchSize,
                        init=p.init,
                        initialTransformNode=p.initialTransform,
                        transformNode=p.outputTransform,
                        registeredVolume=registered,
                        differenceVolume=difference,
                        sliceTable=table,
                        applyTransform=p.applyTransform,
                        progress=self._onProgress,
                        cancel=lambda: self._cancelRequested,
                    )
                except Exception as exc:
                    if slicer_nodes.is_cancellation(exc):
                        self.ui.resultLabel.text = _("Cancelled: no output was created.")
                        return
                    raise
                self._showResult(out)
        finally:
            self.ui.statusLabel.text = ""
            self._setRunning(False)
            self.updateDeviceInfo()

    def _showResult(self, out: "slicer_nodes.RegistrationNodes") -> None:
        """Result line, names of the output nodes, and fixed + registered shown in the slice views.

        The output selectors are left as they were: with "Create new ..." selected, every run
        makes new nodes, so registering another pair never overwrites (or moves) earlier results.
        """
        p = self._parameterNode
        made = [node.GetName() for node in (out.transform_node, out.registered_volume_node, out.difference_volume_node,
                                            out.table_node) if node is not None]
        self.ui.resultLabel.text = out.summary() + "\n" + _("Outputs: {names}").format(names=", ".join(made))
        self.ui.resultLabel.styleSheet = slicer_nodes.VERDICT_STYLE[out.verdict]
        foreground = out.registered_volume_node or p.movingVolume
        slicer.util.setSliceViewerLayers(background=p.fixedVolume, foreground=foreground, foregroundOpacity=0.5, fit=True)


#
# RigidResNetRegistrationLogic
#


class RigidResNetRegistrationLogic(ScriptedLoadableModuleLogic):
    """All the module's computation, usable from the Python console without the widget::

        logic = slicer.util.getModuleLogic("RigidResNetRegistration")  # or RigidResNetRegistrationLogic()
        out = logic.register(fixedVolumeNode, movingVolumeNode, device="auto", mode="volume")
        out.transform_node, out.registered_volume_node, out.difference_volume_node, out.table_node
        print(out.summary())
        results = logic.registerMany([(fixed1, moving1), (fixed2, moving2)])  # model loaded once
        [(r.name, r.status, r.error) for r in results]; results[0].output.transform_node

    Uses ScriptedLoadableModuleLogic base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return RigidResNetRegistrationParameterNode(super().getParameterNode())

    @staticmethod
    def torchImportable() -> bool:
        """torch can be imported (checked without importing it)."""
        return importlib.util.find_spec("torch") is not None

    def ensureDependencies(self, askConfirmation: bool = True) -> None:
        """Make torch importable, installing it after asking the user.

        Uses the PyTorch extension (``PyTorchUtils``, picks the right CUDA build) when it is
        installed, else ``slicer.packaging.pip_ensure`` (Slicer 5.11+, asks itself), else
        ``slicer.util.pip_install`` after ``slicer.util.confirmOkCancelDisplay``.
        Raises ``RuntimeError`` when PyTorch is still not available.
        """
        if self.torchImportable():
            return
        try:
            import PyTorchUtils
        except ImportError:
            PyTorchUtils = None
        if PyTorchUtils is not None:
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=askConfirmation)
            if torch is None:
                raise RuntimeError(_("PyTorch is needed to register; it was not installed."))
        else:
            try:
                from slicer import packaging

                pipEnsure = packaging.pip_ensure
            except (ImportError, AttributeError):
                pipEnsure = None
            if pipEnsure is not None:
                pipEnsure(TORCH_REQUIREMENTS, requester="Rigid ResNet Registration")
            else:
                question = _(
                    "Rigid ResNet Registration needs PyTorch ({packages}), which is not installed. "
                    "Download and install it now (about 1-3 GB, some minutes)? "
                    "Installing the PyTorch extension instead selects the right GPU build."
                ).format(packages=", ".join(TORCH_REQUIREMENTS))
                if askConfirmation and not slicer.util.confirmOkCancelDisplay(question):
                    raise RuntimeError(_("PyTorch is needed to register; installation was declined."))
                slicer.util.pip_install(" ".join(TORCH_REQUIREMENTS))
        importlib.invalidate_caches()
        if not self.torchImportable():
            raise RuntimeError(_("PyTorch is needed to register but could not be installed."))

    def register(
        self,
        fixedVolume: vtkMRMLScalarVolumeNode,
        movingVolume: vtkMRMLScalarVolumeNode,
        device: str = DEFAULTS.device,
        mode: str = DEFAULTS.mode,
        model: Optional[str] = None,
        axis: str = DEFAULTS.axis,
        iterations: int = DEFAULTS.iterations,
        batchSize: int = DEFAULTS.batch_size,
        refine: bool = DEFAULTS.refine,
        symmetric: bool = DEFAULTS.symmetric,
        symmetricStride: int = DEFAULTS.symmetric_stride,
        refineSlices: bool = DEFAULTS.refine_slices,
        init: str = DEFAULTS.init,
        initialTransformNode: Optional[vtkMRMLLinearTransformNode] = None,
        transformNode: Optional[vtkMRMLLinearTransformNode] = None,
        registeredVolume: Union[bool, vtkMRMLScalarVolumeNode, None] = True,
        differenceVolume: Union[bool, vtkMRMLScalarVolumeNode, None] = True,
        sliceTable: Union[bool, vtkMRMLTableNode, None] = True,
        applyTransform: bool = True,
        progress: Optional[Callable[[float, str], None]] = None,
        cancel: Optional[Callable[[], bool]] = None,
        predictor=None,
    ) -> "slicer_nodes.RegistrationNodes":
        """Register ``movingVolume`` to ``fixedVolume`` (neither is modified).

        :param device: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda`` (an error
            when CUDA is not available: never a silent fallback).
        :param mode: ``volume`` (one rigid transform) or ``slices`` (one in-plane transform per
            slice; the transform node then holds the robust volume-level estimate).
        :param model: a bundled model key (``rigid_resnet34``), a model card path, or None (default).
        :param axis: slice axis: ``auto`` (closest to S), ``axial``, ``coronal`` or ``sagittal``.
        :param iterations: at most this many predict / re-warp / predict passes (1-20); they stop
            once a pass corrects less than 0.2 deg and 0.2 mm.
        :param batchSize: slices per network batch (lower it if memory is short).
        :param refine: ``volume`` mode: refine the network's transform on image similarity over all
            six rigid parameters (NCC for same-contrast pairs, MI otherwise): a full 3D rigid result.
        :param symmetric: predict every slice pair in both orders and combine the two estimates
            inverse-consistently (default; cancels the network's order-independent errors at twice
            the network work); False: one order only.
        :param symmetricStride: ``slices`` mode with ``symmetric``: predict every n-th slice in both
            orders and the others in one order, corrected by the order-independent error
            interpolated between them (default 3; 1: every slice in both orders, 13-35% more time).
        :param refineSlices: ``slices`` mode: also refine each slice's in-plane transform on its own
            image similarity (NCC or MI, as ``refine``; off by default: about 5-10 ms more per slice).
        :param init: where the registration starts: ``auto`` (the positions when the volumes
            overlap well, otherwise centres of mass and principal axes; ``volume`` mode also searches
            rotations of up to 30 degrees about every axis), ``header``, ``centre`` or ``moments``.
            The moving volume's parent transform is part of its position.
        :param initialTransformNode: optional linear transform placing the moving volume first
            (modeling direction, as if the moving volume were under it); the result includes it.
        :param transformNode: linear transform node to write into; None creates one.
        :param registeredVolume: moving volume resampled on the fixed grid: a node to write into,
            True (create one) or False (not computed). Same for ``differenceVolume``
            (``|fixed - registered|``, both scaled to [0, 1]) and ``sliceTable`` (table node).
        :param applyTransform: make the moving volume observe the transform node.
        :param progress: ``progress(fraction, message)`` called as work proceeds.
        :param cancel: polled between batches; returning True stops the run and creates nothing.
        :param predictor: a loaded model to use instead of ``model`` (testing, batch scripts).
        :return: :class:`RigidResNetRegistrationLib.slicer_nodes.RegistrationNodes` with the
            output nodes, the engine result (``.result``), ``.summary()``, device and seconds.
        :raises ValueError: bad inputs (message names the volume and the problem).
        :raises RuntimeError: PyTorch missing, model or device problems; the engine's
            ``RegistrationCancelled`` when cancelled.
        """
        outputs = (registeredVolume, differenceVolume, sliceTable)
        slicer_nodes.check_inputs(fixedVolume, movingVolume, transformNode, *outputs)  # before any heavy import
        options, predictor = self._optionsAndModel(device, mode, model, axis, iterations, batchSize, refine, symmetric,
                                                   symmetricStride, refineSlices, init, progress, predictor)
        out = slicer_nodes.register_nodes(
            fixedVolume,
            movingVolume,
            predictor,
            options,
            transform_node=transformNode,
            registered_volume=registeredVolume,
            difference_volume=differenceVolume,
            slice_table=sliceTable,
            apply_transform=applyTransform,
            progress=progress,
            cancel=cancel,
            initial_transform_node=initialTransformNode,
        )
        (logging.info if out.verdict == "ok" else logging.warning)(f"Rigid ResNet Registration: {out.summary()}")
        return out

    def registerMany(self, pairs: list, **settings) -> list:
        """Register each ``(fixedVolume, movingVolume)`` node pair of ``pairs`` with the model loaded
        once, as :meth:`register` does, with a new transform node (and new output nodes) for each.

        :param settings: keyword arguments of :meth:`register`, with its defaults, for every pair:
            ``device``, ``mode``, ``model``, ``axis``, ``iterations``, ``batchSize``, ``refine``,
            ``symmetric``, ``symmetricStride``, ``refineSlices``, ``init``, ``applyTransform``,
            ``predictor``; ``registeredVolume``, ``differenceVolume`` and ``sliceTable`` True (a new
            node for each pair) or False; ``progress(fraction, message)`` runs over the whole list;
            ``cancel()`` returning True stops it (``RegistrationCancelled``; the pairs done keep
            their nodes).
        :return: one ``RigidResNetRegistrationLib.batch.PairResult`` per pair, in order: ``status``
            (``ok`` or ``failed``), ``error`` (a failed pair's one-line message: a failed pair is
            recorded, never raised, and leaves no nodes), ``verdict``, ``similarity``, ``seconds``,
            and ``output``, the pair's nodes as :meth:`register` returns them.
        :raises ValueError: bad options (before any pair); TypeError: an unknown keyword.
        :raises RuntimeError: PyTorch missing, model or device problems.
        """
        for name in ("transformNode", "initialTransformNode"):
            if name in settings:
                raise ValueError(f"{name} is a node for one pair: registerMany makes a transform node for each pair")
        bound = inspect.signature(self.register).bind(None, None, **settings)  # register's keywords and defaults
        bound.apply_defaults()
        s = bound.arguments
        options, predictor = self._optionsAndModel(**{k: s[k] for k in inspect.signature(self._optionsAndModel).parameters})
        results = slicer_nodes.register_node_pairs(list(pairs), predictor, options, s["registeredVolume"], s["differenceVolume"],
                                                   s["sliceTable"], s["applyTransform"], s["progress"], s["cancel"])
        failed = [r.name for r in results if r.status != "ok"]
        (logging.warning if failed else logging.info)(
            f"Rigid ResNet Registration: {len(results) - len(failed)} of {len(results)} pairs registered"
            + (f"; failed: {', '.join(failed)}" if failed else ""))
        return results

    def _optionsAndModel(self, device, mode, model, axis, iterations, batchSize, refine, symmetric, symmetricStride,
                         refineSlices, init, progress, predictor) -> tuple:
        """The engine's options and the loaded model (``predictor`` when given) for :meth:`register`
        and :meth:`registerMany`; the choices are checked before anything is imported."""
        options = RegistrationOptions(mode=mode, axis=axis, device=(device or "").lower(), batch_size=batchSize,
                                      iterations=iterations, refine=refine, symmetric=symmetric,
                                      symmetric_stride=symmetricStride, refine_slices=refineSlices, init=init)
        options.validate()  # torch-free: a bad choice is a ValueError before anything is installed or loaded
        cardPath = slicer_nodes.model_card_path(model) if predictor is None else None
        self.ensureDependencies()
        from RigidResNetRegistrationLib.model import load_model

        if predictor is None:
            if progress:
                progress(0.0, _("loading the model"))
            predictor = load_model(cardPath, device)
        return options, predictor


#
# RigidResNetRegistrationTest
#


class RigidResNetRegistrationTest(ScriptedLoadableModuleTest):
    """Self-test: registers the bundled sample against a copy moved by a known motion.

    With an untrained bundled model (the card says ``"trained": false``) the network predicts the
    identity, so only geometry and plumbing are checked (and the log says so).
    """

    def setUp(self):
        """Reset the state: clear the scene."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run as few or as many tests as needed here."""
        self.setUp()
        self.test_RegisterSampleWithKnownMotion()
        self.setUp()
        self.test_SlicesModeWithRefinement()
        self.setUp()
        self.test_BadInputsAndCancel()

    def _requireTorch(self, logic) -> None:
        """PyTorch must be importable; in an automated (--testing) run nothing is installed."""
        if not logic.torchImportable() and slicer.app.testingEnabled():
            self.fail("PyTorch is not installed in this Slicer's Python: install the PyTorch extension "
                      "(or register once interactively, which offers to install it)")
        logic.ensureDependencies()

    def _sampleWithKnownMotion(self):
        from RigidResNetRegistrationLib import sample

        fixedNode = slicer.util.loadVolume(SAMPLE_PATH, {"name": "MNI152_T1", "show": False})
        fixed = slicer_nodes.volume_from_node(fixedNode, "fixed volume")
        moving, truth = sample.apply_known_motion(fixed)
        movingNode = slicer_nodes.add_volume_node(
            slicer.mrmlScene, moving.array, moving.ijk_to_ras, "MNI152_T1 with known motion")
        return fixedNode, movingNode, truth

    def test_RegisterSampleWithKnownMotion(self):
        import numpy as np

        self.delayDisplay("Registering the bundled sample against a copy with a known motion")
        logic = RigidResNetRegistrationLogic()
        self._requireTorch(logic)
        from RigidResNetRegistrationLib import geometry

        fixedNode, movingNode, truth = self._sampleWithKnownMotion()
        fixedBefore = slicer.util.arrayFromVolume(fixedNode).copy()
        movingBefore = slicer.util.arrayFromVolume(movingNode).copy()
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()

        out = logic.register(fixedNode, movingNode, device="auto", mode="volume")
        logging.info(f"self-test: {out.summary()}")

        # geometry and plumbing (whatever the model)
        toParent = slicer.util.arrayFromTransformMatrix(out.transform_node)
        self.assertTrue(np.allclose(toParent, out.moving_to_fixed_world, atol=1e-6))
        self.assertEqual(movingNode.GetParentTransformNode(), out.transform_node)
        self.assertEqual(out.transform_node.GetNodeReference(out.transform_node.GetFixedNodeReferenceRole()), fixedNode)
        self.assertEqual(out.transform_node.GetNodeReference(out.transform_node.GetMovingNodeReferenceRole()), movingNode)
        for node in (out.registered_volume_node, out.difference_volume_node):
            self.assertEqual(node.GetImageData().GetDimensions(), fixedNode.GetImageData().GetDimensions())
            self.assertTrue(np.allclose(slicer_nodes.ijk_to_ras_of(node), slicer_nodes.ijk_to_ras_of(fixedNode)))
        self.assertEqual(out.table_node.GetNumberOfRows(), len(out.result.used))
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(fixedNode), fixedBefore))
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(movingNode), movingBefore))
        self.assertGreater(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)

        # accuracy against the known motion
        centre = out.result.frame.centre
        rot, trans = geometry.rigid_error(out.moving_to_fixed_world, geometry.invert(truth), centre)
        rot0, trans0 = geometry.rigid_error(np.eye(4), geometry.invert(truth), centre)
        self.delayDisplay(f"error {rot:.2f} deg, {trans:.2f} mm (motion {rot0:.2f} deg, {trans0:.2f} mm)")
        if out.model_trained:
            self.assertLess(rot, 1.5)
            self.assertLess(trans, 1.5)
            self.assertLess(rot + trans, 0.5 * (rot0 + trans0))
            s = out.similarity
            self.assertGreater(s["ncc_after"], s["ncc_before"])
            # the difference volume shrank: compare with |fixed - moving| scaled the same way
            before = self._scaledDifference(fixedNode, movingNode)
            after = float(np.mean(slicer.util.arrayFromVolume(out.difference_volume_node)))
            self.assertLess(after, before)
        else:
            logging.warning(
                "self-test: the bundled model is an UNTRAINED placeholder (it predicts the identity): "
                "only geometry and plumbing were checked, not accuracy against the known motion"
            )
            self.assertTrue(np.allclose(out.moving_to_fixed_world, np.eye(4), atol=1e-6))
        self.delayDisplay("Test passed")

    @staticmethod
    def _scaledDifference(fixedNode, movingNode) -> float:
        import numpy as np

        def scaled(a):
            lo, hi = np.percentile(a, [1, 99])
            return np.clip((a - lo) / (hi - lo if hi > lo else 1.0), 0, 1)

        f = slicer.util.arrayFromVolume(fixedNode).astype(np.float64)
        m = slicer.util.arrayFromVolume(movingNode).astype(np.float64)
        return float(np.mean(np.abs(scaled(f) - scaled(m))))

    def test_SlicesModeWithRefinement(self):
        import numpy as np

        self.delayDisplay("Slices mode with the per-slice refinement")
        logic = RigidResNetRegistrationLogic()
        self._requireTorch(logic)
        from RigidResNetRegistrationLib import geometry

        fixedNode, movingNode, truth = self._sampleWithKnownMotion()
        out = logic.register(fixedNode, movingNode, device="auto", mode="slices", refineSlices=True,
                             registeredVolume=False, differenceVolume=False, applyTransform=False)
        logging.info(f"self-test (slices): {out.summary()}")
        table = out.table_node.GetTable()
        self.assertEqual(table.GetNumberOfRows(), len(out.result.used))
        self.assertEqual(out.result.refinement["scope"], "slices")
        used = out.result.used
        motion = geometry.ras_to_params(truth, out.result.frame)  # the same in-plane motion on every slice
        rot, trans = geometry.params_error_2d(out.result.slice_params[used], np.tile(motion, (int(used.sum()), 1)))
        self.delayDisplay(f"per-slice error, median {np.median(rot):.3f} deg / {np.median(trans):.3f} mm")
        if out.model_trained:
            self.assertLess(float(np.median(rot)), 0.1)
            self.assertLess(float(np.median(trans)), 0.1)
        self.delayDisplay("Test passed")

    def test_BadInputsAndCancel(self):
        self.delayDisplay("Bad inputs and cancel")
        logic = RigidResNetRegistrationLogic()
        self._requireTorch(logic)
        fixedNode, movingNode, _truth = self._sampleWithKnownMotion()
        with self.assertRaises(ValueError):
            logic.register(None, movingNode)
        with self.assertRaises(ValueError):
            logic.register(fixedNode, fixedNode)
        with self.assertRaises(ValueError):
            logic.register(fixedNode, movingNode, registeredVolume=fixedNode)
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(RuntimeError) as caught:
            logic.register(fixedNode, movingNode, cancel=lambda: True)
        self.assertTrue(slicer_nodes.is_cancellation(caught.exception))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.assertIsNone(movingNode.GetParentTransformNode())
        self.delayDisplay("Test passed")
