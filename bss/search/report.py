"""The loop's final report: a table of iterations (EVAL and TEST IoU, Dice, Recall, Precision)
as Markdown, CSV and JSON, and a PNG plot of the metrics per iteration."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from bss.search.state import atomic_write_json

METRICS = ("iou", "dice", "recall", "precision")
NAMES = {"iou": "IoU", "dice": "Dice", "recall": "Recall", "precision": "Precision"}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def table_lines(rows: list[dict]) -> list[str]:
    """A fixed-width text table (console)."""
    head = f"{'iter':>4}  {'train set':<22} {'trials':>10}  " + "  ".join(f"{'EVAL ' + NAMES[m]:>14}" for m in METRICS) + "  " + "  ".join(f"{'TEST ' + NAMES[m]:>14}" for m in METRICS) + "  decision"
    lines = [head, "-" * len(head)]
    for r in rows:
        mark = "*" if r.get("final") else " "
        trials = f"{r['trials_ok']}/{r['trials']}" + (f" ({r['trials_failed']}F)" if r.get("trials_failed") else "")
        lines.append(
            f"{r['iteration']:>3}{mark}  {r['train_dataset']:<22} {trials:>10}  "
            + "  ".join(f"{_fmt(r.get('eval_' + m)):>14}" for m in METRICS)
            + "  "
            + "  ".join(f"{_fmt(r.get('test_' + m)):>14}" for m in METRICS)
            + f"  {r.get('decision', '')}"
        )
    return lines


def markdown(rows: list[dict], title: str, notes: list[str]) -> str:
    out = [f"# {title}", ""]
    out += notes + [""]
    cols = ["iteration", "train set", "trials (ok/all)", "promoted trial"] + [f"EVAL {NAMES[m]}" for m in METRICS] + [f"TEST {NAMES[m]}" for m in METRICS] + ["decision"]
    out.append("| " + " | ".join(cols) + " |")
    out.append("|" + "---|" * len(cols))
    for r in rows:
        it = f"**{r['iteration']}** (final)" if r.get("final") else str(r["iteration"])
        cells = [it, f"`{r['train_dataset']}`", f"{r['trials_ok']}/{r['trials']}", str(r.get("promoted_trial") or "-")]
        cells += [_fmt(r.get("eval_" + m)) for m in METRICS] + [_fmt(r.get("test_" + m)) for m in METRICS] + [r.get("decision", "")]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """EVAL (solid) and TEST (dashed) metrics against the iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    xs = [r["iteration"] for r in rows]
    colours = {"iou": "tab:blue", "dice": "tab:orange", "recall": "tab:green", "precision": "tab:red"}
    for m in METRICS:
        for split, style in (("eval", "-"), ("test", "--")):
            ys = [r.get(f"{split}_{m}") for r in rows]
            if any(y is not None for y in ys):
                ax.plot(xs, [float("nan") if y is None else y for y in ys], style, marker="o", color=colours[m], label=f"{split.upper()} {NAMES[m]}")
    final = [r["iteration"] for r in rows if r.get("final")]
    if final:
        ax.axvline(final[0], color="grey", alpha=0.4, lw=6, label="final model")
    ax.set_xlabel("iteration (0 = BASELINE, k = trained on H<k>)")
    ax.set_xticks(xs)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


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
