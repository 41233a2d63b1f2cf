"""Stage timings: the engine's ``timings_s`` and the command line's ``--profile`` table.

Torch-free; one :func:`timed` block adds its wall time to a named entry of a plain dict, so the
engine, the command line and the batch runner time their stages the same way.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Mapping

#: The engine's stages, in order (engine.register_volumes; ``refine`` only when refining).
ENGINE_STAGES = ("initialise", "prepare", "predict", "refine", "quality", "resample")


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the wall time of the block to ``timings[stage]`` (seconds), also when it raises."""
    t = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t


def profile_table(command: Mapping[str, float], engine: Mapping[str, float], total: float) -> str:
    """The ``--profile`` table: the command's own stages (``command``, in the order they ran) with
    the engine's stages (``engine``) indented under ``engine``, each with seconds and its share of
    ``total`` (the whole run), and a last line for the total."""
    rows: list[tuple[str, float]] = []
    for name, seconds in command.items():
        rows.append((name, seconds))
        if name == "engine":
            rows.extend((f"  {stage}", engine[stage]) for stage in ENGINE_STAGES if stage in engine)
    width = max([len(name) for name, _ in rows] + [len("stage")])
    lines = [f"{'stage':<{width}}  seconds  share", f"{'-' * width}  -------  -----"]
    for name, seconds in rows:
        lines.append(f"{name:<{width}}  {seconds:7.3f}  {100 * seconds / total if total > 0 else 0:4.0f}%")
    lines.append(f"{'total':<{width}}  {total:7.3f}  100%")
    return "\n".join(lines)
