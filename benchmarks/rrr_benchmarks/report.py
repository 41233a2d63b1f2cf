"""Benchmark outputs: summary tables (markdown), raw rows (JSON) and plots (PNG)."""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from .cases import INTERSLICE_JITTER, INTERSLICE_STEP_DEG, INTERSLICE_STEP_MM
from .methods import METHOD_LABELS

RSS_NOTE = ("peak RSS: the peak resident memory of the method's own worker process (Python interpreter, its "
            "libraries, one case's fixed and moving volumes and the method's work)")

COLUMNS_3D = ["method", "pairing", "n", "rotation error median (deg)", "rotation p90 (deg)",
              "translation error median (mm)", "translation p90 (mm)", "success (<1 deg and <1 mm)",
              "seconds / volume (median)", "peak RSS (MB)"]
COLUMNS_2D = COLUMNS_3D[:-2] + ["ms / slice pair (median)", "peak RSS (MB)"]


SHORT_LABELS = {"ours": "ours", "ours-net": "ours (net only)", "sitk": "SimpleITK", "ants": "ANTsPy", "elastix": "elastix"}


def method_label(method: str, device: str = "cpu", dimension: str = "3d", passes: int | None = None) -> str:
    """Table label of a method; 2D rows of ours are the network on slice pairs (``passes``)."""
    if dimension == "2d":
        net = f"ours (ResNet-34 network, symmetric, {passes} passes)" if passes else "ours (ResNet-34 network, symmetric)"
        label = {"ours": net, "sitk": "SimpleITK rigid 2D (Mattes MI)"}.get(method, method)
    else:
        label = METHOD_LABELS.get(method, method)
    return f"{label} [GPU]" if method.startswith("ours") and device.startswith("cuda") else label


def summarise(rows: list[dict[str, Any]], rss: dict[tuple[str, str], float] | None = None) -> list[dict[str, Any]]:
    """One summary per (dimension, motion, method, pairing), in first-seen order. Failed cases
    (``error`` set) count as failures; their errors are left out of the error statistics."""
    groups: "OrderedDict[tuple[str, str, str, str], list[dict[str, Any]]]" = OrderedDict()
    for r in rows:
        groups.setdefault((r["dimension"], r["motion"], r["method"], r["pairing"]), []).append(r)
    out = []
    for (dim, motion, method, pairing), items in groups.items():
        rot = np.array([r["rot_err_deg"] for r in items], dtype=float)
        trans = np.array([r["trans_err_mm"] for r in items], dtype=float)
        secs = np.array([r["seconds"] for r in items], dtype=float)
        ok = ~np.isnan(rot) & ~np.isnan(trans)
        q = lambda a, p: float(np.percentile(a[ok], p)) if ok.any() else float("nan")  # noqa: E731
        out.append({
            "dimension": dim, "motion": motion, "method": method, "pairing": pairing, "n": len(items),
            "failed": int((~ok).sum()),
            "rot_median": q(rot, 50), "rot_p90": q(rot, 90), "trans_median": q(trans, 50), "trans_p90": q(trans, 90),
            "success": float(np.mean([bool(r["success"]) for r in items])),
            "seconds_median": float(np.nanmedian(secs)) if np.isfinite(secs).any() else float("nan"),
            "peak_rss_mb": (rss or {}).get((method, dim), float("nan")),
            "passes": items[0].get("iterations"),
        })
    return out


def _f(v: float, digits: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    """A markdown table: a header of ``columns``, then one line per row (cells as ``str``; a ``|``
    inside a cell is escaped, ``\\|``, so that it cannot split the cell)."""
    def line(cells: list[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(columns), "|" + " --- |" * len(columns), *(line(r) for r in rows)]) + "\n"


def markdown_tables(summaries: list[dict[str, Any]], device: str = "cpu") -> str:
    """A table per (dimension, motion), columns :data:`COLUMNS_3D` / :data:`COLUMNS_2D`."""
    parts = []
    keys = list(OrderedDict.fromkeys((s["dimension"], s["motion"]) for s in summaries))
    for dim, motion in sorted(keys, key=lambda k: (k[0] != "3d", keys.index(k))):
        cols = COLUMNS_3D if dim == "3d" else COLUMNS_2D
        title = "Whole volumes (3D)" if dim == "3d" else "Slice pairs (2D, 128 x 128 network grid)"
        parts.append(f"### {title}, motion `{motion}`\n")
        parts.append("| " + " | ".join(cols) + " |")
        parts.append("|" + " --- |" * len(cols))
        for s in (x for x in summaries if (x["dimension"], x["motion"]) == (dim, motion)):
            t = s["seconds_median"] if dim == "3d" else 1000.0 * s["seconds_median"]
            n = f"{s['n']}" + (f" ({s['failed']} failed)" if s["failed"] else "")
            parts.append(
                f"| {method_label(s['method'], device, dim, s.get('passes'))} | {s['pairing']} | {n} | {_f(s['rot_median'])} | {_f(s['rot_p90'])} "
                f"| {_f(s['trans_median'])} | {_f(s['trans_p90'])} | {100 * s['success']:.0f}% "
                f"| {_f(t, 2 if dim == '3d' else 1)} | {_f(s['peak_rss_mb'], 0)} |")
        parts.append("")
    return "\n".join(parts)


def markdown_timing(workers: list[dict[str, Any]], rows: list[dict[str, Any]], device: str = "cpu") -> str:
    """Start-up and whole-command figures: setup (imports, model load), cold first call, the
    engine's slices mode (amortised per slice pair) and the command line's wall time."""
    lines = ["| method | cases | setup: imports, model load (s) | cold first call (s) | warm call, median |",
             "| --- | --- | --- | --- | --- |"]
    extra = []
    for w in workers:
        if w.get("kind") == "cli" and w.get("cli"):
            c = w["cli"]
            walls = ", ".join(f"{x:.2f}" for x in c["wall_s"])
            extra.append(f"- The whole command `{c['command']}` on NIfTI files of case `{c['case']}` "
                         f"(process start, imports, model load, reading `.nii.gz`, registering, writing the outputs): "
                         f"**{walls} s** wall (first run, second run); peak RSS {c['peak_rss_mb']:.0f} MB; error "
                         f"{c['rot_err_deg']:.3f} deg / {c['trans_err_mm']:.3f} mm.")
        if w.get("kind") not in ("3d", "2d") or w.get("skipped") or w.get("failed"):
            continue
        mine = [r for r in rows if (r["method"], r["dimension"]) == (w["method"], w["kind"])]
        secs = [r["seconds"] for r in mine if r["seconds"] == r["seconds"]]
        warm = float(np.median(secs)) if secs else float("nan")
        if w["kind"] == "3d":
            warm_txt, first = f"{_f(warm, 2)} s / volume", "one volume"
        else:
            warm_txt = f"{_f(1000 * warm, 1)} ms / slice pair"
            first = "4 pairs" if w["method"] == "ours" else "one slice pair"
        passes = next((r.get("iterations") for r in mine), None)
        lines.append(f"| {method_label(w['method'], device, w['kind'], passes)} | {w['kind'].upper()} | {_f(w.get('setup_s'), 2)} "
                     f"| {_f(w.get('first_call_s'), 2)} ({first}) | {warm_txt} |")
        if w.get("slices_mode"):
            extra[:0] = _slices_mode_lines(w["slices_mode"])
    return "\n".join(lines + [""] + extra) + "\n"


def _slices_mode_lines(sm: dict[str, Any]) -> list[str]:
    """Report lines of our engine's ``slices`` mode: the defaults, then every slice in both orders,
    one order and the defaults with the per-slice refinement (when measured)."""
    def errors(run: dict[str, Any]) -> str:
        return "".join(f" Per-slice error, {name}: {_f(a['rot_median'])} deg / {_f(a['trans_median'])} mm "
                       f"(median; p90 {_f(a['rot_p90'])} / {_f(a['trans_p90'])}), {100 * a['success']:.0f}% of "
                       f"{a['n']} slices within 1 deg / 1 mm." for name, a in run.get("accuracy", {}).items())

    stride = sm.get("symmetric_stride", 1)
    how = "symmetric" if stride == 1 else f"defaults: both orders on one slice in {stride}, one order on the others"
    lines = [f"- Our engine in `slices` mode (one transform per slice, no registered volume, {how}) on case "
             f"`{sm['case']}`: {sm['seconds']:.2f} s (median of {len(sm.get('runs_s', [0]))} warm runs) for {sm['used_slices']} used "
             f"slices = **{sm['ms_per_slice_pair']:.1f} ms per slice pair** (amortised; at most {sm['iterations']} passes)."
             + (f" Peak RSS of the worker by the end of these runs: {sm['peak_rss_mb']:.0f} MB (the table's figure is "
                "taken before them)." if sm.get("peak_rss_mb") else "") + errors(sm)]
    if sm.get("every_slice"):
        every = sm["every_slice"]
        lines.append(f"- The same with every slice in both orders (`--symmetric-stride 1`): {every['seconds']:.2f} s for "
                     f"{every['used_slices']} used slices = {every['ms_per_slice_pair']:.1f} ms per slice pair." + errors(every))
    if sm.get("one_order"):
        one = sm["one_order"]
        lines.append(f"- The same in one order (`--no-symmetric`): {one['seconds']:.2f} s for {one['used_slices']} used slices = "
                     f"{one['ms_per_slice_pair']:.1f} ms per slice pair." + errors(one))
    if sm.get("refined"):
        ref = sm["refined"]
        lines.append(f"- The defaults with each slice refined on its image similarity (`--refine-slices`): {ref['seconds']:.2f} s "
                     f"for {ref['used_slices']} used slices = {ref['ms_per_slice_pair']:.1f} ms per slice pair." + errors(ref))
    if any(name.startswith("motion between slices") for name in sm.get("accuracy", {})):
        lines.append("  (Motion between slices: the unmoved moving contrast of the first case of each pairing re-made slice by "
                     f"slice with that case's motion, two steps of up to {INTERSLICE_STEP_DEG:g} deg / {INTERSLICE_STEP_MM:g} mm "
                     f"during the scan and {INTERSLICE_JITTER:g} deg / {INTERSLICE_JITTER:g} mm jitter per slice, "
                     "`cases.interslice_motion`; errors against each slice's own motion.)")
    return lines


def method_agreement(rows: list[dict[str, Any]], cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """How far apart the methods' 3D estimates are on the same cases, whatever the truth: for each
    (motion, pairing) and pair of methods with an estimate on the same cases, the rotation angle
    between the two estimates and the distance between where they send the fixed volume's centre
    (:func:`geometry.rigid_error`, which is symmetric in its two transforms), median and max over
    the cases. Across contrasts this bounds how finely the data's own truth can be known."""
    from RigidResNetRegistrationLib import geometry as geo

    centres = {c["id"]: np.asarray(c["centre_ras"], dtype=np.float64) for c in cases if "centre_ras" in c}
    estimates: dict[tuple[str, str], dict[str, dict[str, np.ndarray]]] = OrderedDict()
    for r in rows:
        if r["dimension"] == "3d" and r.get("estimate") is not None and not r.get("error") and r["case"] in centres:
            estimates.setdefault((r["motion"], r["pairing"]), OrderedDict()).setdefault(r["method"], {})[r["case"]] = np.asarray(r["estimate"])
    out = []
    for (motion, pairing), by_method in estimates.items():
        names = list(by_method)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                common = [c for c in by_method[a] if c in by_method[b]]
                if not common:
                    continue
                diffs = np.array([geo.rigid_error(by_method[a][c], by_method[b][c], centres[c]) for c in common])
                out.append({"motion": motion, "pairing": pairing, "methods": (a, b), "n": len(common),
                            "rot_median": float(np.median(diffs[:, 0])), "rot_max": float(diffs[:, 0].max()),
                            "trans_median": float(np.median(diffs[:, 1])), "trans_max": float(diffs[:, 1].max())})
    return out


def markdown_agreement(agreement: list[dict[str, Any]]) -> str:
    """The table of :func:`method_agreement` (empty string when there is nothing to compare)."""
    if not agreement:
        return ""
    lines = ["### Agreement between methods (3D)\n",
             "How far apart two methods' transforms are on the same cases (not against the truth): rotation angle between "
             "them and distance between where they send the fixed volume's centre, median (max) over the cases.\n",
             "| motion | pairing | methods | n | rotation difference (deg) | translation difference (mm) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for a in agreement:
        names = " vs ".join(SHORT_LABELS.get(m, m) for m in a["methods"])
        lines.append(f"| `{a['motion']}` | {a['pairing']} | {names} | {a['n']} | {_f(a['rot_median'])} ({_f(a['rot_max'])}) "
                     f"| {_f(a['trans_median'])} ({_f(a['trans_max'])}) |")
    return "\n".join(lines) + "\n"


def markdown_report(meta: dict[str, Any], rows: list[dict[str, Any]], workers: list[dict[str, Any]],
                    cases: list[dict[str, Any]] | None = None) -> str:
    """The whole ``benchmark.md`` (``cases``: the 3D cases, for the methods' agreement)."""
    device = meta.get("device", "cpu")
    rss = {(w["method"], w["kind"]): w["peak_rss_mb"] for w in workers if w.get("peak_rss_mb") is not None}
    summaries = summarise(rows, rss)
    head = ["# RigidResNetRegistration benchmark", ""]
    for key in ("date", "command", "machine", "threads", "torch", "device", "packages", "data", "cases", "model",
                "wall time of the benchmark"):
        if key in meta:
            head.append(f"- **{key}**: {meta[key]}")
    head.append("")
    notes = [
        "Errors: the rotation angle of `R_est^T R_true` and the distance between where the estimated and the true "
        "transform send the fixed volume's centre (3D); for slice pairs the residual in-plane angle and the distance "
        "at the grid centre. Success: rotation error < 1 deg and translation error < 1 mm; a method that failed on "
        "a case counts as a failure there. Times run from arrays in memory to the transform and the registered "
        "volume (file I/O excluded; ANTsPy writes and reads its own temporary files inside `ants.registration`), "
        "after one untimed warm-up call; 2D times of our network are per pair amortised over batches. " + RSS_NOTE + ".",
        "",
    ]
    skipped = [f"- {method_label(w['method'], device)} ({w['kind']}): skipped: {w['skipped']}" for w in workers if w.get("skipped")]
    failed = [f"- {method_label(w['method'], device)} ({w['kind']}): failed: {w['failed']}" for w in workers if w.get("failed")]
    body = [markdown_tables(summaries, device), "### Start-up and the whole command\n", markdown_timing(workers, rows, device)]
    agreement = markdown_agreement(method_agreement(rows, cases or []))
    if agreement:
        body.append(agreement)
    if skipped or failed:
        body += ["### Not run\n", *skipped, *failed, ""]
    if meta.get("plots"):
        body += ["### Plots\n"] + [f"![{p}]({p})" for p in meta["plots"]] + [""]
    return "\n".join(head + notes + body)


def plot(rows: list[dict[str, Any]], workers: list[dict[str, Any]], out: Path, device: str = "cpu") -> list[str]:
    """Error box plots per (dimension, motion) and a time bar chart (log scales); returns file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    floor = 1e-3
    for dim in ("3d", "2d"):
        sel = [r for r in rows if r["dimension"] == dim]
        motions = list(OrderedDict.fromkeys(r["motion"] for r in sel))
        if not motions:
            continue
        fig, axes = plt.subplots(len(motions), 2, figsize=(12, 3.6 * len(motions)), squeeze=False)
        for mi, motion in enumerate(motions):
            groups = list(OrderedDict.fromkeys((r["method"], r["pairing"]) for r in sel if r["motion"] == motion))
            labels = [f"{SHORT_LABELS.get(m, m)}{' [GPU]' if m == 'ours' and device.startswith('cuda') else ''}\n{p}"
                      for m, p in groups]
            colours = [f"C{list(SHORT_LABELS).index(m) if m in SHORT_LABELS else 9}" for m, _ in groups]
            for ci, (key, unit) in enumerate((("rot_err_deg", "rotation error (deg)"), ("trans_err_mm", "translation error (mm)"))):
                data = []
                for m, p in groups:
                    v = np.array([r[key] for r in sel if r["motion"] == motion and (r["method"], r["pairing"]) == (m, p)], float)
                    v = v[np.isfinite(v)]
                    data.append(np.maximum(v, floor) if v.size else np.array([np.nan]))
                ax = axes[mi, ci]
                boxes = ax.boxplot(data, showfliers=True, whis=(10, 90), patch_artist=True)
                for patch, colour in zip(boxes["boxes"], colours):
                    patch.set_facecolor(colour)
                    patch.set_alpha(0.5)
                ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
                ax.set_yscale("log")
                ax.axhline(1.0, color="tab:red", lw=0.8, ls="--")
                ax.set_ylabel(unit)
                ax.set_title(f"{'volumes' if dim == '3d' else 'slice pairs'}, motion {motion} (whiskers p10-p90, floor {floor})", fontsize=9)
        fig.tight_layout()
        name = f"errors_{dim}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        names.append(name)
    # times
    panels = [(dim, unit, scale) for dim, unit, scale in (("3d", "seconds / volume (median)", 1.0),
                                                          ("2d", "ms / slice pair (median)", 1000.0))
              if any(r["dimension"] == dim for r in rows)]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
        for ax, (dim, unit, scale) in zip(axes[0], panels):
            methods = list(OrderedDict.fromkeys(r["method"] for r in rows if r["dimension"] == dim))
            med = [scale * float(np.nanmedian([r["seconds"] for r in rows if r["dimension"] == dim and r["method"] == m]))
                   for m in methods]
            labels = [method_label(m, device, dim) for m in methods]
            extra = [(w["slices_mode"]["ms_per_slice_pair"]) for w in workers if dim == "2d" and w.get("slices_mode")]
            if extra:
                labels.append("ours, engine slices mode\n(amortised)")
                med.append(extra[0])
            bars = ax.bar(range(len(med)), med, color=[f"C{i}" for i in range(len(med))], alpha=0.7)
            ax.bar_label(bars, [f"{v:.3g}" for v in med], fontsize=8)
            ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=15, ha="right")
            ax.set_yscale("log")
            finite = [v for v in med if v == v and v > 0]
            if finite:
                ax.set_ylim(min(finite) / 4, max(finite) * 3)
            ax.set_ylabel(unit)
            ax.set_title(("volumes" if dim == "3d" else "slice pairs") + (" (ours on GPU)" if device.startswith("cuda") else ""), fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "time.png", dpi=110)
        plt.close(fig)
        names.append("time.png")
    return names
