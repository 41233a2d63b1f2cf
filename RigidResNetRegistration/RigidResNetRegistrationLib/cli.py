"""Command line: ``rigid-resnet-register FIXED MOVING -o OUTDIR``, ``rigid-resnet-register --batch
PAIRS.csv -o OUTROOT`` (many pairs in one process, or shared among torchrun's processes) and
``rigid-resnet-register --demo``.

Every failure ends with one line ``error: ...`` on stderr and a non-zero exit code, never a
traceback (set ``RIGID_RESNET_DEBUG=1`` to see one).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from . import __version__
from .options import AXES, DEVICES, INIT_MODES, METRICS, MODES, PRECISIONS, RegistrationOptions, option_conflicts
from .options import DEFAULTS as D  # torch-free: the choices and defaults every front door shares

#: The registration options the command line sets (its argparse destinations are the field names).
CLI_OPTION_FIELDS = ("mode", "axis", "device", "batch_size", "iterations", "tolerance", "max_slices", "precision",
                     "symmetric", "symmetric_stride", "refine", "refine_slices", "metric", "init")
#: How the command line spells the options in :func:`options.option_conflicts`' messages.
CLI_OPTION_NAMES = {"refine": "--no-refine", "mode=slices": "--mode slices", "refine_slices": "--refine-slices",
                    "metric": "--metric", "symmetric_stride": "--symmetric-stride", "symmetric": "--no-symmetric",
                    "tolerance": "--tolerance", "iterations": "--iterations"}

if TYPE_CHECKING:  # pragma: no cover
    import concurrent.futures

    import numpy as np

    from .batch import PairResult, PairRow
    from .engine import RegistrationResult
    from .model_card import ModelCard
    from .volume import Volume

EXIT_PAIRS_FAILED = 1  # --batch: the cohort ran, some pairs failed (summary.csv says which and why)
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A failure to report as ``error: <message>``."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rigid-resnet-register",
        description="Rigid registration of brain MRI with a slice-wise ResNet-34 regressor. "
        "Registers MOVING to FIXED and writes registered.nii.gz, difference.nii.gz (or --output-format), transform.tfm "
        "(ITK, LPS, fixed->moving points), slices.csv, report.json and overview.png to OUTDIR.",
    )
    p.add_argument("fixed", nargs="?", help="fixed image: NIfTI, NRRD or MetaImage volume, DICOM series folder, or a 2D "
                   "image (PNG, JPEG, TIFF, BMP, single-slice NIfTI)")
    p.add_argument("moving", nargs="?", help="moving image, same kinds")
    p.add_argument("-o", "--output", metavar="OUTDIR", help="output folder (created if needed)")
    p.add_argument("--device", default=D.device, choices=list(DEVICES), help="where to run (auto: CUDA if available)")
    p.add_argument("--mode", default=D.mode, choices=list(MODES),
                   help="volume: one rigid transform for the volume (default); slices: one per slice (motion within a scan)")
    p.add_argument("--axis", default=D.axis, choices=list(AXES),
                   help="slice orientation (auto: the voxel axis closest to anatomical S)")
    p.add_argument("--weights", metavar="PATH", help="model card (.json) or weights (.pt with a .json card beside it); default: bundled")
    p.add_argument("--batch-size", type=int, default=D.batch_size, metavar="N", help="slices per network batch (default 32)")
    p.add_argument("--iterations", type=int, default=D.iterations, metavar="N",
                   help="at most N passes of predict, re-warp the moving slices, predict again and compose; "
                   "stops once a pass corrects less than --tolerance (default 6)")
    p.add_argument("--tolerance", type=float, default=D.tolerance, metavar="DEG_MM",
                   help="stop the passes once one corrects less than this many degrees and mm (default 0.2; 0: make all N)")
    p.add_argument("--max-slices", type=int, default=D.max_slices, metavar="N",
                   help="volume mode: register N informative slices spread over the brain (0: all; default 8); "
                        "slices mode: find the common motion every slice starts from on N slices")
    p.add_argument("--no-refine", dest="refine", action="store_false",
                   help="volume mode: keep the network's in-plane transform; by default it is refined on image "
                   "similarity over all six rigid parameters (3D rotations and translations)")
    p.add_argument("--refine-slices", action="store_true",
                   help="slices mode: also refine each slice's in-plane transform on its own image similarity "
                   "(classical-grade per-slice accuracy for about 5 ms (NCC) or 10 ms (MI) more per slice on a CPU)")
    p.add_argument("--metric", default=D.metric, choices=list(METRICS),
                   help="similarity the refinement maximises (auto: NCC for same-contrast pairs, MI otherwise)")
    p.add_argument("--init", default=D.init, choices=list(INIT_MODES),
                   help="where the registration starts: header (trust both headers), centre (align the foregrounds' "
                   "centres of mass), moments (centres and principal axes), auto (the headers when the foregrounds overlap "
                   "well under them, otherwise moments; volume mode also searches rotations of up to 30 degrees about "
                   "every axis); default auto")
    p.add_argument("--initial-transform", metavar="FILE.tfm",
                   help="place the moving image by this ITK transform first (LPS, fixed->moving points, as transform.tfm "
                   "is written); --init then works from there and the result includes it")
    p.add_argument("--precision", default=D.precision, choices=list(PRECISIONS),
                   help="network arithmetic (auto: bf16 where the device computes it natively, else fp32)")
    p.add_argument("--no-symmetric", dest="symmetric", action="store_false",
                   help="predict each slice pair in one order only (half the network work, less accurate); by "
                   "default it is also predicted swapped and the two estimates are combined inverse-consistently")
    p.add_argument("--symmetric-stride", type=int, default=D.symmetric_stride, metavar="N",
                   help="slices mode: predict every N-th slice (and the last) in both orders and the others in one "
                   "order, corrected by the order-independent error interpolated between them (default 3; "
                   "1: every slice in both orders, the most accurate, with 13-35%% more time)")
    p.add_argument("--output-format", default="nifti", choices=["nifti", "nrrd", "mha", "input"],
                   help="format of the registered and difference volumes: nifti (.nii.gz, default), nrrd, mha, or "
                   "input: the fixed image's own (NRRD, MetaImage or NIfTI; NIfTI for DICOM and 2D images)")
    p.add_argument("--no-overview", action="store_true", help="do not draw overview.png")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--profile", action="store_true",
                   help="print how long each stage took (imports, reading, model, the engine's stages, writing)")
    p.add_argument("--demo", action="store_true",
                   help="register the embedded sample against a copy moved by a known motion and print the error")
    p.add_argument("--batch", metavar="PAIRS.csv",
                   help="register every pair of PAIRS.csv (columns fixed, moving; optional name and per-pair options "
                   "mode, axis, init, metric, refine, iterations, max_slices, initial_transform) in one process, each "
                   "into OUTDIR/NAME/, with OUTDIR/summary.csv; pairs whose outputs are complete are skipped; under "
                   "torchrun the processes share the pairs")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


_UNSET = object()


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, plus ``args.given``: the destinations of the options the command
    line set (to a default value or not), so that a contradiction is found whatever the values."""
    args = parser.parse_args(argv, argparse.Namespace(
        **{a.dest: _UNSET for a in parser._actions if argparse.SUPPRESS not in (a.dest, a.default)}))
    args.given = {dest for dest, value in vars(args).items() if value is not _UNSET and value is not None}
    for action in parser._actions:
        if getattr(args, action.dest, None) is _UNSET:
            setattr(args, action.dest, action.default)
    return args


def _given(args: argparse.Namespace) -> set[str]:
    """The options the command line gave (:func:`parse_args`); for a namespace made otherwise, those
    that differ from their defaults."""
    given = getattr(args, "given", None)
    if given is None:
        given = {a.dest for a in build_parser()._actions if getattr(args, a.dest, a.default) != a.default}
    return given


def check_option_conflicts(args: argparse.Namespace) -> None:
    """One line for every contradiction between options (an option that the others make pointless),
    before any work. Rules about the registration options themselves (any front door) are in
    ``RegistrationOptions.validate``; these are the command line's own."""
    given = _given(args)
    if args.demo and (args.fixed or args.moving):
        raise CliError("--demo registers the embedded sample: give FIXED and MOVING or --demo, not both")
    if args.batch and (args.fixed or args.moving):
        raise CliError("--batch reads the pairs from PAIRS.csv: give FIXED and MOVING or --batch, not both")
    if args.batch and args.demo:
        raise CliError("--demo registers the embedded sample: give --demo or --batch, not both")
    if args.profile and args.batch:
        raise CliError("--profile prints one run's stages; with --batch each pair's report.json holds them "
                       "(command_timings_s, timings_s)")
    # the rules about registration options given in vain: options.option_conflicts, in the CLI's words
    conflict = option_conflicts(_options_of(args), given, CLI_OPTION_NAMES)
    if conflict:
        raise CliError(conflict)


def check_model_conflicts(args: argparse.Namespace, transform: str) -> None:
    """The refinement options contradict a model that is not rigid (the refinements are rigid)."""
    refinement = [o for o, on in (("--refine-slices", args.refine_slices), ("--metric", "metric" in _given(args))) if on]
    if transform != "rigid" and refinement:
        raise CliError(f"{refinement[0]} is for rigid models; the model of --weights is {transform} (it is not refined)")


def resolve_card(weights: str | None) -> Path | None:
    """``--weights`` -> model card path (None: the bundled default)."""
    if weights is None:
        return None
    p = Path(weights)
    if p.suffix.lower() == ".json":
        return p
    card = p.with_suffix(".json")
    if not card.exists():
        raise CliError(f"no model card {card.name} beside weights file {p} (a card names the input grid and sha256)")
    return card


def prepare_output(outdir: str | None) -> Path:
    """Check ``-o OUTDIR`` without touching it: it is created only when a run's outputs are written
    (:func:`io.staged_outputs`), so a run that fails leaves no folder behind."""
    if not outdir:
        raise CliError("an output folder is needed: -o OUTDIR")
    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise CliError(f"output path exists and is not a folder: {out}")
    existing = out
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CliError(f"cannot create output folder {out} ({existing} is not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CliError(f"output folder is not writable: {out}" if existing == out
                       else f"cannot create output folder {out} ({existing} is not writable)")
    return out


#: Every file name a run may write into OUTDIR (volumes with the ``--output-format`` suffix; the
#: demo adds :data:`DEMO_OUTPUT_NAMES`).
OUTPUT_NAMES = ("registered{ext}", "difference{ext}", "transform.tfm", "slices.csv", "report.json", "overview.png",
                "registered.png", "difference.png")
DEMO_OUTPUT_NAMES = ("fixed{ext}", "moving{ext}")
#: Outputs written for 2D inputs only.
TWO_D_OUTPUT_NAMES = ("registered.png", "difference.png")


def output_names(args: argparse.Namespace) -> list[str]:
    """The names this run's outputs may take in OUTDIR."""
    from .io import output_suffix

    ext = output_suffix(args.output_format, None if args.demo else args.fixed)
    names = [n for n in OUTPUT_NAMES if not (args.no_overview and n == "overview.png")]
    return [n.format(ext=ext) for n in (names + list(DEMO_OUTPUT_NAMES) if args.demo else names)]


def input_files(args: argparse.Namespace, card_path: Path | None) -> list[tuple[str, Path]]:
    """(role, path) of every file the run reads: FIXED, MOVING, the initial transform, the model card
    and its weights (and its fine stage's)."""
    from .model_card import ModelError, read_model_card, weights_path

    files = [(f"{role} image", Path(path)) for role, path in (("fixed", args.fixed), ("moving", args.moving))
             if path and not args.demo]
    if args.initial_transform:
        files.append(("initial transform", Path(args.initial_transform)))
    if card_path is not None:
        files.append(("model card", card_path))
        with contextlib.suppress(ModelError):  # a broken card is reported when it is loaded
            card = read_model_card(card_path)
            for fine, role in ((False, "weights file"), (True, "fine stage weights file")):
                weights = weights_path(card, fine)
                if weights is not None:
                    files.append((role, weights))
    return files


def check_inputs_are_not_outputs(args: argparse.Namespace, out: Path, card_path: Path | None) -> None:
    """Refuse, before any work, a run whose outputs would replace one of its inputs: an input that
    is (by path, symbolic link or hard link) a file an output name takes in OUTDIR, or such a name
    held by a folder (which the outputs could not replace)."""
    inputs = [(role, path) for role, path in input_files(args, card_path) if path.exists()]
    for name in output_names(args):
        target = out / name
        if not target.exists():
            continue
        if target.is_dir():
            raise CliError(f"{target} is a folder: the output {name} cannot be written; choose another output folder")
        for role, path in inputs:
            if os.path.samefile(path, target):
                raise CliError(f"the {role} {path} would be overwritten by the output {name} in {out}; "
                               "choose another output folder")


def check_single_process() -> None:
    """One pair under torchrun would be registered by every process into the same OUTDIR."""
    from .distributed import distributed_from_env

    size = distributed_from_env().world_size
    if size > 1:
        raise CliError(f"{size} processes (WORLD_SIZE) would all register the same pair: under torchrun use --batch PAIRS.csv")


class _Progress:
    """tqdm progress bar on a terminal; silent otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=100, unit="%", file=sys.stderr, leave=False, bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}]")

    def __call__(self, fraction: float, message: str) -> None:
        if self.bar is not None:
            self.bar.set_description(message)
            self.bar.n = round(100 * fraction)
            self.bar.refresh()

    def write(self, line: str) -> None:
        """Print a line on stdout without breaking the bar."""
        if self.bar is not None:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _options_of(args: argparse.Namespace) -> RegistrationOptions:
    """The registration options the command line set (:data:`CLI_OPTION_FIELDS`), unchecked."""
    return RegistrationOptions(**{name: getattr(args, name) for name in CLI_OPTION_FIELDS})


def registration_options(args: argparse.Namespace) -> RegistrationOptions:
    """The engine's options from the command line's (reads ``--initial-transform``), checked."""
    options = _options_of(args)
    if args.initial_transform:
        from .io import read_tfm

        if not Path(args.initial_transform).is_file():
            raise CliError(f"initial transform file not found: {args.initial_transform}")
        options.initial_transform = read_tfm(args.initial_transform)
    options.validate()
    return options


def read_in_background(fixed: str, moving: str) -> concurrent.futures.Future[tuple[Volume, Volume]]:
    """Start reading the FIXED and MOVING files (as ``--batch`` reads a pair: :func:`batch.read_pair`,
    which needs no torch) in a thread, so that they are read while the main thread imports torch
    (1.2 s, one CPU core); ``result()`` gives ``(fixed, moving)`` or raises the first one's reading error."""
    import concurrent.futures

    from .batch import Pair, read_pair

    def read() -> tuple[Volume, Volume]:
        inputs = read_pair(Pair(fixed, moving))
        return inputs.fixed, inputs.moving

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rigid-resnet-read")
    try:
        return pool.submit(read)
    finally:
        pool.shutdown(wait=False)


def run(args: argparse.Namespace) -> dict:
    """Register, write every output, return the report dict.

    Contradicting options and an input that an output would replace are refused before anything
    is read; every input is checked before the model is loaded; the outputs are written into a
    private folder inside OUTDIR and moved into place only when all of them were written, so a
    failed or interrupted run leaves OUTDIR as it was (no partial outputs, no temporary files, not
    even OUTDIR itself when it did not exist). The input files are only read.
    """
    from .io import staged_outputs
    from .model_card import DEFAULT_CARD, read_model_card
    from .profiling import timed

    t0 = time.perf_counter()
    stages: dict[str, float] = {}  # the command's own stages (--profile; report.json "command_timings_s")
    check_option_conflicts(args)
    check_single_process()
    out = prepare_output(args.output)
    card_path = resolve_card(args.weights)
    check_inputs_are_not_outputs(args, out, card_path)
    card = read_model_card(card_path or DEFAULT_CARD)  # JSON only: the grid the inputs are checked against
    check_model_conflicts(args, card.transform)
    options = registration_options(args)
    if not args.demo and (not args.fixed or not args.moving):
        raise CliError("give FIXED and MOVING images (or --demo, or --batch PAIRS.csv)")
    reading = None if args.demo else read_in_background(args.fixed, args.moving)
    with timed(stages, "imports (torch, engine)"):
        from .engine import register_volumes
        from .model import load_model, resolve_device
        from .preprocess import check_before_registration
    resolve_device(args.device)  # CUDA asked for but absent: said before any error of the inputs
    truth = None
    with timed(stages, "read inputs"):  # what is left of the reading once torch is imported
        if reading is None:
            from .sample import apply_known_motion, load_sample

            fixed = load_sample()
            moving, truth = apply_known_motion(fixed)
        else:
            fixed, moving = reading.result()
        check_before_registration(fixed, moving, options.axis, card.input_size, card.spacing_mm)
    with staged_outputs(out) as stage:  # probes that OUTDIR is writable before the heavy work
        with timed(stages, "load model"):
            model = load_model(card_path, args.device)
        progress = _Progress(not args.quiet)
        try:
            with timed(stages, "engine"):
                result = register_volumes(fixed, moving, model, options, progress)
        finally:
            progress.close()
        return write_outputs(args, stage, fixed, moving, result, model.card, t0, truth, stages)


def write_outputs(args: argparse.Namespace, stage: Path, fixed: Volume, moving: Volume, result: RegistrationResult,
                  card: ModelCard, t0: float, truth: np.ndarray | None = None,
                  stages: dict[str, float] | None = None) -> dict:
    """Write a run's outputs (:data:`OUTPUT_NAMES`) into ``stage`` (the private folder of
    :func:`io.staged_outputs`) and return the report (``report.json``); ``t0``: when the run began
    (``total_seconds``), ``truth``: the demo's known motion, ``stages``: the run's stage timings so far,
    to which the writing stages are added (``command_timings_s``). One pair of ``--batch`` is written so too."""
    from .io import itk_dimension, output_suffix, write_csv, write_image_2d, write_json, write_tfm, write_volume
    from .overview import overview_figure
    from .profiling import timed
    from .report import result_report

    stages = {} if stages is None else stages
    assert result.registered is not None and result.difference is not None
    with timed(stages, "write volumes"):
        ext = output_suffix(args.output_format, None if args.demo else args.fixed)
        if args.demo:
            write_volume(fixed, stage / f"fixed{ext}")
            write_volume(moving, stage / f"moving{ext}")
        write_volume(result.registered, stage / f"registered{ext}")
        write_volume(result.difference, stage / f"difference{ext}")
    with timed(stages, "write transform, tables"):
        # two 2D images: a 2D transform, the only kind ITK applies to them (asked of ITK only for
        # single-slice inputs: a volume of several slices is 3D, and importing SimpleITK to read
        # both headers again costs 0.05-0.1 s)
        two_d = (not args.demo and fixed.shape[2] == 1 and moving.shape[2] == 1
                 and itk_dimension(args.fixed) == 2 and itk_dimension(args.moving) == 2)
        write_tfm(result.fixed_to_moving_ras, stage / "transform.tfm", 2 if two_d else 3)
        write_csv(result.slice_table(), stage / "slices.csv")
        if fixed.shape[2] == 1 and result.frame.axis == 2:
            write_image_2d(result.registered.array[:, :, 0].T, stage / "registered.png")
            write_image_2d(result.difference.array[:, :, 0].T, stage / "difference.png")
    if not args.no_overview:
        with timed(stages, "overview.png"):
            overview_figure(fixed, moving, result, stage / "overview.png")
    report = result_report(result, card)
    report["inputs"] = {
        "fixed": "embedded sample" if args.demo else str(args.fixed),
        "moving": "embedded sample with known motion" if args.demo else str(args.moving),
        "fixed_shape": list(fixed.shape), "fixed_spacing_mm": fixed.spacing.round(6).tolist(),
        "moving_shape": list(moving.shape), "moving_spacing_mm": moving.spacing.round(6).tolist(),
    }
    if truth is not None:
        from .geometry import rigid_error, volume_centre_ras

        centre = volume_centre_ras(fixed.ijk_to_ras, fixed.shape)
        rot, trans = rigid_error(result.fixed_to_moving_ras, truth, centre)
        report["demo"] = {"true_fixed_to_moving_RAS": truth.tolist(), "rotation_error_deg": rot, "translation_error_mm": trans}
        if result.network_fixed_to_moving_ras is not None:  # the network's passes alone, before any refinement
            net_rot, net_trans = rigid_error(result.network_fixed_to_moving_ras, truth, centre)
            report["demo"].update(network_rotation_error_deg=net_rot, network_translation_error_mm=net_trans)
    report["outputs"] = sorted([*(item.name for item in stage.iterdir()), "report.json"])
    report["command_timings_s"] = {k: round(v, 4) for k, v in stages.items()}
    report["total_seconds"] = round(time.perf_counter() - t0, 3)  # up to writing report.json
    write_json(report, stage / "report.json")
    return report


# --------------------------------------------------------------------------- many pairs (--batch)


def _yes_no(text: str) -> bool:
    word = text.strip().lower()
    if word in ("yes", "y", "true", "1", "on"):
        return True
    if word in ("no", "n", "false", "0", "off"):
        return False
    raise CliError(f"refine must be yes or no (true/false, 1/0), not {text!r}")


def pair_args(args: argparse.Namespace, row: PairRow, root: Path, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """One pair's command line: ``args`` with the pair's images as FIXED and MOVING, OUTROOT/NAME as
    OUTDIR, and the row's option cells in place of the command line's values, as if given there
    (``refine``: the refinement of the row's mode: ``--no-refine`` or ``--refine-slices``)."""
    from .batch import OPTION_COLUMNS

    a = argparse.Namespace(**vars(args))
    a.given = set(_given(args)) | {"fixed", "moving", "output"}
    a.batch, a.fixed, a.moving, a.output = None, row.fixed, row.moving, str(root / row.name)
    actions = {a_.option_strings[0]: a_ for a_ in parser._actions if a_.option_strings}
    for column, text in sorted(row.options.items(), key=lambda item: item[0] != "mode"):  # the mode first: refine needs it
        if column == "refine":
            on = _yes_no(text)
            a.given -= {"refine", "refine_slices"}
            a.refine, a.refine_slices = (True, on) if a.mode == "slices" else (on, False)
            continue
        action = actions[OPTION_COLUMNS[column]]
        value: object = text.lower() if action.choices else text
        if action.type is not None:
            try:
                value = action.type(text)
            except (TypeError, ValueError):
                raise CliError(f"{column} must be a whole number, not {text!r}") from None
        if action.choices and value not in action.choices:
            raise CliError(f"{column} must be one of {', '.join(action.choices)}, not {text!r}")
        setattr(a, action.dest, value)
        a.given.add(action.dest)
    return a


def completed_report(args: argparse.Namespace, out: Path) -> dict | None:
    """The report of a finished registration of this pair in ``out``, or None: a pair is complete
    when ``report.json`` reads as JSON, names the same FIXED and MOVING, and every file it lists
    and every output this run would write (volumes in ``--output-format``, ``overview.png`` unless
    ``--no-overview``) is there. The other options are not compared."""
    import json

    try:
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
        inputs, listed = report["inputs"], list(report["outputs"])
        same = (inputs["fixed"], inputs["moving"]) == (str(args.fixed), str(args.moving))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    needed = set(listed) | {n for n in output_names(args) if n not in TWO_D_OUTPUT_NAMES}
    return report if same and all((out / name).is_file() for name in needed) else None


def _pair_line(r: PairResult) -> str:
    if r.status == "failed":
        return f"FAILED {r.name}: {r.error}"
    quality = f"quality {r.verdict}" + (", NCC {ncc_before:.3f} -> {ncc_after:.3f}".format(**r.similarity)
                                        if {"ncc_before", "ncc_after"} <= r.similarity.keys() else "")
    if r.status == "skipped":
        return f"skipped {r.name}: outputs complete ({quality})"
    return f"ok {r.name}: {r.seconds:.1f} s, {quality}"


def run_batch(args: argparse.Namespace) -> int:
    """``--batch PAIRS.csv -o OUTROOT``: every pair of the pairs file with the model loaded once,
    the next pair read while the current one computes, each pair's outputs in OUTROOT/NAME/ as a
    single run writes them, a pair whose outputs are complete (:func:`completed_report`) skipped,
    a failed pair recorded and the others done; OUTROOT/summary.csv has a row per pair. Under
    torchrun (``WORLD_SIZE`` > 1) pair i is done by rank i % WORLD_SIZE and rank 0 writes the
    summary once every process is done. Returns the exit code: 0, or :data:`EXIT_PAIRS_FAILED`.

    The pairs file, every row's options and the files they name are checked before any work: a
    problem there is one error line naming the file and the line, and nothing is done.
    """
    from .batch import (SUMMARY_NAME, Pair, PairResult, error_line, gather_to_rank0, my_share, read_pairs_file,
                        register_many, start_process_group)
    from .distributed import distributed_from_env, process_device
    from .io import staged_outputs, write_csv
    from .model import DEFAULT_CARD, load_model, read_model_card, resolve_device

    check_option_conflicts(args)
    root = prepare_output(args.output)
    summary_path = root / SUMMARY_NAME
    if summary_path.is_dir():
        raise CliError(f"{summary_path} is a folder: the output {SUMMARY_NAME} cannot be written; choose another output folder")
    if summary_path.exists() and Path(args.batch).exists() and os.path.samefile(args.batch, summary_path):
        raise CliError(f"the pairs file {args.batch} would be overwritten by the output {SUMMARY_NAME}; choose another output folder")
    card_path = resolve_card(args.weights)
    card = read_model_card(card_path or DEFAULT_CARD)
    parser = build_parser()
    jobs = []
    for row in read_pairs_file(args.batch):
        try:
            a = pair_args(args, row, root, parser)
            check_option_conflicts(a)
            check_inputs_are_not_outputs(a, prepare_output(a.output), card_path)
            check_model_conflicts(a, card.transform)
            jobs.append((row, a, registration_options(a)))
        except Exception as exc:  # any problem of a row: one line naming it
            raise CliError(f"{args.batch} line {row.line} ({row.name}): {error_line(exc)}") from None
    place = distributed_from_env()
    device = str(process_device(args.device, place)) if place.enabled else args.device
    resolve_device(device)  # CUDA asked for but absent: say so before any work

    index = {row.name: i for i, (row, _, _) in enumerate(jobs)}
    done: list[PairResult] = []
    todo: list[Pair] = []
    pair_args_of = {}
    for i, (row, a, options) in my_share(jobs, place):
        report = completed_report(a, Path(a.output))
        if report is None:
            todo.append(Pair(row.fixed, row.moving, row.name, dataclasses.replace(options, device=device)))
            pair_args_of[row.name] = a
        else:
            done.append(PairResult(i, row.name, row.fixed, row.moving, "skipped", verdict=(report.get("quality") or {}).get("verdict"),
                                   similarity=report.get("similarity") or {}))
    root.mkdir(parents=True, exist_ok=True)  # before the processes write into it side by side
    if place.enabled:
        start_process_group(device)
    progress = _Progress(not args.quiet and place.rank == 0)
    prefix = f"rank {place.rank}: " if place.enabled else ""

    def say(r: PairResult) -> None:
        if not args.quiet:
            progress.write(prefix + _pair_line(r))

    for r in done:
        say(r)
    try:
        if todo:
            model = load_model(card_path, device)

            def write(pair: Pair, inputs, result, started: float) -> dict:
                a = pair_args_of[pair.name]
                with staged_outputs(a.output) as stage:
                    return write_outputs(a, stage, inputs.fixed, inputs.moving, result, model.card, started)

            done += register_many(todo, model, write=write, progress=progress, done=say, keep_results=False)
    finally:
        progress.close()
    rows = [(index[r.name], r.summary_row(place.rank)) for r in done]
    if place.enabled:
        gathered = gather_to_rank0(rows)
        if gathered is None:
            return 0  # rank 0 writes the summary and says how the cohort went
        rows = gathered
    rows.sort(key=lambda item: item[0])
    write_csv([row for _, row in rows], summary_path)
    status = [row["status"] for _, row in rows]
    failed = [row["name"] for _, row in rows if row["status"] == "failed"]
    if not args.quiet:
        print(f"{len(rows)} pairs: {status.count('ok')} registered, {status.count('skipped')} skipped (outputs complete), "
              f"{len(failed)} failed; summary in {summary_path.resolve()}")
    if failed:
        names = ", ".join(failed[:10]) + (f" and {len(failed) - 10} more" if len(failed) > 10 else "")
        print(f"error: {len(failed)} of {len(rows)} pairs failed: {names} (the errors are in {summary_path})", file=sys.stderr)
        return EXIT_PAIRS_FAILED
    return 0



def summary(report: dict, out: Path) -> str:
    s = report["similarity"]
    lines = [
        f"registered on {report['device']} in {report['seconds']:.2f} s (whole run {report['total_seconds']:.2f} s), "
        f"mode {report['mode']}, {report['slices']['used']} of {report['slices']['total']} {report['slice_orientation']} slices used",
        f"similarity NCC {s['ncc_before']:.3f} -> {s['ncc_after']:.3f}, MI {s['mi_before']:.3f} -> {s['mi_after']:.3f}",
        ("estimate (slices refined, combined): " if (report.get("refinement") or {}).get("scope") == "slices"
         else "network estimate: ") + ", ".join(f"{k} {v:+.3f}" for k, v in report["parameters"].items()),
    ]
    if report.get("refinement"):
        r = report["refinement"]
        if r.get("scope") == "slices":
            far = r.get("slices_moved_over_1", 0)
            lines.append(f"refined {r['slices_refined']} slices' in-plane transforms ({r['metric'].upper()}): mean "
                         f"{r['similarity_before']:.4f} -> {r['similarity_after']:.4f} in {r['steps']} steps"
                         + (f"; {far} moved more than 1 deg / 1 mm from the network's estimate" if far else ""))
        else:
            lines.append(f"refined (6 rigid parameters, {r['metric'].upper()}): {r['similarity_before']:.4f} -> "
                         f"{r['similarity_after']:.4f} in {r['steps']} steps")
    if report.get("init"):
        i = report["init"]
        lines.append(f"start: {i['used']}" + (" after a coarse rotation search" if i["coarse_search"] else "")
                     + (f" ({i['reason']})" if i["used"] != "header" or i["coarse_search"] else ""))
    lines.extend(quality_lines(report.get("quality") or {}))
    if "demo" in report:
        d = report["demo"]
        lines.append(f"known motion recovered with rotation error {d['rotation_error_deg']:.3f} deg, "
                     f"translation error {d['translation_error_mm']:.3f} mm")
        if "network_rotation_error_deg" in d:
            lines.append(f"the network alone (its passes, before the refinement): rotation error "
                         f"{d['network_rotation_error_deg']:.3f} deg, translation error {d['network_translation_error_mm']:.3f} mm")
    if not report["model"]["trained"]:
        lines.append("WARNING: the bundled model is UNTRAINED (identity placeholder): expect no correction.")
    lines.append(f"outputs in {out.resolve()}: " + " ".join(report["outputs"]))
    return "\n".join(lines)


def quality_lines(quality: dict) -> list[str]:
    """The summary's quality lines from report.json's ``quality``: ``quality: ok``, or the verdict
    in capitals with one ``WARNING:`` line per reason."""
    verdict = quality.get("verdict", "ok")
    if verdict == "ok":
        return ["quality: ok"]
    head = "registration FAILED quality control" if verdict == "failed" else "registration is SUSPICIOUS"
    return [f"quality: {verdict.upper()}"] + [f"WARNING: {head}: {reason}" for reason in quality.get("reasons", [])]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.demo and not args.output:
        args.output = "rigid-resnet-demo"
    try:
        if args.batch:
            return run_batch(args)
        report = run(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # every failure becomes one line; RIGID_RESNET_DEBUG shows the traceback
        if os.environ.get("RIGID_RESNET_DEBUG"):
            raise
        from .batch import error_line

        print(f"error: {error_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    if not args.quiet:
        print(summary(report, Path(args.output)))
    if args.profile:
        from .profiling import profile_table

        print(profile_table(report["command_timings_s"], report["timings_s"], report["total_seconds"]))
    return 0


def console_main() -> None:
    """The ``rigid-resnet-register`` command (and ``python -m RigidResNetRegistrationLib``):
    :func:`main`, then the process ends at once with its exit code. Python's orderly shutdown of
    an interpreter that has imported torch takes 0.4-0.5 s on two CPU cores (``python3 -c
    "import torch"`` 1.8-1.9 s, with ``os._exit(0)`` at the end 1.4 s), a sixth of a whole run;
    by the time :func:`main` returns every output file is written and closed (atomically, through
    ``io.atomic_path``) and the batch's threads and process group are done, so only the streams
    are left to flush. An error raised past :func:`main` (``RIGID_RESNET_DEBUG``) or argparse's
    exit still ends the usual way."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    console_main()
