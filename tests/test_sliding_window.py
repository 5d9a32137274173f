"""Sliding-window inference and native-resolution figures (issue 19, the inference half).

Real (tiny) torch models throughout, no mocks: a 1x1 convolution predicts each pixel from that
pixel alone, so any window placement must give the whole-frame answer; a constant model checks
that the Gaussian blend is normalised (no seams); a small UNet checks the position-dependent case
and a real patch-plan checkpoint goes through ``predict.py``, the trainer's EVAL and the TEST
evaluation, which must all count the same pixels.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_source_dataset, tiny_config_dict, train_toy_checkpoint

from bss.config import from_dict
from bss.data.io import read_image, read_mask, write_image, write_mask
from bss.data.segmentation_dataset import resize_image
from bss.data.splits import make_splits
from bss.inference import Predictor, frame_probabilities, gaussian_weights, resize_probability, window_starts
from bss.metrics import mask_counts, scores_from_counts
from bss.predict import predict_folder
from bss.search.evaluate import evaluate_checkpoint
from bss.training.checkpoint import load_model
from bss.training.trainer import Trainer

WINDOW = (32, 32)


def pixelwise(bias: float = 0.0, gain: float = 0.0) -> torch.nn.Module:
    """A 1x1 convolution: logit = gain * (red, normalised) + bias; position-independent."""
    conv = torch.nn.Conv2d(3, 1, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0] = gain
        conv.bias.fill_(bias)
    return conv.eval()


def sigmoid_of(model):
    return lambda batch: torch.sigmoid(model(batch))[:, 0]


def patch_config(tmp_path, frame, window=WINDOW, **over):
    cfg = tiny_config_dict(tmp_path, tmp_path, image_size=list(window), patches={"frame_size": list(frame)}, **over)
    return from_dict(cfg)


def whole_config(tmp_path, size, **over):
    return from_dict(tiny_config_dict(tmp_path, tmp_path, image_size=list(size), **over))


@pytest.mark.parametrize("length", [1, 31, 32, 33, 65, 100, 129, 321])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.9])
def test_windows_cover_every_pixel_and_end_flush(length, overlap):
    starts = window_starts(length, 32, overlap)
    stride = max(1, round(32 * (1 - overlap)))
    covered = np.zeros(max(length, 32), bool)
    for start in starts:
        covered[start : start + 32] = True
    assert covered.all() and starts[0] == 0 and starts == sorted(set(starts))
    assert starts[-1] == max(0, length - 32)  # the last window flush with the edge, none past it
    assert all(b - a == stride for a, b in zip(starts[:-2], starts[1:-1]))  # the regular stride up to the flush one
    assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:]))


def test_gaussian_weights_are_nnunets():
    weights = gaussian_weights((32, 48))
    assert weights.shape == (32, 48) and float(weights.max()) == 1.0 and float(weights.min()) > 0
    # sigma = side / 8, centred between the two middle pixels: a pixel 4 sigma off centre on each axis
    assert float(weights[0, 0]) == pytest.approx(math.exp(-0.5 * ((15.5 / 4) ** 2 + (23.5 / 6) ** 2)) / math.exp(-0.5 * ((0.5 / 4) ** 2 + (0.5 / 6) ** 2)))
    assert torch.equal(weights, weights.flip(0)) and torch.equal(weights, weights.flip(1))


@pytest.mark.parametrize("size", [(70, 101), (32, 32), (20, 50), (97, 33)])
def test_constant_model_gives_the_constant_everywhere(size):
    """No seams, no border fall-off: the blend divides by the summed weights (frames smaller than a
    window are padded, and the pad is cropped away)."""
    model = pixelwise(bias=-0.8473)  # sigmoid: ~0.3
    expected = torch.sigmoid(torch.tensor(-0.8473))
    frames = torch.randn(2, 3, *size)
    with torch.no_grad():
        prob = frame_probabilities(sigmoid_of(model), frames, WINDOW, 0.5, batch_size=3)
    assert prob.shape == (2, *size) and prob.dtype == torch.float32
    assert torch.equal(prob, torch.full_like(prob, float(expected)))


@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.75])
@pytest.mark.parametrize("size", [(70, 101), (20, 50), (64, 96)])
def test_pixelwise_model_windowed_is_the_whole_frame(size, overlap):
    """Each pixel's prediction is the same in every window that holds it, so the blend must give
    the whole-frame prediction: a window put in the wrong place, a weight on the wrong pixel or a
    padded pixel leaking in would show."""
    model = pixelwise(bias=0.2, gain=3.0)
    frames = torch.randn(3, 3, *size)
    with torch.no_grad():
        whole = sigmoid_of(model)(frames)
        windowed = frame_probabilities(sigmoid_of(model), frames, WINDOW, overlap, batch_size=5)
    assert torch.allclose(windowed, whole, atol=1e-6, rtol=0)


class BatchRecorder(torch.nn.Module):
    """A model that records the batch size of every forward it makes."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.batches = model, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(int(x.shape[0]))
        return self.model(x)


@pytest.mark.parametrize("batch_size", [3, 8])
def test_windows_go_through_the_network_the_configs_batch_size_at_a_time(tmp_path, batch_size):
    """The Predictor and the trainer's EVAL run sliding windows ``batch_size`` at a time (the
    training batch of that window size), not a fixed 32: 2 frames of 64x96, 32x32 windows half
    overlapping, are 2 x 3 x 5 = 30 windows."""
    config = patch_config(tmp_path, (64, 96), batch_size=batch_size)
    recorder = BatchRecorder(pixelwise(bias=0.1, gain=1.0))
    predictor = Predictor(recorder, config, device="cpu")
    recorder.batches.clear()  # the construction's probe
    frames = torch.randint(0, 255, (2, 64, 96, 3), dtype=torch.uint8)
    prob = predictor.probabilities(frames)
    full, rest = divmod(30, batch_size)
    assert recorder.batches == [batch_size] * full + ([rest] if rest else []) and prob.shape == (2, 64, 96)
    assert predictor.describe()["sliding_window"]["windows_per_batch"] == batch_size
    recorder.batches.clear()
    trainer = SimpleNamespace(model=recorder, runtime=predictor.runtime, config=config)  # the trainer's EVAL, its own method
    assert torch.equal(Trainer.frame_probabilities(trainer, predictor.normalize(frames)).cpu(), prob)
    assert recorder.batches == [batch_size] * full + ([rest] if rest else [])


@pytest.fixture(scope="module")
def unet_checkpoint(tmp_path_factory):
    """A tiny UNet (1 epoch on 64x64 toy frames): a position-dependent model (zero padding, strides)."""
    return train_toy_checkpoint(tmp_path_factory.mktemp("window_unet"))[0]


def _images(folder, sizes, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate(sizes):
        img = rng.integers(20, 80, size=(h, w, 3)).astype(np.uint8)
        img[h // 3 : 2 * h // 3, w // 4 : w // 2 + i] = 230
        paths.append(folder / f"img_{i}.png")
        write_image(paths[-1], img)
    return paths


def test_one_window_covering_the_frame_is_the_whole_frame(unet_checkpoint, tmp_path):
    """A patch config whose window is its frame predicts exactly as the whole-frame config."""
    model, config = load_model(unet_checkpoint)
    windowed = Predictor(model, from_dict(dict(config.to_dict(), patches={"frame_size": [64, 64]})), device="cpu")
    whole = Predictor(model, config, device="cpu")
    assert windowed.window == (64, 64) and whole.window is None and windowed.input_size == whole.input_size == (64, 64)
    paths = _images(tmp_path, [(64, 64), (75, 120), (100, 50)])
    for (_, a), (_, b) in zip(windowed.predict_paths(paths, progress=False), whole.predict_paths(paths, progress=False)):
        assert np.array_equal(a, b)


def test_whole_frame_predictor_is_unchanged(unet_checkpoint, tmp_path):
    """Without patches the Predictor is the code it was before sliding windows: the image resized
    to image_size, normalised, one forward, sigmoid, resized back (the old probabilities(), inline)."""
    model, config = load_model(unet_checkpoint)
    predictor = Predictor(model, config, device="cpu")
    assert predictor.input_size == (64, 64) and predictor.describe()["sliding_window"] is None
    paths = _images(tmp_path, [(64, 64), (75, 120), (100, 50), (31, 200)])
    rgbs = [read_image(path) for path in paths]
    with torch.inference_mode():  # one batch of all four, as predict_paths runs them (batched convolutions round differently)
        x = predictor.normalize(torch.from_numpy(np.stack([resize_image(rgb, 64, 64) for rgb in rgbs])))
        old = torch.sigmoid(predictor.model(x).float())[:, 0].float().cpu().numpy()
    for rgb, before, (_, prob) in zip(rgbs, old, predictor.predict_paths(paths, batch_size=4, progress=False)):
        assert np.array_equal(prob, resize_probability(before, *rgb.shape[:2]))


def test_windowed_unet_blends_its_windows(unet_checkpoint):
    """A position-dependent model: the windowed map is the weighted mean of the windows' own
    predictions, recomputed here window by window (4 windows of 64 on a 64x96 frame at overlap 0.5)."""
    model, _ = load_model(unet_checkpoint)
    frame = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        prob = frame_probabilities(sigmoid_of(model), frame, (64, 64), 0.5)[0].double()
        weights = gaussian_weights((64, 64))
        total, norm = torch.zeros(64, 96, dtype=torch.float64), torch.zeros(64, 96, dtype=torch.float64)
        starts = (0, 32)  # window_starts(96, 64, 0.5); one batch of both, as frame_probabilities runs them
        windows = sigmoid_of(model)(torch.cat([frame[:, :, :, x : x + 64] for x in starts])).double()
        for x, window in zip(starts, windows):
            total[:, x : x + 64] += window * weights
            norm[:, x : x + 64] += weights
    assert torch.allclose(prob, total / norm, atol=1e-6)
    with torch.no_grad():
        whole = sigmoid_of(model)(frame)[0].double()
    assert not torch.allclose(prob, whole, atol=1e-3)  # and it is not the whole-frame forward (the test can fail)


# ---- EVAL at the images' native size ----------------------------------------------------------
FRAME = (64, 96)
NATIVE = {"a": (90, 120), "b": (100, 100), "c": (61, 77)}  # EVAL images of three sizes, none the frame's


@pytest.fixture
def eval_folder(tmp_path):
    """Frames with a bright square (what the pixelwise model finds) and a truth square shifted off it."""
    folder = tmp_path / "evalset"
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    for stem, (h, w) in NATIVE.items():
        img = np.full((h, w, 3), 40, np.uint8)
        img[h // 4 : h // 2, w // 3 : 2 * w // 3] = 220
        truth = np.zeros((h, w), np.uint8)
        truth[h // 4 + 3 : h // 2 + 5, w // 3 - 2 : 2 * w // 3 - 4] = 1
        write_image(folder / "images" / f"{stem}.png", img)
        write_mask(folder / "masks" / f"{stem}.png", truth)
    return folder


def _trainer(tmp_path, folder, cfg_over) -> Trainer:
    cfg = from_dict(tiny_config_dict(tmp_path, tmp_path, train_dataset=str(folder), evaluation_dataset=str(folder), visualization_samples=0, **cfg_over))
    trainer = Trainer(cfg, progress=False)
    trainer.model = pixelwise(bias=-1.0, gain=2.0)  # foreground where the red channel is bright
    return trainer


def hand_eval(folder, frame) -> dict:
    """The figures by hand: each image resized to the frame, the pixelwise model, sigmoid, the
    probability resized back to the image's size, thresholded, counted against the native mask."""
    model, counts = pixelwise(bias=-1.0, gain=2.0), []
    for stem in NATIVE:
        rgb, truth = read_image(folder / "images" / f"{stem}.png"), read_mask(folder / "masks" / f"{stem}.png")
        x = (resize_image(rgb, *frame).astype(np.float32) / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
        with torch.no_grad():
            prob = torch.sigmoid(model(torch.from_numpy(x.transpose(2, 0, 1)[None].astype(np.float32))))[0, 0].numpy()
        counts.append(mask_counts(resize_probability(prob, *truth.shape) > 0.5, truth))
    counts = torch.tensor(counts)
    micro = {k: float(v) for k, v in scores_from_counts(counts.sum(0)).items()}
    return dict(micro, iou_per_image=float(scores_from_counts(counts)["iou"].mean()), pixels=int(counts.sum()))


@pytest.mark.parametrize("plan", ["whole", "patches"])
def test_eval_is_counted_at_each_images_native_size(plan, eval_folder, tmp_path, monkeypatch):
    """Both plans (the whole 64x96 frame, or 32x32 windows over it) give the hand figures, counted
    on every native pixel, not the frame's; and they differ from the figures at the frame size."""
    monkeypatch.setenv("BSS_CACHE_DIR", str(tmp_path / "cache"))
    over = {"image_size": [32, 32], "patches": {"frame_size": list(FRAME)}} if plan == "patches" else {"image_size": list(FRAME)}
    trainer = _trainer(tmp_path, eval_folder, over)
    assert (trainer.eval_set.height, trainer.eval_set.width) == FRAME
    scores, hand = trainer.evaluate(), hand_eval(eval_folder, FRAME)
    assert hand["pixels"] == sum(h * w for h, w in NATIVE.values())
    for key in ("iou", "dice", "recall", "precision", "iou_per_image"):
        assert scores[key] == pytest.approx(hand[key], abs=1e-9), key
    assert 0.2 < scores["iou"] < 0.9  # a figure with errors on both sides, so counting matters
    at_frame = sum((np.asarray(mask_counts(*_frame_pair(eval_folder, stem))) for stem in NATIVE), np.zeros(4, np.int64))
    assert float(scores_from_counts(torch.from_numpy(at_frame))["iou"]) != pytest.approx(scores["iou"], abs=1e-4)


def _frame_pair(folder, stem):
    """(prediction, truth) at the frame size: what EVAL counted before (masks resized nearest)."""
    import cv2

    truth = cv2.resize(read_mask(folder / "masks" / f"{stem}.png"), FRAME[::-1], interpolation=cv2.INTER_NEAREST)
    rgb = resize_image(read_image(folder / "images" / f"{stem}.png"), *FRAME)
    x = torch.from_numpy(((rgb.astype(np.float32) / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).transpose(2, 0, 1)[None].astype(np.float32))
    with torch.no_grad():
        pred = torch.sigmoid(pixelwise(bias=-1.0, gain=2.0)(x))[0, 0].numpy() > 0.5
    return pred, truth


# ---- a patch-plan checkpoint, end to end ----------------------------------------------------------
@pytest.fixture(scope="module")
def patch_run(tmp_path_factory):
    """A tiny patch-plan run: 90x120 frames resized to 64x96, 32x32 patches, a few steps."""
    tmp = tmp_path_factory.mktemp("window_patch")
    root = tmp / "datasets"
    make_source_dataset(root, size=(90, 120))
    make_splits("toy", root, progress=False)
    over = {"epochs": 2, "batch_size": 2, "image_size": [32, 32], "patches": {"frame_size": [64, 96], "foreground": 0.5}, "visualization_samples": 1}
    result = Trainer(from_dict(tiny_config_dict(root, tmp, **over)), progress=False).fit()
    return result, root


def test_patch_checkpoint_predicts_at_native_size_through_predict(patch_run, tmp_path):
    result, root = patch_run
    images = tmp_path / "new"
    paths = _images(images, [(90, 120), (57, 200), (20, 30)])  # the last smaller than one window at any scale
    out = predict_folder(result.checkpoint, images, tmp_path / "out", probabilities=True, progress=False)
    summary = json.loads((out.out / "predictions.json").read_text())
    assert summary["inference"]["input_size"] == [64, 96]
    assert summary["inference"]["sliding_window"]["window"] == [32, 32]
    predictor = Predictor.from_checkpoint(result.checkpoint, device="cpu")
    # the maps are the blend of windows over the 64x96 frames, resized back to each image's size;
    # the reference batches the windows as the predictor does (the 3 frames in one loaded batch,
    # the config's batch_size, 2, windows at a time): a CPU convolution's float rounding depends
    # on the batch it runs in
    x = predictor.normalize(torch.stack([torch.from_numpy(resize_image(read_image(path), 64, 96)) for path in paths]))
    with torch.inference_mode():
        frames = frame_probabilities(sigmoid_of(predictor.model), x, (32, 32), 0.5, batch_size=predictor.config.batch_size).numpy()
    for (path, prob), frame in zip(predictor.predict_paths(paths, progress=False), frames):
        mask = read_mask(out.out / "masks" / f"{path.stem}.png")
        assert mask.shape == read_image(path).shape[:2] == prob.shape
        assert np.array_equal(mask > 0, prob > predictor.config.threshold)
        assert np.allclose(prob, resize_probability(frame, *prob.shape), atol=1e-6)


def test_eval_and_test_figures_are_the_predictors(patch_run):
    """The trainer's best EVAL figure and evaluate_checkpoint (TEST's path, the Predictor) on the
    same split agree: both windows over the frame, both counted at the native 90x120."""
    result, root = patch_run
    best = evaluate_checkpoint(result.checkpoint, "toy_EVAL", root)
    assert best["iou"] == pytest.approx(result.best_metrics["iou"], abs=1e-3)
    assert best["recall"] == pytest.approx(result.best_metrics["recall"], abs=1e-3)
    assert (result.checkpoint.parent / "overlays.png").is_file()


def test_teacher_and_hybrid_predict_by_windows_too(patch_run):
    """The teacher's EVAL measurement and make_hybrid go through the same Predictor: the raw
    prediction's EVAL IoU is evaluate_checkpoint's, and the H1 manifest records the windows."""
    from bss.hybrid import make_hybrid
    from bss.hybrid.teacher_quality import measure_teacher

    result, root = patch_run
    quality = measure_teacher(result.checkpoint, "toy", root, device="cpu")
    assert quality.raw_iou_pixels == pytest.approx(evaluate_checkpoint(result.checkpoint, "toy_EVAL", root)["iou"], abs=1e-12)
    hybrid = make_hybrid("toy", result.checkpoint, root, progress=False, device="cpu")
    assert hybrid.manifest["inference"]["sliding_window"]["window"] == [32, 32] and hybrid.manifest["inference"]["input_size"] == [64, 96]
    assert {read_mask(p).shape for p in (hybrid.path / "masks").iterdir()} == {(90, 120)}
