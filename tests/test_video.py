"""bss.video / predict.py --video (issue 23): inspection videos predicted as a stream.

Short videos are written with OpenCV (Motion JPEG in an .avi, which every OpenCV build writes)
from real sewer CCTV frames (../shared/data/coudlabs_sewer, resized small) or, where that folder
is absent, from synthetic frames; a tiny trained checkpoint predicts them. Every expected figure
is recomputed here from the source video decoded independently and the Predictor's own
``predict_image``.
"""

from __future__ import annotations

import csv
import shutil

import cv2
import numpy as np
import pytest
import torch
from conftest import SHARED, run_driver, train_toy_checkpoint
from PIL import Image
from scipy import ndimage

import bss.video as video
from bss.config import from_dict
from bss.errors import BSSError
from bss.inference import Predictor
from bss.training.checkpoint import load_model
from bss.video import FrameRecord, alert_segments, predict_masks, predict_videos

SIZE = (128, 96)  # width, height of the test videos
FPS = 10.0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the figures do not depend on it, and on a shared 2-core machine two
    threads per process only wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, one_thread):
    return train_toy_checkpoint(tmp_path_factory.mktemp("video"))[0]


def source_frames(count: int) -> list[np.ndarray]:
    """``count`` BGR frames of SIZE: real sewer frames where the shared folder is, else synthetic ones
    (dark noise, a bright blob drifting across, as the toy checkpoint learnt)."""
    real = sorted(SHARED.glob("images/*/*.png"))
    if len(real) >= count:
        return [cv2.resize(cv2.imread(str(p)), SIZE, interpolation=cv2.INTER_AREA) for p in real[:count]]
    rng, frames = np.random.default_rng(0), []
    for i in range(count):
        frame = rng.normal(60, 12, size=(SIZE[1], SIZE[0], 3))
        cv2.circle(frame, (10 + 5 * i, SIZE[1] // 2), 8 + i % 7, (190, 190, 190), -1)
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return frames


def write_video(path, frames, fps=FPS):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, SIZE)
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def decoded(path) -> list[np.ndarray]:
    """Every frame OpenCV reads from ``path``, RGB (the test's own, independent decode)."""
    capture, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, bgr = capture.read()
        if not ok:
            return frames
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def timeline(out) -> list[dict]:
    with open(out / "timeline.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def overlay_shape(path) -> tuple[int, int, int, float]:
    """Frames actually decoded, width, height and frame rate of an overlay video, read back with cv2."""
    capture = cv2.VideoCapture(str(path))
    fps = capture.get(cv2.CAP_PROP_FPS)
    count, size = 0, None
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        count, size = count + 1, frame.shape[:2]
    return count, size[1], size[0], fps


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("clip") / "pipe.avi", source_frames(23))


def test_every_frame_in_order_with_its_mask_overlay_and_timeline_row(checkpoint, clip, tmp_path):
    out = tmp_path / "out"
    result = predict_videos(checkpoint, clip, out, masks=True, batch_size=4, progress=False)
    (run,) = result.runs
    frames = decoded(clip)
    assert len(frames) == 23 and run.predicted == 23 and run.stopped_at is None
    rows = timeline(out)
    assert [int(r["frame"]) for r in rows] == list(range(23)) and {r["video"] for r in rows} == {"pipe"}
    assert [float(r["time_s"]) for r in rows] == [round(i / FPS, 3) for i in range(23)]
    assert overlay_shape(run.overlay) == (23, SIZE[0], SIZE[1], pytest.approx(FPS))
    assert sorted(p.name for p in (out / "masks").iterdir()) == [f"pipe_{i:06d}.png" for i in range(23)]
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    fractions = []
    for i, row in enumerate(rows):
        mask = np.asarray(Image.open(out / "masks" / f"pipe_{i:06d}.png")) > 0
        assert np.array_equal(mask, predictor.predict_image(frames[i]) > predictor.config.threshold)  # frame i's own prediction, in order
        assert float(row["defect_fraction"]) == pytest.approx(mask.mean(), abs=5e-7)
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        assert int(row["components"]) == count
        if count:
            largest = 1 + int(np.argmax(ndimage.sum_labels(mask, labels, range(1, count + 1))))
            ys, xs = np.nonzero(labels == largest)
            assert [int(row[k]) for k in ("box_x", "box_y", "box_w", "box_h")] == [xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1]
        fractions.append(mask.mean())
    assert len(set(np.round(fractions, 4))) > 1  # the frames differ, so the figures are not one constant
    assert (out / "timeline.png").stat().st_size > 5000


def test_every_5_and_fps_keep_exactly_every_fifth_frame(checkpoint, clip, tmp_path):
    for name, option in (("every", {"every": 5}), ("fps", {"fps": 2.0})):
        out = tmp_path / name
        (run,) = predict_videos(checkpoint, clip, out, masks=True, progress=False, **option).runs
        assert [int(r["frame"]) for r in timeline(out)] == [0, 5, 10, 15, 20] == [r.frame for r in run.records]
        assert sorted(p.name for p in (out / "masks").iterdir()) == [f"pipe_{i:06d}.png" for i in (0, 5, 10, 15, 20)]
        assert overlay_shape(run.overlay) == (5, SIZE[0], SIZE[1], pytest.approx(FPS / 5))
        every_frame = predict_videos(checkpoint, clip, tmp_path / f"{name}-all", progress=False).runs[0].records
        assert run.records == every_frame[::5]  # the kept frames are predicted as when every frame is


def test_a_truncated_video_is_read_to_its_last_good_frame(checkpoint, tmp_path, capsys):
    whole = write_video(tmp_path / "whole.avi", source_frames(20))
    data = whole.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    readable = len(decoded(cut))
    assert 0 < readable < 20
    (run,) = predict_videos(checkpoint, cut, tmp_path / "out", progress=False).runs
    assert [r.frame for r in run.records] == list(range(readable)) and run.stopped_at == readable
    lines = [line for line in capsys.readouterr().out.splitlines() if "reading stopped" in line]
    assert lines == [
        f"{cut}: reading stopped at frame {readable} of the 20 its header announces (truncated or damaged from there); the frames before it are predicted."
    ]
    assert overlay_shape(run.overlay)[0] == readable
    assert [int(r["frame"]) for r in timeline(tmp_path / "out")] == list(range(readable))


def test_an_unreadable_file_is_one_error_line(checkpoint, tmp_path):
    bad = tmp_path / "survey.mp4"
    bad.write_text("not a video at all\n")
    done = run_driver("predict.py", "--model", checkpoint, "--video", bad, "--out", tmp_path / "out")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"error: {bad}: not a video OpenCV can read (corrupt, or a format its FFmpeg lacks)."]
    assert not (tmp_path / "out").exists()


def test_an_interrupted_run_continues_where_it_stopped(checkpoint, clip, tmp_path, monkeypatch, capsys):
    fresh = tmp_path / "fresh"
    predict_videos(checkpoint, clip, fresh, masks=True, batch_size=4, progress=False)
    out, calls, real = tmp_path / "out", [], video._predict_batch

    def interrupted(job, source, batch, writer):
        calls.append([i for i, _ in batch])
        if len(calls) == 3:  # Ctrl-C (or SIGTERM, which the driver turns into it) during the third batch
            raise KeyboardInterrupt
        return real(job, source, batch, writer)

    monkeypatch.setattr(video, "_predict_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        predict_videos(checkpoint, clip, out, masks=True, batch_size=4, progress=False)
    assert [int(r["frame"]) for r in timeline(out)] == list(range(8))  # flushed per batch: the two done batches are readable
    assert overlay_shape(out / "pipe_overlay.mp4")[0] >= 8  # and the overlay was closed properly
    monkeypatch.setattr(video, "_predict_batch", real)
    calls.clear()
    (run,) = predict_videos(checkpoint, clip, out, masks=True, batch_size=4, progress=False).runs
    assert "pipe.avi: 8 frames already in timeline.csv; continuing after frame 7" in capsys.readouterr().out
    assert run.resumed_after == 7 and run.predicted == 15 and [r.frame for r in run.records] == list(range(23))
    assert (out / "timeline.csv").read_text() == (fresh / "timeline.csv").read_text()
    for path in sorted((fresh / "masks").iterdir()):
        assert path.read_bytes() == (out / "masks" / path.name).read_bytes()
    assert overlay_shape(out / "pipe_overlay.mp4")[:3] == overlay_shape(fresh / "pipe_overlay.mp4")[:3] == (23, SIZE[0], SIZE[1])
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in fresh.iterdir())


def test_a_truncated_timeline_is_continued_without_redoing_its_frames(checkpoint, clip, tmp_path, monkeypatch):
    out = tmp_path / "out"
    predict_videos(checkpoint, clip, out, every=2, batch_size=3, progress=False)
    full = (out / "timeline.csv").read_text()
    lines = full.splitlines(keepends=True)
    (out / "timeline.csv").write_text("".join(lines[:7]) + lines[7][:9])  # 6 rows and a row cut mid-line
    seen = []
    real = video._predict_batch
    monkeypatch.setattr(video, "_predict_batch", lambda job, source, batch, writer: seen.extend(i for i, _ in batch) or real(job, source, batch, writer))
    (run,) = predict_videos(checkpoint, clip, out, every=2, batch_size=3, progress=False).runs
    assert seen == list(range(12, 23, 2)) and run.resumed_after == 10  # frames 0-10 are not predicted again
    assert (out / "timeline.csv").read_text() == full
    assert overlay_shape(run.overlay)[0] == 12


def test_out_is_refused_replaced_or_continued_as_for_images(checkpoint, clip, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(BSSError, match="is not empty; pass --overwrite"):
        predict_videos(checkpoint, clip, out, progress=False)
    with pytest.raises(BSSError, match="holds 'notes.txt', which predict did not write"):
        predict_videos(checkpoint, clip, out, overwrite=True, progress=False)
    (out / "notes.txt").unlink()
    predict_videos(checkpoint, clip, out, every=4, progress=False)
    with pytest.raises(BSSError, match=r"other settings \(every: 4 there, 2 now\)"):
        predict_videos(checkpoint, clip, out, every=2, progress=False)
    result = predict_videos(checkpoint, clip, out, every=4, progress=False)  # finished already: nothing predicted again
    assert result.predicted == 0 and len(result.runs[0].records) == 6
    result = predict_videos(checkpoint, clip, out, every=2, overwrite=True, progress=False)
    assert result.predicted == 12 and [int(r["frame"]) for r in timeline(out)] == list(range(0, 23, 2))


def test_a_folder_of_videos(checkpoint, clip, tmp_path, capsys):
    folder = tmp_path / "survey"
    folder.mkdir()
    shutil.copy(clip, folder / "b.avi")
    write_video(folder / "a.avi", source_frames(7))
    (folder / "notes.txt").write_text("not a video")
    out = tmp_path / "out"
    result = predict_videos(checkpoint, folder, out, every=3, progress=False)
    assert [r.source.name for r in result.runs] == ["a", "b"] and result.predicted == 3 + 8
    assert [(r["video"], int(r["frame"])) for r in timeline(out)] == [("a", i) for i in (0, 3, 6)] + [("b", i) for i in range(0, 23, 3)]
    assert sorted(p.name.split(".")[0] for p in out.iterdir()) == ["a_overlay", "b_overlay", "timeline", "timeline", "video"]
    assert [overlay_shape(r.overlay)[0] for r in result.runs] == [3, 8]
    said = capsys.readouterr().out.splitlines()
    assert len([line for line in said if line.startswith("overlay videos: ")]) == 1  # the codec, said once
    assert [line.split(":")[0] for line in said[-2:]] == ["a.avi", "b.avi"]  # one summary line per video


def test_the_driver(checkpoint, clip, tmp_path):
    out = tmp_path / "out"
    done = run_driver("predict.py", "--model", checkpoint, "--video", clip, "--out", out, "--every", "5", "--masks", "--alert", "0.5", "--quiet")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("overlay videos: ") and lines[-1].startswith(f"5 frames of 1 video(s) -> {out}")
    assert lines[1].startswith("pipe.avi: 5 frames (every 5), ") and "at or above 50%" in lines[1]
    assert [int(r["frame"]) for r in timeline(out)] == [0, 5, 10, 15, 20] and len(list((out / "masks").iterdir())) == 5
    wrong = run_driver("predict.py", "--model", checkpoint, "--images", tmp_path, "--out", tmp_path / "x", "--every", "5")
    assert wrong.returncode == 2 and "--every, --fps and --masks are for --video" in wrong.stderr


def test_a_patch_plan_is_honoured_as_for_images(checkpoint):
    """predict_masks goes through Predictor.probabilities: with a patch plan, sliding windows over
    the planned frame, exactly the masks predict_image (predict.py's path) gives."""
    model, config = load_model(checkpoint)
    torch.manual_seed(0)
    predictor = Predictor(model, from_dict(dict(config.to_dict(), patches={"frame_size": [96, 128]})), device="cpu")
    assert predictor.window == (64, 64) and predictor.input_size == (96, 128)
    frames = [cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in source_frames(3)]
    for frame, mask in zip(frames, predict_masks(predictor, frames, 0.5)):
        assert np.array_equal(mask, predictor.predict_image(frame) > 0.5)


def test_alert_segments():
    def record(frame, fraction):
        return FrameRecord("v", frame, frame / 10, fraction, 1, None)

    records = [record(i, f) for i, f in enumerate([0, 0.02, 0.05, 0.0, 0.01, 0.009, 0.3])]
    assert alert_segments(records, 0.01, 0.1) == [(0.1, pytest.approx(0.3)), (0.4, pytest.approx(0.5)), (0.6, pytest.approx(0.7))]
    assert alert_segments(records, 0.5, 0.1) == []
