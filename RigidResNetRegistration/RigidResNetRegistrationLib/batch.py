"""Many pairs in one process: :func:`register_many` (the loop the command line's ``--batch`` and the
Slicer Logic's ``registerMany`` share), the pairs file of ``--batch PAIRS.csv``
(:func:`read_pairs_file`) and the share of a cohort each torchrun process takes (:func:`my_share`,
:func:`start_process_group`, :func:`gather_to_rank0`; where a process sits: :mod:`.distributed`).

Importing this module imports neither torch nor the engine (they are imported when a cohort runs);
``torch.distributed`` is touched only when ``WORLD_SIZE`` > 1.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .distributed import Distributed
    from .engine import Predictor, RegistrationOptions, RegistrationResult
    from .volume import Volume

#: Columns of a pairs file besides the per-pair options: the two images and the pair's name.
PAIR_COLUMNS = ("fixed", "moving", "name")
#: Per-pair option columns and the command line option each one sets for its row (``refine``:
#: the refinement of the row's mode, ``--no-refine`` in volume mode, ``--refine-slices`` in slices
#: mode). A column name may also be written with hyphens (``max-slices``).
OPTION_COLUMNS = {
    "mode": "--mode", "axis": "--axis", "init": "--init", "metric": "--metric", "refine": "--refine",
    "iterations": "--iterations", "max_slices": "--max-slices", "initial_transform": "--initial-transform",
}
#: Columns holding a file path (relative ones are relative to the pairs file's folder).
PATH_COLUMNS = ("fixed", "moving", "initial_transform")
#: The merged summary a cohort writes into OUTROOT; no pair may be named so.
SUMMARY_NAME = "summary.csv"
#: Columns of ``summary.csv``, in order.
SUMMARY_COLUMNS = ("name", "fixed", "moving", "status", "seconds", "verdict", "ncc_before", "ncc_after",
                   "mi_before", "mi_after", "rank", "error")

_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}")
_VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".png", ".jpg", ".jpeg", ".tif",
                    ".tiff", ".bmp")


class PairsFileError(ValueError):
    """A pairs file that cannot be used as it is (one line, naming the file and the line)."""


def error_line(exc: BaseException) -> str:
    """The one line a failure is reported with: the first line of its message (the exception's
    class name when it has none); a memory error says what to lower."""
    if isinstance(exc, MemoryError):
        return "out of memory (try --batch-size 8)"
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


# --------------------------------------------------------------------------- the pairs file


@dataclasses.dataclass
class PairRow:
    """One row of a pairs file: its line number, the pair's name, the two image paths (absolute)
    and its non-empty option cells (column -> text; ``initial_transform`` an absolute path)."""

    line: int
    name: str
    fixed: str
    moving: str
    options: dict[str, str] = dataclasses.field(default_factory=dict)


def default_name(moving: str | Path) -> str:
    """The name of a pair without one: the moving file's name without its image suffix
    (``sub-01_T2w.nii.gz`` -> ``sub-01_T2w``; a DICOM folder: its name), any character that is not
    a letter, digit, ``. _ + -`` replaced by ``_``."""
    base = Path(str(moving).rstrip("/\\")).name
    lower = base.lower()
    suffix = next((s for s in _VOLUME_SUFFIXES if lower.endswith(s) and len(base) > len(s)), "")
    stem = base[: len(base) - len(suffix)]
    return re.sub(r"[^A-Za-z0-9._+-]", "_", stem).lstrip(".-")[:128] or "pair"


def check_name(name: str) -> None:
    """A pair's name is its output folder's name: letters, digits and ``. _ + -``, at most 128,
    not starting with ``.``, ``+`` or ``-``, and not the summary file's name."""
    if not _SAFE_NAME.fullmatch(name):
        raise PairsFileError(f"the name {name!r} cannot be a folder name (letters, digits and . _ + - only, at most 128, "
                             "not starting with . + or -)")
    if name.lower() == SUMMARY_NAME:
        raise PairsFileError(f"the name {name!r} is taken by the cohort's summary file")


def read_pairs_file(path: str | Path) -> list[PairRow]:
    """Read a pairs file: CSV with a header; columns ``fixed``, ``moving`` (required), ``name``
    and the option columns of :data:`OPTION_COLUMNS` (optional; an empty cell leaves that option to
    the command line). Relative paths are relative to the file's folder. Blank rows are skipped.

    Raises :class:`PairsFileError` (one line naming the file and the line) for a missing or empty
    file, an unknown or repeated column, a row without both images or with more cells than the
    header, an unsafe name (:func:`check_name`), or a name used twice (compared without case: the
    names are folders). The images themselves are not opened here.
    """
    p = Path(path)
    if not p.is_file():
        raise PairsFileError(f"pairs file not found: {p}" if not p.exists() else f"pairs file is not a file: {p}")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise PairsFileError(f"pairs file {p} cannot be read ({error_line(exc)})") from None
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if not header or not any(cell.strip() for cell in header):
        raise PairsFileError(f"pairs file {p} is empty: it needs a header line with the columns fixed,moving")
    columns = [cell.strip().lower().replace("-", "_") for cell in header]
    known = (*PAIR_COLUMNS, *OPTION_COLUMNS)
    for column in columns:
        if column not in known:
            raise PairsFileError(f"{p}: unknown column {column!r} (columns: {', '.join(known)})")
        if columns.count(column) > 1:
            raise PairsFileError(f"{p}: the column {column!r} appears twice")
    for column in ("fixed", "moving"):
        if column not in columns:
            raise PairsFileError(f"{p}: no {column!r} column (the header needs fixed and moving)")
    folder = os.path.dirname(os.path.abspath(p))
    rows: list[PairRow] = []
    seen: dict[str, int] = {}
    for number, cells in enumerate(reader, start=2):
        if not any(cell.strip() for cell in cells):
            continue
        where = f"{p} line {number}"
        if len(cells) > len(columns):
            raise PairsFileError(f"{where}: {len(cells)} cells but the header has {len(columns)} columns")
        values = {c: v.strip() for c, v in zip(columns, cells) if v.strip()}
        for column in ("fixed", "moving"):
            if column not in values:
                raise PairsFileError(f"{where}: the {column} image is missing")
        for column in PATH_COLUMNS:
            if column in values:
                values[column] = os.path.join(folder, os.path.expanduser(values[column]))
        name = values.pop("name", None) or default_name(values["moving"])
        try:
            check_name(name)
        except PairsFileError as exc:
            raise PairsFileError(f"{where}: {exc}" + ("" if "name" in columns else " (add a name column)")) from None
        if name.lower() in seen:
            raise PairsFileError(f"{where}: the name {name!r} is already used on line {seen[name.lower()]}; pair names must "
                                 "be unique (they are the output folders" + ("" if "name" in columns else
                                                                                ": add a name column") + ")")
        seen[name.lower()] = number
        fixed, moving = values.pop("fixed"), values.pop("moving")
        rows.append(PairRow(number, name, fixed, moving, values))
    if not rows:
        raise PairsFileError(f"pairs file {p} lists no pairs")
    return rows


# --------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class Pair:
    """One registration of a cohort: the fixed and moving image (a :class:`~.volume.Volume`, a path,
    or whatever the ``read`` of :func:`register_many` takes, e.g. volume nodes), its name (default:
    the moving image's) and its options (None: those given to :func:`register_many`)."""

    fixed: Any
    moving: Any
    name: str | None = None
    options: RegistrationOptions | None = None


@dataclasses.dataclass
class PairInputs:
    """What ``read`` gives for a pair: the two volumes, optionally the options to register them
    with (None: the pair's), and anything ``write`` needs from the reading (``context``)."""

    fixed: Volume
    moving: Volume
    options: RegistrationOptions | None = None
    context: Any = None


@dataclasses.dataclass
class PairResult:
    """The outcome of one pair: ``status`` ``ok`` or ``failed`` (the command line also records
    ``skipped``: outputs already complete), ``seconds`` (the pair's wall time in the loop, waiting
    for its images included), the quality ``verdict`` and ``similarity`` before/after (ok pairs),
    ``error`` (failed pairs: one line), ``result`` (the engine's result, unless dropped) and
    ``output`` (what ``write`` returned: the command line's report, the Slicer Logic's nodes)."""

    index: int
    name: str
    fixed: str
    moving: str
    status: str
    seconds: float = 0.0
    verdict: str | None = None
    similarity: dict[str, float] = dataclasses.field(default_factory=dict)
    error: str | None = None
    result: RegistrationResult | None = None
    output: Any = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def summary_row(self, rank: int = 0) -> dict[str, Any]:
        """The pair's row of ``summary.csv`` (:data:`SUMMARY_COLUMNS`)."""
        s = self.similarity
        return {"name": self.name, "fixed": self.fixed, "moving": self.moving, "status": self.status,
                "seconds": round(self.seconds, 3), "verdict": self.verdict or "",
                **{k: ("" if s.get(k) is None else round(float(s[k]), 6)) for k in ("ncc_before", "ncc_after", "mi_before", "mi_after")},
                "rank": rank, "error": self.error or ""}


ReadHook = Callable[[Pair], "PairInputs | tuple[Volume, Volume]"]
WriteHook = Callable[[Pair, PairInputs, "RegistrationResult", float], Any]


def label(image: Any) -> str:
    """How a pair's image is named in results: a path as given, a volume by its name, a node by its name."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if hasattr(image, "GetName"):
        return str(image.GetName())
    return str(getattr(image, "name", None) or type(image).__name__)


class LastImage:
    """The image file read last, kept for the next pair that names the same file unchanged (same
    resolved path, size and modification time): a cohort registered to one template, or several
    contrasts of a subject to its T1, reads that file once (0.08 s of a 1 s pair for a
    240 x 240 x 155 ``.nii.gz``). Sharing the :class:`~.volume.Volume` is safe: the engine never
    modifies its inputs. One entry: memory stays that of one more volume at most."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.volume: Volume | None = None

    @staticmethod
    def file_key(path: str | os.PathLike) -> tuple | None:
        try:
            st = os.stat(path)
        except OSError:  # the reader says what is wrong with it
            return None
        return os.path.realpath(path), st.st_size, st.st_mtime_ns

    def read(self, path: str | os.PathLike, label: str) -> Volume:
        from .io import read_volume

        key = self.file_key(path)
        if key is not None and key == self.key and self.volume is not None:
            return self.volume
        volume = read_volume(path, label)
        self.key, self.volume = key, volume
        return volume


def read_pair(pair: Pair, fixed_cache: LastImage | None = None) -> PairInputs:
    """The default ``read`` (and how the command line reads FIXED and MOVING: ``cli.read_in_background``):
    a path is read with :func:`io.read_volume`, a :class:`~.volume.Volume` is used as it is. ``fixed_cache``: the fixed
    image is taken from it when the previous pair read the same file (:class:`LastImage`)."""
    from .io import read_volume

    def volume(image: Any, role: str) -> Volume:
        if isinstance(image, (str, os.PathLike)):
            label = f"{role} image {image}"
            return fixed_cache.read(image, label) if role == "fixed" and fixed_cache is not None else read_volume(image, label)
        if hasattr(image, "array") and hasattr(image, "ijk_to_ras"):
            return image
        raise TypeError(f"the {role} image of pair {pair.name!r} is neither a path nor a Volume ({type(image).__name__})")

    return PairInputs(volume(pair.fixed, "fixed"), volume(pair.moving, "moving"))


def _as_pair(item: Any, index: int) -> Pair:
    if isinstance(item, Pair):
        pair = dataclasses.replace(item)
    elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
        pair = Pair(*item)
    else:
        raise TypeError(f"pair {index + 1} must be a Pair or a (fixed, moving[, name]) tuple, not {type(item).__name__}")
    if pair.name is None:
        pair.name = default_name(pair.moving) if isinstance(pair.moving, (str, os.PathLike)) else label(pair.moving)
    return pair


#: Niceness of the thread that reads the next pair (:class:`_Prefetch`): the lowest priority.
READER_NICENESS = 19


def lower_thread_priority(niceness: int = READER_NICENESS) -> bool:
    """Give the calling thread the CPU priority ``niceness`` (Linux, where niceness is per thread;
    a thread may always lower its own priority); return whether it was set (False elsewhere: on
    other systems ``setpriority`` takes a process id, not a thread's).

    The thread that reads the next pair of a cohort runs so: it then takes the cycles the
    registration leaves idle (its single-threaded moments, the writing of outputs) instead of
    halving the two CPU threads of its parallel stages, which wait for each other at every step:
    at normal priority the start search of a pair being registered while the next one is read took
    0.19 s instead of 0.09 s (benchmarks/README.md, "Speed a user feels")."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), int(niceness))
    except (OSError, AttributeError):  # a sandbox forbidding it
        return False
    return True


class _Prefetch:
    """Reads pair i+1 in a background thread while pair i is registered (at most two pairs' volumes
    in memory); a reading error is raised when that pair's turn comes. The reading thread runs at
    the lowest CPU priority (:func:`lower_thread_priority`)."""

    def __init__(self, pairs: Sequence[Pair], read: ReadHook, enabled: bool) -> None:
        self.pairs, self.read = pairs, read
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rigid-resnet-read",
                                                          initializer=lower_thread_priority) \
            if enabled and len(pairs) > 1 else None
        self.futures: dict[int, concurrent.futures.Future] = {}

    def _start(self, i: int) -> None:
        if self.pool is not None and i < len(self.pairs) and i not in self.futures:
            self.futures[i] = self.pool.submit(self.read, self.pairs[i])

    def get(self, i: int) -> Any:
        self._start(i)
        self._start(i + 1)  # queued behind pair i: read while pair i computes
        future = self.futures.pop(i, None)
        return self.read(self.pairs[i]) if future is None else future.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def computes_off_the_cpu(predictor: Any) -> bool:
    """The model runs on a GPU (its ``device`` is not the CPU): the CPU is then free to write one
    pair's outputs while the next pair is registered."""
    device = getattr(predictor, "device", None)
    return device is not None and getattr(device, "type", str(device).split(":")[0]) != "cpu"


class _WriteBehind:
    """Writes one pair's outputs in a background thread while the next pair is registered (or in the
    caller's thread, when its output is asked for, when disabled). ``submit`` returns a callable
    giving the write's output (raising its error); ``pending`` holds the pair being written until
    :meth:`take` hands it back."""

    def __init__(self, write: WriteHook | None, enabled: bool) -> None:
        self.write, self.enabled = write, enabled
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rigid-resnet-write") if enabled else None
        self.pending: tuple | None = None

    def submit(self, pair: Pair, inputs: PairInputs, result: Any, started: float) -> Callable[[], Any]:
        if self.write is None:
            return lambda: None
        if self.pool is None:  # written when the caller asks for the output, right away
            return lambda: self.write(pair, inputs, result, started)
        return self.pool.submit(self.write, pair, inputs, result, started).result

    def take(self) -> tuple | None:
        """The pair submitted last and not yet recorded (None when there is none); recording it
        waits for its write."""
        pending, self.pending = self.pending, None
        return pending

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def register_many(
    pairs: Iterable[Pair | tuple],
    predictor: Predictor | None = None,
    options: RegistrationOptions | None = None,
    *,
    read: ReadHook | None = None,
    write: WriteHook | None = None,
    progress: Callable[[float, str], None] | None = None,
    done: Callable[[PairResult], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    prefetch: bool = True,
    keep_results: bool = True,
    write_behind: bool | None = None,
) -> list[PairResult]:
    """Register every pair with one loaded model, in order; return one :class:`PairResult` per pair.

    Args:
        pairs: :class:`Pair` objects or ``(fixed, moving)`` / ``(fixed, moving, name)`` tuples;
            images are :class:`~.volume.Volume` objects or paths (any file :func:`io.read_volume`
            reads), or what ``read`` takes.
        predictor: a loaded model (:func:`model.load_model`); None loads the bundled one on
            ``options.device``.
        options: the options of every pair whose own are None (default ``RegistrationOptions()``);
            checked before any pair (a bad option raises ``InputError``).
        read: ``read(pair)`` -> :class:`PairInputs` or ``(fixed, moving)`` volumes; default
            :func:`read_pair`, with a fixed file named by consecutive pairs read once (:class:`LastImage`).
        write: ``write(pair, inputs, result, started)``, called after a pair's registration
            (``started``: ``time.perf_counter()`` when its turn began); its return value is the
            result's ``output``. The command line writes the pair's files here, Slicer its nodes.
        progress: ``progress(fraction, message)`` over the whole cohort; the message names the pair.
        done: ``done(pair_result)`` after each pair, failed ones included.
        cancel: polled between network batches; True stops the cohort (``RegistrationCancelled``
            is raised; the pairs done so far keep their outputs).
        prefetch: read the next pair in a background thread while the current one is registered,
            at the lowest CPU priority (:func:`lower_thread_priority`; ``read`` must then be safe
            outside the main thread: files are, Slicer nodes are not).
        keep_results: keep each pair's :class:`~.engine.RegistrationResult` (with its registered
            and difference volumes) in ``result``; False drops it once ``write`` is done (large
            cohorts), the verdict and similarities are kept.
        write_behind: write pair i's outputs in a background thread while pair i+1 is registered
            (one write at a time; ``write`` must then be safe outside the main thread: files are,
            Slicer nodes are not). A pair is recorded, and ``done`` called, in order, once its
            outputs are written. None (default): when the model runs on a GPU, whose computing
            leaves the CPU free for writing; on a CPU the registration already keeps every core
            busy and writing behind was slower (benchmarks/README.md, "Speed a user feels").

    A pair that fails (an image that cannot be read, a constant volume, a failure in ``write``...)
    is recorded with status ``failed`` and its one-line error, never raised; the others go on.
    ``KeyboardInterrupt`` and cancellation stop the cohort.
    """
    from .engine import RegistrationCancelled, RegistrationOptions, register_volumes

    items = [_as_pair(item, i) for i, item in enumerate(pairs)]
    base = options or RegistrationOptions()
    base.validate()
    if predictor is None:
        from .model import load_model

        predictor = load_model(None, base.device)
    if read is None:  # pairs read one after the other (one reading thread): a fixed file read once in a row
        cache = LastImage()
        reader: ReadHook = lambda pair: read_pair(pair, cache)  # noqa: E731
    else:
        reader = read
    loader = _Prefetch(items, reader, prefetch)
    if write_behind is None:
        write_behind = computes_off_the_cpu(predictor)
    writer = _WriteBehind(write, write_behind and write is not None and len(items) > 1)
    n = len(items)
    results: list[PairResult] = []

    def record(out: PairResult, written: Callable[[], Any] | None, result: Any, started: float) -> None:
        """Pair ``out`` is finished once ``written()`` returns its output (None: it failed before)."""
        if written is not None:
            try:
                out.output = written()
                out.status, out.verdict, out.similarity = "ok", result.verdict, dict(result.similarity)
                out.result = result if keep_results else None
            except Exception as exc:  # a failed pair is recorded, never raised
                out.error = error_line(exc)
        out.seconds = time.perf_counter() - started
        results.append(out)
        if done is not None:
            done(out)

    try:
        for i, pair in enumerate(items):
            started = time.perf_counter()
            out = PairResult(i, str(pair.name), label(pair.fixed), label(pair.moving), "failed")

            def report(fraction: float, message: str, i: int = i, name: str = out.name) -> None:
                if progress is not None:
                    progress((i + min(max(fraction, 0.0), 1.0)) / n, f"pair {i + 1}/{n} {name}: {message}")

            report(0.0, "reading")
            written = result = None
            try:
                inputs = loader.get(i)
                if not isinstance(inputs, PairInputs):
                    inputs = PairInputs(*inputs)
                opts = inputs.options or pair.options or base
                result = register_volumes(inputs.fixed, inputs.moving, predictor, opts, progress=report, cancel=cancel)
            except (KeyboardInterrupt, RegistrationCancelled):
                raise
            except Exception as exc:  # a failed pair is recorded, never raised
                out.error = error_line(exc)
            previous = writer.take()  # the previous pair is recorded first: results stay in order
            if previous is not None:
                record(*previous)
            if result is not None:
                written = writer.submit(pair, inputs, result, started)
            if written is None or not writer.enabled:
                record(out, written, result, started)
            else:
                writer.pending = (out, written, result, started)
            inputs = result = written = None  # this pair's volumes go once written
        previous = writer.take()
        if previous is not None:
            record(*previous)
        if progress is not None and n:
            progress(1.0, f"{n} pairs done")
    finally:
        writer.close()  # a write in progress finishes (its files are complete or absent)
        loader.close()
    return results


# --------------------------------------------------------------------------- torchrun


def my_share(items: Sequence[Any], dist_info: Distributed) -> list[tuple[int, Any]]:
    """(index, item) of the items this process takes: item i goes to rank ``i % WORLD_SIZE``, so
    every item is taken by exactly one process, the same one on every run of the same cohort."""
    return [(i, item) for i, item in enumerate(items) if i % dist_info.world_size == dist_info.rank]


def start_process_group(device: str) -> None:
    """Join torchrun's process group: NCCL when this process computes on CUDA (the device set to
    ``cuda:LOCAL_RANK``), gloo on the CPU. The only collective is :func:`gather_to_rank0`, once at the
    end, so the timeout is long: a process may finish its share hours before the slowest one."""
    import datetime

    import torch
    import torch.distributed as dist

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=48))


def gather_to_rank0(rows: list[Any]) -> list[Any] | None:
    """Every process's ``rows`` to rank 0 (a barrier: it returns once every process got here);
    rank 0 gets all rows, in rank order, the others None. Leaves the process group."""
    import torch.distributed as dist

    rank, size = dist.get_rank(), dist.get_world_size()
    gathered: list[Any] | None = [None] * size if rank == 0 else None
    try:
        dist.gather_object(rows, gathered, dst=0)
    finally:
        dist.destroy_process_group()
    return None if gathered is None else [row for part in gathered for row in (part or [])]
