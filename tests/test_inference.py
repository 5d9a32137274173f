"""bss.inference: probabilities exactly as training preprocessed, batched, streamed, clean errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config_dict, train_toy_checkpoint

from bss.config import from_dict
from bss.data.io import read_image, write_image
from bss.data.segmentation_dataset import SegmentationDataset, resize_image, to_tensor
from bss.errors import BSSError
from bss.inference import ImageFolderDataset, Predictor
from bss.training.checkpoint import load_model, read_checkpoint


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny checkpoint (1 epoch) and the dataset root it was trained on."""
    return train_toy_checkpoint(tmp_path_factory.mktemp("inference"))


def _odd_images(folder, sizes, seed=0):
    """Images of several sizes (none the model's 64x64), with a bright blob so outputs vary."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate(sizes):
        img = rng.integers(30, 90, size=(h, w, 3)).astype(np.uint8)
        img[h // 4 : h // 2, w // 3 : w // 2 + i] = 220
        paths.append(folder / f"odd_{i}.png")
        write_image(paths[-1], img)
    return paths


def test_probabilities_match_the_training_preprocessing(teacher, tmp_path):
    checkpoint, root = teacher
    model, config = load_model(checkpoint)
    predictor = Predictor(model, config, device="cpu")
    # at the training size: the predictor's model input is the SegmentationDataset's tensor
    dataset = SegmentationDataset(root / "toy_EVAL", (64, 64), cache=False)
    image, _ = dataset[0]
    ours = predictor.normalize(ImageFolderDataset([dataset.samples[0].image], predictor.input_size)[0]["image"][None])[0]
    assert torch.allclose(ours, image, atol=1e-6, rtol=0)
    # at another size: resize_image + to_tensor + sigmoid, then back to the image's size
    (path,) = _odd_images(tmp_path, [(90, 130)])
    rgb = read_image(path)
    with torch.inference_mode():
        expected = torch.sigmoid(model(to_tensor(resize_image(rgb, 64, 64))[None]))[0, 0].numpy()
    ((_, prob),) = list(predictor.predict_paths([path], progress=False))
    assert prob.shape == (90, 130) and prob.dtype == np.float32
    small = resize_image(prob, 64, 64)  # back down: close to the model-size map
    assert np.abs(small - expected).mean() < 0.02
    assert np.allclose(predictor.predict_image(rgb), prob, atol=1e-6)


def test_batching_workers_and_order_do_not_change_results(teacher, tmp_path):
    checkpoint, _ = teacher
    paths = _odd_images(tmp_path, [(64, 64), (50, 70), (120, 90), (64, 64), (33, 47)])
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    one = list(predictor.predict_paths(paths, batch_size=1, progress=False))
    many = list(predictor.predict_paths(paths, batch_size=3, num_workers=1, progress=False))
    assert [p for p, _ in one] == paths == [p for p, _ in many]
    for (_, a), (_, b), path in zip(one, many, paths):
        assert a.shape == read_image(path).shape[:2]
        # batch size changes the CPU kernels' summation order: equal up to float noise, not bit for bit
        assert np.abs(a - b).max() < 1e-4
    assert np.abs(one[0][1] - one[3][1]).max() > 1e-3  # different images (same size), different maps


def test_tta_is_the_mean_of_the_image_and_its_mirror(teacher, tmp_path):
    checkpoint, _ = teacher
    (path,) = _odd_images(tmp_path, [(64, 64)])
    rgb = read_image(path)
    plain = Predictor.from_checkpoint(checkpoint, device="cpu")
    tta = Predictor.from_checkpoint(checkpoint, device="cpu", tta=True)
    mirrored = plain.predict_image(np.ascontiguousarray(rgb[:, ::-1]))[:, ::-1]
    expected = 0.5 * (plain.predict_image(rgb) + mirrored)
    assert np.allclose(tta.predict_image(rgb), expected, atol=1e-5)
    assert not np.allclose(plain.predict_image(rgb), expected, atol=1e-4)  # the mirror does change it


def test_prediction_streams_instead_of_loading_every_image(teacher, tmp_path):
    checkpoint, _ = teacher
    paths = _odd_images(tmp_path, [(40, 40)] * 9)
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")

    class Counting(ImageFolderDataset):
        reads = 0

        def __getitem__(self, index):
            Counting.reads += 1
            return super().__getitem__(index)

    stream = predictor.predict(Counting(paths, predictor.input_size), batch_size=2, progress=False)
    next(stream)
    assert Counting.reads == 2  # one batch read, not nine images
    assert len(list(stream)) == 8


def test_corrupt_image_is_one_clean_error_naming_the_file(teacher, tmp_path):
    checkpoint, _ = teacher
    paths = _odd_images(tmp_path, [(40, 40)] * 3)
    paths[1].write_bytes(paths[1].read_bytes()[:60])  # truncated png
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    for workers in (0, 1):
        with pytest.raises(BSSError) as err:
            list(predictor.predict_paths(paths, batch_size=2, num_workers=workers, progress=False))
        assert "odd_1.png" in str(err.value) and "Traceback" not in str(err.value)


def test_checkpoint_that_does_not_fit_its_architecture(teacher, tmp_path):
    checkpoint, _ = teacher
    payload = read_checkpoint(checkpoint)
    payload["config"]["model"]["args"]["decoder_channels"] = [64, 32, 16]
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(BSSError, match="do not fit"):
        Predictor.from_checkpoint(tmp_path / "bad.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BSSError, match="not a readable BSS checkpoint"):
        Predictor.from_checkpoint(tmp_path / "junk.pt")


def test_input_size_override_is_checked_and_recorded(teacher, tmp_path):
    checkpoint, _ = teacher
    with pytest.raises(BSSError, match="must be positive"):
        Predictor.from_checkpoint(checkpoint, input_size=(0, 64))
    predictor = Predictor.from_checkpoint(checkpoint, input_size=(96, 128))
    assert predictor.describe()["input_size"] == [96, 128] and predictor.describe()["trained_image_size"] == [64, 64]
    (path,) = _odd_images(tmp_path, [(96, 128)])
    ((_, prob),) = list(predictor.predict_paths([path], progress=False))
    assert prob.shape == (96, 128)


def test_multi_class_checkpoint_is_refused(teacher, tmp_path):
    checkpoint, root = teacher
    cfg = from_dict(tiny_config_dict(root, tmp_path))
    cfg.model.args["classes"] = 2
    from bss.models import build_model
    from bss.training.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "two.pt", build_model(cfg.model), cfg, {}, 0)
    with pytest.raises(BSSError, match="binary segmentation"):
        Predictor.from_checkpoint(tmp_path / "two.pt")
