"""Predict inspection videos frame by frame with a trained checkpoint.

    result = predict_videos("runs/train/best.pt", "survey.mp4", "predictions/", every=5)

Frames are read with OpenCV as a stream (never the whole video in memory), every ``every``-th one
kept (frame 0, every, 2 every, ...), and predicted in batches through the same
:class:`~bss.inference.Predictor` as ``predict.py``'s images (``Predictor.probabilities``: the
checkpoint's frame, patch plan and sliding windows, resized back to the frame, thresholded at the
checkpoint's threshold). For each video ``<name>`` (a file, or every video of a folder), ``out``
receives::

    <name>_overlay.mp4        the kept frames, defect tinted red, frame number and time burned in,
                              at the source's rate / every (H.264 where OpenCV has it, else
                              MPEG-4 part 2, else Motion JPEG in an .avi; said once)
    masks/<name>_<frame>.png  0/255 at the frame's size (masks=True; frame zero-padded to 6 digits)
    timeline.csv              one row per kept frame: video, frame, time_s, defect_fraction,
                              components, box_x, box_y, box_w, box_h (the largest component)
    timeline.png              the defect fraction along each recording, the stretches at or above
                              ``alert`` shaded: where a reviewer should look
    video.json                the settings a rerun must match to continue; the finished videos
                              and their row counts (one with fewer rows in timeline.csv is continued)

``timeline.csv`` is flushed after every batch and the overlay writer is closed on an interruption
(Ctrl-C, SIGTERM), so what is done stays readable; the same call again continues after the last
frame of ``timeline.csv`` (the overlay's frames so far are copied into a new file, then the rest is
appended). A video cut short (a truncated or corrupt file) is read up to its last good frame and
one line names where reading stopped; a file OpenCV cannot read at all is a :class:`BSSError`.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from bss.console import say
from bss.data.io import atomic_write_json, write_mask
from bss.data.segmentation_dataset import resize_image
from bss.errors import BSSError, DatasetError
from bss.inference import Predictor, resize_probability
from bss.predict import check_out
from bss.visualization import PRED_COLOUR, tint

os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # FFmpeg's own lines (a codec it lacks, a damaged packet): the reader reports instead
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".ts", ".mts", ".flv")
# (fourcc, file suffix, name): tried in this order for the overlay
CODECS = (("avc1", ".mp4", "H.264"), ("mp4v", ".mp4", "MPEG-4 part 2"), ("MJPG", ".avi", "Motion JPEG"))
TIMELINE = "timeline.csv"
SETTINGS = "video.json"
FIELDS = ("video", "frame", "time_s", "defect_fraction", "components", "box_x", "box_y", "box_w", "box_h")


@dataclass(frozen=True)
class VideoSource:
    """A video file as its container describes it (``frames`` 0: not announced)."""

    path: Path
    fps: float
    frames: int
    width: int
    height: int

    @property
    def name(self) -> str:
        return self.path.stem


@dataclass(frozen=True)
class FrameRecord:
    """One row of ``timeline.csv``: a kept frame's defect figures (``box``: x, y, w, h of the largest
    8-connected component, None for a clean frame)."""

    video: str
    frame: int
    time: float
    fraction: float
    components: int
    box: tuple[int, int, int, int] | None

    def row(self) -> list:
        return [self.video, self.frame, f"{self.time:.3f}", f"{self.fraction:.6f}", self.components, *(self.box or ("", "", "", ""))]

    @classmethod
    def from_row(cls, row: dict) -> "FrameRecord":
        box = tuple(int(row[k]) for k in FIELDS[5:]) if row["box_x"] != "" else None
        return cls(row["video"], int(row["frame"]), float(row["time_s"]), float(row["defect_fraction"]), int(row["components"]), box)


@dataclass(frozen=True)
class Settings:
    """What a rerun must share with the run it continues (``video.json``)."""

    checkpoint: str
    threshold: float
    every: int | None
    fps: float | None
    masks: bool
    tta: bool
    videos: list[str]

    def step(self, source: VideoSource) -> int:
        """Keep every how many frames of ``source``: ``every``, or the source's rate over ``fps``."""
        return max(1, int(round(source.fps / self.fps))) if self.fps else int(self.every or 1)


@dataclass
class VideoRun:
    """One video's outcome: its records (earlier runs' ones included), the frames of them this call
    predicted, the frame after which it resumed, and where a damaged file stopped being readable."""

    source: VideoSource
    overlay: Path | None
    every: int
    records: list[FrameRecord] = field(default_factory=list)
    predicted: int = 0
    resumed_after: int | None = None
    stopped_at: int | None = None


@dataclass
class VideoResult:
    out: Path
    runs: list[VideoRun]
    codec: str | None
    seconds: float

    @property
    def predicted(self) -> int:
        return sum(r.predicted for r in self.runs)


# ------------------------------------------------------------------------------ reading
def list_videos(path: str | Path) -> list[Path]:
    """``path`` itself (a file), or the videos of a folder (not recursive), sorted."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"--video {path} not found.")
    if path.is_file():
        return [path]
    videos = [p for p in sorted(path.iterdir()) if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES and not p.name.startswith(".")]
    if not videos:
        raise DatasetError(f"{path}: no videos ({', '.join(VIDEO_SUFFIXES)}) to predict.")
    stems = [p.stem for p in videos]
    clash = next((s for s in stems if stems.count(s) > 1), None)
    if clash:
        raise DatasetError(f"{path}: two videos share the name {clash!r}, so their outputs would collide; rename one.")
    return videos


def check_video(path: Path) -> VideoSource:
    """What ``path``'s container says, once its first frame decodes; refused by name otherwise."""
    capture, source = open_video(path, warn=False)
    try:
        if not capture.grab():
            raise DatasetError(f"{path}: no frame of it can be decoded (an empty, corrupt or unsupported video).")
    finally:
        capture.release()
    return source


def open_video(path: Path, warn: bool = True) -> tuple[cv2.VideoCapture, VideoSource]:
    """An open capture and what its container says; a file OpenCV cannot open is refused by name.
    A missing frame rate is taken as 25 frames/s (``warn``: said in one line)."""
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise DatasetError(f"{path}: not a video OpenCV can read (corrupt, or a format its FFmpeg lacks).")
    fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
    frames = max(0, int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0))
    width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    if width <= 0 or height <= 0:
        capture.release()
        raise DatasetError(f"{path}: not a video OpenCV can read (no frame size).")
    if not 0.0 < fps < 1000.0:
        if warn:
            say(f"{path.name}: the file gives no frame rate; times assume 25 frames/s.")
        fps = 25.0
    return capture, VideoSource(path, fps, frames, width, height)


def read_frames(capture: cv2.VideoCapture, source: VideoSource, every: int, after: int, run: VideoRun) -> Iterator[tuple[int, np.ndarray]]:
    """``(frame number, RGB frame)`` of every ``every``-th frame after frame ``after``, one at a time
    (frames before ``after`` and between kept ones are only grabbed, not converted). Where reading
    fails before the frame count the container announces, ``run.stopped_at`` is the frame."""
    index = 0
    while True:
        keep = index > after and index % every == 0
        ok = capture.grab()
        if ok and keep:
            ok, bgr = capture.retrieve()
        if not ok:
            if index < source.frames:
                run.stopped_at = index
            return
        if keep:
            yield index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        index += 1


def batched(frames: Iterator[tuple[int, np.ndarray]], size: int) -> Iterator[list[tuple[int, np.ndarray]]]:
    batch = []
    for item in frames:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ------------------------------------------------------------------------------ predicting
def predict_masks(predictor: Predictor, frames: list[np.ndarray], threshold: float) -> list[np.ndarray]:
    """Boolean masks of RGB frames (any size), as ``predict.py`` makes them for images: resized to
    the predictor's input, ``Predictor.probabilities`` (windows for a patch plan), back to the
    frame's size, thresholded."""
    height, width = predictor.input_size
    inputs = torch.from_numpy(np.stack([resize_image(f, height, width) for f in frames]))
    probs = predictor.probabilities(inputs).numpy()
    return [resize_probability(p, f.shape[0], f.shape[1]) > threshold for p, f in zip(probs, frames)]


def measure(mask: np.ndarray) -> tuple[float, int, tuple[int, int, int, int] | None]:
    """Defect pixel fraction, number of 8-connected components, the largest one's (x, y, w, h)."""
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return 0.0, 0, None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = (int(v) for v in stats[largest, :4])
    return float(mask.mean()), count - 1, (x, y, w, h)


def clock(seconds: float) -> str:
    minutes, rest = divmod(seconds, 60.0)
    return f"{int(minutes)}:{rest:05.2f}"


def overlay_frame(rgb: np.ndarray, mask: np.ndarray, record: FrameRecord) -> np.ndarray:
    """The BGR overlay frame: defect tinted, frame number, time and defect share burned in top left."""
    image = cv2.cvtColor(tint(rgb, mask, PRED_COLOUR), cv2.COLOR_RGB2BGR)
    text = f"frame {record.frame}  {clock(record.time)}  defect {100 * record.fraction:.1f}%"
    scale = max(0.35, rgb.shape[1] / 1000.0)
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    cv2.rectangle(image, (0, 0), (w + 8, h + base + 8), (0, 0, 0), -1)
    cv2.putText(image, text, (4, h + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return image


# ------------------------------------------------------------------------------ writing
class OverlayWriter:
    """The overlay video: the first codec of :data:`CODECS` this OpenCV build can write (``codec``
    fixes it); closed on leaving the ``with`` block, however it is left."""

    def __init__(self, stem: Path, fps: float, size: tuple[int, int], codec: str | None = None):
        self.writer, self.path, self.codec = None, None, None
        for fourcc, suffix, name in CODECS:
            if codec is not None and fourcc != codec:
                continue
            writer = cv2.VideoWriter(str(stem) + suffix, cv2.VideoWriter_fourcc(*fourcc), fps, size)
            if writer.isOpened():
                self.writer, self.path, self.codec, self.name = writer, Path(str(stem) + suffix), fourcc, name
                return
            writer.release()
            Path(str(stem) + suffix).unlink(missing_ok=True)
        raise BSSError(f"this OpenCV build cannot write any of the codecs {', '.join(c[0] for c in CODECS)}; install opencv-python-headless from PyPI.")

    def write(self, bgr: np.ndarray) -> None:
        self.writer.write(bgr)

    def __enter__(self) -> "OverlayWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.writer.release()


def copy_frames(path: Path, writer: OverlayWriter, count: int) -> int:
    """Copy the first ``count`` frames of the video ``path`` into ``writer``; the number copied."""
    capture, copied = cv2.VideoCapture(str(path)), 0
    while copied < count:
        ok, bgr = capture.read()
        if not ok:
            break
        writer.write(bgr)
        copied += 1
    capture.release()
    return copied


class Timeline:
    """``timeline.csv``: rewritten with the rows kept from an earlier run, then appended to and
    flushed batch by batch."""

    def __init__(self, path: Path, kept: list[FrameRecord]):
        self.file = open(path, "w", newline="")
        self.csv = csv.writer(self.file)
        self.csv.writerow(FIELDS)
        self.add(kept)

    def add(self, records: list[FrameRecord]) -> None:
        self.csv.writerows(r.row() for r in records)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_timeline(path: Path) -> list[FrameRecord]:
    """The complete rows of a ``timeline.csv`` (a last line cut by a kill is dropped)."""
    records = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                records.append(FrameRecord.from_row(row))
            except (KeyError, TypeError, ValueError):
                break
    return records


# ------------------------------------------------------------------------------ the timeline picture
def alert_segments(records: list[FrameRecord], alert: float, step: float) -> list[tuple[float, float]]:
    """(start, end) in seconds of each run of kept frames whose defect fraction is at least
    ``alert``; a stretch ends ``step`` seconds (one kept frame) after its last frame."""
    segments, start, last = [], None, None
    for record in records:
        if record.fraction >= alert:
            start = record.time if start is None else start
            last = record.time
        elif start is not None:
            segments.append((start, last + step))
            start = None
    if start is not None:
        segments.append((start, last + step))
    return segments


def plot_timeline(runs: list[VideoRun], alert: float, path: Path) -> Path:
    """``timeline.png``: one panel per video, the defect fraction (%) against time, the alert line,
    the stretches at or above it shaded and, for a damaged file, where reading stopped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.4 * len(runs) + 0.4), dpi=100, squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        step = run.every / run.source.fps
        segments = alert_segments(run.records, alert, step)
        ax.plot([r.time for r in run.records], [100 * r.fraction for r in run.records], color="tab:red", lw=1.2, label="defect pixels")
        ax.axhline(100 * alert, color="grey", ls="--", lw=0.8, label=f"alert {100 * alert:g}%")
        for start, end in segments:
            ax.axvspan(start, end, color="tab:red", alpha=0.15, lw=0)
        if run.stopped_at is not None:
            ax.axvline(run.stopped_at / run.source.fps, color="black", ls=":", lw=1, label=f"reading stopped (frame {run.stopped_at})")
        duration = max(run.source.frames / run.source.fps, run.records[-1].time + step if run.records else 0.0)
        ax.set_xlim(0, max(duration, step))
        ax.set_ylim(bottom=0)
        ax.set_ylabel("defect pixels (%)", fontsize=8)
        ax.set_title(f"{run.source.path.name}: {len(segments)} stretch(es) at or above {100 * alert:g}% (shaded)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("time in the recording (s)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ the output folder
def _not_video_output(out: Path) -> str | None:
    """The first entry of ``out`` a previous video prediction did not write (for ``check_out``)."""
    for entry in sorted(out.iterdir()):
        ours = entry.name in (TIMELINE, "timeline.png", SETTINGS) or (entry.is_file() and "_overlay." in entry.name)
        if entry.name == "masks" and entry.is_dir():
            ours = all(p.suffix == ".png" for p in entry.iterdir())
        if not ours:
            return repr(entry.name)
    if not (out / SETTINGS).is_file():
        return f"files but no {SETTINGS} (so not a previous video prediction)"
    return None


def _clear(out: Path) -> None:
    """Remove a previous video prediction's files (``_not_video_output`` found nothing else)."""
    import shutil

    for entry in out.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _write_state(out: Path, settings: Settings, finished: dict[str, int], extra: dict) -> None:
    atomic_write_json(out / SETTINGS, {**asdict(settings), "finished": finished, **extra})


def _prepare_out(out: Path, video: Path, settings: Settings, overwrite: bool) -> tuple[list[FrameRecord], dict[str, int]] | None:
    """The records and finished videos of an earlier run of the same settings to continue, or None
    (a fresh start: ``out`` checked as ``predict.py`` checks it, an earlier prediction cleared with
    ``overwrite``). An earlier run with other settings is refused unless ``overwrite``."""
    state = out / SETTINGS
    if not overwrite and out.is_dir() and state.is_file():
        try:
            previous = json.loads(state.read_text())
        except ValueError:
            previous = None
        if isinstance(previous, dict):
            mine = asdict(settings)
            differ = [key for key in mine if previous.get(key) != mine[key]]
            if differ:
                key = differ[0]
                raise BSSError(
                    f"--out {out} holds a video prediction with other settings ({key}: {previous.get(key)!r} there, {mine[key]!r} now), so it cannot be continued; pass --overwrite to replace it, or choose another folder."
                )
            records = read_timeline(out / TIMELINE) if (out / TIMELINE).is_file() else []
            finished = previous.get("finished") if isinstance(previous.get("finished"), dict) else {}
            counts = {name: sum(r.video == Path(name).stem for r in records) for name in finished}
            return records, {name: rows for name, rows in finished.items() if counts[name] == rows}  # fewer rows: continued
    check_out(out, video, overwrite, _not_video_output, what="video")
    if overwrite and out.is_dir():
        _clear(out)
    return None


# ------------------------------------------------------------------------------ one video, all videos
@dataclass
class Job:
    """What every video of one call shares; ``codec`` is the overlay codec, chosen at the first video."""

    predictor: Predictor
    out: Path
    settings: Settings
    batch_size: int
    progress: bool
    codec: str | None = None


def _previous_overlay(stem: Path) -> Path | None:
    """An earlier run's overlay of this video, renamed aside (``<name>_overlay.previous.mp4``) so
    the new one can be written under its name; a copy left aside by an interrupted resume wins."""
    for suffix in dict.fromkeys(c[1] for c in CODECS):
        aside, current = Path(f"{stem}.previous{suffix}"), Path(f"{stem}{suffix}")
        if aside.exists():
            current.unlink(missing_ok=True)
            return aside
        if current.exists():
            current.rename(aside)
            return aside
    return None


def _start_overlay(job: Job, source: VideoSource, every: int, kept: list[FrameRecord]) -> tuple[OverlayWriter, list[FrameRecord]]:
    """The overlay writer, holding the earlier run's frames of ``kept`` already; the records of
    ``kept`` whose overlay frames it could copy (an overlay cut short by a kill holds fewer)."""
    stem = job.out / f"{source.name}_overlay"
    previous = _previous_overlay(stem)
    writer = OverlayWriter(stem, source.fps / every, (source.width, source.height), job.codec)
    if job.codec is None:
        job.codec = writer.codec
        fallback = (
            ""
            if writer.codec == CODECS[0][0]
            else f" ({CODECS[0][2]} is not in this OpenCV build; for a browser re-encode with: ffmpeg -i IN -c:v libx264 OUT.mp4)"
        )
        say(f"overlay videos: {writer.name} ({writer.codec}), {writer.path.suffix}{fallback}")
    copied = copy_frames(previous, writer, len(kept)) if previous is not None and kept else 0
    if previous is not None:
        previous.unlink()
    return writer, kept[:copied]


def _predict_batch(job: Job, source: VideoSource, batch: list[tuple[int, np.ndarray]], writer: OverlayWriter) -> list[FrameRecord]:
    masks = predict_masks(job.predictor, [rgb for _, rgb in batch], job.settings.threshold)
    records = []
    for (index, rgb), mask in zip(batch, masks):
        record = FrameRecord(source.name, index, index / source.fps, *measure(mask))
        writer.write(overlay_frame(rgb, mask, record))
        if job.settings.masks:
            write_mask(job.out / "masks" / f"{source.name}_{index:06d}.png", mask)
        records.append(record)
    return records


def predict_video(job: Job, path: Path, kept: list[FrameRecord], earlier: list[FrameRecord]) -> VideoRun:
    """Predict one video into ``job.out`` after the frames of ``kept`` (an earlier run's records of
    it); ``earlier``: the records of the videos before it, kept in ``timeline.csv``."""
    capture, source = open_video(path)
    try:
        every = job.settings.step(source)
        writer, resumed = _start_overlay(job, source, every, kept)
        run = VideoRun(source, writer.path, every, list(resumed), resumed_after=resumed[-1].frame if resumed else None)
        if kept:
            held = "" if len(resumed) == len(kept) else f" (its overlay holds {len(resumed)} of them)"
            where = f"continuing after frame {resumed[-1].frame}" if resumed else "starting it over"
            say(f"{path.name}: {len(kept)} frames already in {TIMELINE}{held}; {where}")
        timeline = Timeline(job.out / TIMELINE, earlier + resumed)
        total = -(-source.frames // every) if source.frames else None
        bar = tqdm(total=total, initial=len(resumed), desc=source.name, unit="frame", disable=not job.progress, leave=False)
        try:
            with writer:
                frames = read_frames(capture, source, every, run.resumed_after if resumed else -1, run)
                for batch in batched(frames, job.batch_size):
                    records = _predict_batch(job, source, batch, writer)
                    timeline.add(records)
                    run.records += records
                    run.predicted += len(records)
                    bar.update(len(records))
        finally:
            bar.close()
            timeline.close()
    finally:
        capture.release()
    if run.stopped_at is not None:
        say(
            f"{path}: reading stopped at frame {run.stopped_at} of the {source.frames} its header announces (truncated or damaged from there); the frames before it are predicted."
        )
    return run


def _finished_run(path: Path, records: list[FrameRecord], settings: Settings, out: Path) -> VideoRun:
    capture, source = open_video(path, warn=False)
    capture.release()
    overlay = next((p for p in sorted(out.glob(f"{source.name}_overlay.*")) if ".previous." not in p.name), None)
    return VideoRun(source, overlay, settings.step(source), [r for r in records if r.video == source.name])


def _summary(run: VideoRun, alert: float) -> str:
    segments = alert_segments(run.records, alert, run.every / run.source.fps)
    shown = ", ".join(f"{clock(a)}-{clock(b)}" for a, b in segments[:6]) + (", ..." if len(segments) > 6 else "")
    return f"{run.source.path.name}: {len(run.records)} frames (every {run.every}), {len(segments)} stretch(es) at or above {100 * alert:g}%" + (
        f": {shown}" if segments else ""
    )


def predict_videos(
    checkpoint: str | Path,
    video: str | Path,
    out: str | Path,
    every: int | None = None,
    fps: float | None = None,
    masks: bool = False,
    alert: float = 0.01,
    overwrite: bool = False,
    threshold: float | None = None,
    batch_size: int = 8,
    device: str = "auto",
    tta: bool = False,
    progress: bool = True,
) -> VideoResult:
    """Predict the video ``video`` (or each video of the folder ``video``) into ``out`` (see the
    module); an earlier, interrupted call with the same settings is continued."""
    start = time.perf_counter()
    paths, out = list_videos(video), Path(out)
    for path in paths:
        check_video(path)  # a file that is no video stops the call before anything is loaded or written
    if (every is not None and every < 1) or (fps is not None and fps <= 0) or (every and fps):
        raise BSSError("keep frames with --every N (a whole number from 1) or --fps F (above 0), not both.")
    predictor = Predictor.from_checkpoint(checkpoint, device=device, tta=tta)
    threshold = predictor.config.threshold if threshold is None else float(threshold)
    if not 0.0 < threshold < 1.0:
        raise BSSError(f"--threshold must be between 0 and 1, got {threshold}.")
    settings = Settings(str(Path(checkpoint).resolve()), threshold, None if fps else int(every or 1), fps, bool(masks), bool(tta), [p.name for p in paths])
    earlier = _prepare_out(out, Path(video), settings, overwrite)
    done, finished = earlier if earlier is not None else ([], {})
    (out / "masks" if masks else out).mkdir(parents=True, exist_ok=True)
    extra = {"inference": predictor.describe()}
    _write_state(out, settings, finished, extra)
    job, runs = Job(predictor, out, settings, batch_size, progress), []
    try:
        for path in paths:
            if path.name in finished:
                runs.append(_finished_run(path, done, settings, out))
                continue
            before = [r for run in runs for r in run.records]
            runs.append(predict_video(job, path, [r for r in done if r.video == path.stem], before))
            finished[path.name] = len(runs[-1].records)
            _write_state(out, settings, finished, extra)
    except KeyboardInterrupt:
        say(f"interrupted: {out / TIMELINE} holds the frames done so far; the same command continues from there.")
        raise
    if earlier is not None and all(r.predicted == 0 for r in runs):
        say(f"{out}: every video was already predicted; pass --overwrite to predict again.")
    plot_timeline(runs, alert, out / "timeline.png")
    for run in runs:
        say(_summary(run, alert))
    return VideoResult(out, runs, job.codec, time.perf_counter() - start)


__all__ = ["FrameRecord", "Settings", "VideoResult", "VideoRun", "VideoSource", "list_videos", "predict_videos", "read_timeline"]
