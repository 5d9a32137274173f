"""The loop's final report: a table of iterations (EVAL and TEST IoU, Dice, Recall, Precision)
as Markdown, CSV and JSON, and a PNG plot of the metrics per iteration."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from bss.config import METRICS
from bss.data.io import atomic_write_json

NAMES = {"iou": "IoU", "dice": "Dice", "recall": "Recall", "precision": "Precision"}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _labels(r: dict) -> tuple[str, str]:
    """(EVAL label IoU of this model as a teacher, label IoU vs truth of the H<n> it made) as text."""
    teacher = _fmt(r.get("eval_label_iou"))
    made = r.get("label_hybrid_iou_pixels")
    truth = "-" if made is None else f"{r.get('made', 'H')} {made:.3f} (boxes {r.get('label_box_iou_pixels', float('nan')):.3f})"
    return teacher, truth


def table_lines(rows: list[dict]) -> list[str]:
    """A fixed-width text table (console): IoU and Dice beside Recall, and the label quality."""
    head = (
        f"{'iter':>4}  {'train set':<20} {'trials':>9}  "
        + "  ".join(f"{'EVAL ' + NAMES[m]:>10}" for m in METRICS)
        + "  "
        + "  ".join(f"{'TEST ' + NAMES[m]:>10}" for m in METRICS)
        + f"  {'EVAL label IoU':>14}  {'made (label IoU vs truth)':<30}  decision"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        mark = "*" if r.get("final") else " "
        trials = f"{r['trials_ok']}/{r['trials']}" + (f" ({r['trials_failed']}F)" if r.get("trials_failed") else "")
        teacher, truth = _labels(r)
        lines.append(
            f"{r['iteration']:>3}{mark}  {r['train_dataset']:<20} {trials:>9}  "
            + "  ".join(f"{_fmt(r.get('eval_' + m)):>10}" for m in METRICS)
            + "  "
            + "  ".join(f"{_fmt(r.get('test_' + m)):>10}" for m in METRICS)
            + f"  {teacher:>14}  {truth:<30}  {r.get('decision', '')}"
        )
    return lines


def markdown(rows: list[dict], title: str, notes: list[str]) -> str:
    out = [f"# {title}", ""]
    out += notes + [""]
    cols = ["iteration", "train set", "trials (ok/all)", "promoted trial"] + [f"EVAL {NAMES[m]}" for m in METRICS] + [f"TEST {NAMES[m]}" for m in METRICS]
    cols += ["EVAL label IoU (as teacher)", "made (label IoU vs truth)", "decision"]
    out.append("| " + " | ".join(cols) + " |")
    out.append("|" + "---|" * len(cols))
    for r in rows:
        it = f"**{r['iteration']}** (final)" if r.get("final") else str(r["iteration"])
        cells = [it, f"`{r['train_dataset']}`", f"{r['trials_ok']}/{r['trials']}", str(r.get("promoted_trial") or "-")]
        cells += [_fmt(r.get("eval_" + m)) for m in METRICS] + [_fmt(r.get("test_" + m)) for m in METRICS]
        cells += [*_labels(r), r.get("decision", "")]
        out.append("| " + " | ".join(cells) + " |")
    out += [
        "",
        "*EVAL label IoU*: the model used as a teacher refines the EVAL images' boxes (with the rule chosen on EVAL); "
        "IoU over all pixels against their exact masks. *made*: the H<n> it made, label IoU against `truth/` where the dataset keeps one.",
    ]
    return "\n".join(out) + "\n"


MARKERS = {"eval": "o", "test": "s"}
COLOURS = {"eval": "tab:blue", "test": "tab:orange"}


def _series(rows: list[dict], key: str) -> list[float]:
    return [float("nan") if r.get(key) is None else float(r[key]) for r in rows]


def plot(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Small multiples, one panel per metric (EVAL solid, TEST dashed, each axis scaled to its
    own values so no line hides another), and a panel of label quality: each model as a teacher
    on EVAL, the H<n> it made against the truth, and the boxes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(12, 6.4), dpi=100)
    xs = [r["iteration"] for r in rows]
    final = [r["iteration"] for r in rows if r.get("final")]
    panels = [(m, NAMES[m]) for m in METRICS]
    for ax, (m, name) in zip(axes.flat, panels):
        for split, style in (("eval", "-"), ("test", "--")):
            ax.plot(xs, _series(rows, f"{split}_{m}"), style, marker=MARKERS[split], color=COLOURS[split], label=f"{split.upper()} {name}")
        ax.set_title(name, fontsize=10)
        ax.set_ylabel(name, fontsize=8)
    lab = axes.flat[4]
    lab.plot(xs, _series(rows, "eval_label_iou"), "-", marker="D", color="tab:purple", label="as a teacher: EVAL label IoU")
    lab.plot([x + 0.05 for x in xs], _series(rows, "label_hybrid_iou_pixels"), "--", marker="P", color="tab:brown", label="H<n> it made: label IoU vs truth")
    for key, label, colour in (("eval_box_label_iou", "EVAL boxes", "tab:purple"), ("label_box_iou_pixels", "boxes vs truth", "tab:brown")):
        value = next((r[key] for r in rows if r.get(key) is not None), None)
        if value is not None:
            lab.axhline(value, color=colour, ls=":", alpha=0.8, label=f"{label} ({value:.3f})")
    lab.set_title("label quality (IoU over all pixels)", fontsize=10)
    lab.set_ylabel("label IoU", fontsize=8)
    for ax in list(axes.flat)[:5]:
        if final:
            ax.axvline(final[0], color="grey", alpha=0.25, lw=8, label="final model")
        ax.set_xticks(xs)
        ax.set_xlabel("iteration (0 = BASELINE, k = trained on H<k>)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    notes = axes.flat[5]
    notes.axis("off")
    lines = [f"iteration {r['iteration']}{' (final)' if r.get('final') else ''}: {r.get('decision', '')}" for r in rows]
    notes.text(0.0, 1.0, "\n".join(_wrap(line, 58) for line in lines), va="top", fontsize=7, family="monospace", transform=notes.transAxes)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width, subsequent_indent="  ")) or text


def write_report(rows: list[dict], folder: str | Path, title: str, notes: list[str]) -> dict[str, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"md": folder / "report.md", "json": folder / "report.json", "csv": folder / "report.csv", "png": folder / "metrics.png"}
    paths["md"].write_text(markdown(rows, title, notes))
    atomic_write_json(paths["json"], {"title": title, "notes": notes, "iterations": rows})
    buffer = io.StringIO()
    keys = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()})
    paths["csv"].write_text(buffer.getvalue())
    plot(rows, paths["png"], title)
    return paths
