"""Models by name, encoder weights (offline packaged, local file, offline failure)."""

from __future__ import annotations

import pytest
import torch

from bss.config import NamedArgs
from bss.errors import ConfigError
from bss.models import MODELS, build_model
from bss.models.unet_attention import UNetAttention

TINY = {"encoder_name": "resnet18", "encoder_depth": 3, "decoder_channels": [16, 8, 4]}


def test_unet_attention_shapes_and_gate():
    model = build_model(NamedArgs("UNetAttention", dict(TINY, decoder_channels=[64, 32, 16], dropout=0.5, decoder_attention="scse")))
    assert isinstance(model, UNetAttention)
    out = model.eval()(torch.randn(2, 3, 64, 96))
    assert out.shape == (2, 1, 64, 96)
    assert any("attention" in n for n, _ in model.decoder.named_modules())  # scSE in the decoder
    assert model.bottleneck_dropout.p == 0.5


def test_dropout_active_only_in_train_mode():
    torch.manual_seed(0)
    model = build_model(NamedArgs("UNetAttention", dict(TINY, dropout=0.9)))
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("name", ["Unet", "FPN", "UnetPlusPlus"])
def test_smp_architectures_by_name(name):
    args = {"encoder_name": "resnet18"} if name == "FPN" else dict(TINY)
    assert build_model(NamedArgs(name, args))(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_unknown_names_list_valid_ones():
    with pytest.raises(ConfigError, match="unknown model 'UNetAtention'; valid: UNetAttention, Unet"):
        build_model(NamedArgs("UNetAtention", TINY))
    with pytest.raises(ConfigError, match="unknown encoder 'resnet7'"):
        build_model(NamedArgs("Unet", {"encoder_name": "resnet7"}))
    assert "DeepLabV3Plus" in MODELS


def test_imagenet_offline_fails_without_touching_the_network(monkeypatch):
    """Offline, a download is refused before any connection is tried (no retries, no timeout to
    wait out): every name look-up and socket connect is recorded (and refused), and there must be none."""
    import socket

    tried = []

    def no_network(sock, address, *args):
        tried.append(address)
        raise OSError("no network in this test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *args, **kwargs: no_network(None, host))  # a name look-up comes first
    with pytest.raises(ConfigError, match="unreachable"):
        build_model(NamedArgs("Unet", {"encoder_name": "resnet18", "encoder_weights": "imagenet"}))
    assert tried == []


def test_packaged_efficientnet_lite0_weights_are_loaded():
    from bss.models.weights import packaged_efficientnet_lite0

    model = build_model(NamedArgs("UNetAttention", {"encoder_name": "tu-efficientnet_lite0", "encoder_weights": "imagenet"}))
    source = packaged_efficientnet_lite0()
    stem = model.encoder.state_dict()["model.conv_stem.weight"]
    assert torch.equal(stem, source["_conv_stem.weight"])
    random_init = build_model(NamedArgs("UNetAttention", {"encoder_name": "tu-efficientnet_lite0", "encoder_weights": None}))
    assert not torch.equal(random_init.encoder.state_dict()["model.conv_stem.weight"], stem)


def test_encoder_weights_from_local_file(tmp_path):
    donor = build_model(NamedArgs("Unet", dict(TINY)))
    path = tmp_path / "enc.pt"
    torch.save(donor.encoder.state_dict(), path)
    model = build_model(NamedArgs("UNetAttention", dict(TINY, encoder_weights=str(path))))
    assert torch.equal(model.encoder.conv1.weight, donor.encoder.conv1.weight)
    with pytest.raises(ConfigError, match="not found"):
        build_model(NamedArgs("Unet", dict(TINY, encoder_weights=str(tmp_path / "missing.pt"))))
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(ConfigError, match="cannot read"):
        build_model(NamedArgs("Unet", dict(TINY, encoder_weights=str(tmp_path / "junk.pt"))))


def test_unknown_model_argument_is_refused_with_a_suggestion():
    from bss.config import NamedArgs
    from bss.errors import ConfigError
    from bss.models import build_model

    with pytest.raises(
        ConfigError, match=r"'model.args.decoder_channelz': UNetAttention has no argument 'decoder_channelz'. Did you mean 'decoder_channels'\?"
    ):
        build_model(NamedArgs("UNetAttention", {"encoder_name": "resnet18", "encoder_weights": None, "decoder_channelz": [8, 8, 8, 8]}))
    with pytest.raises(ConfigError, match=r"'model.args.wings': FPN has no argument 'wings'. FPN takes: .*decoder_dropout"):
        build_model(NamedArgs("FPN", {"encoder_name": "resnet18", "encoder_weights": None, "wings": 2}))
    # a timm encoder takes its own keyword arguments: those pass
    args = {"encoder_name": "tu-efficientnet_lite0", "encoder_weights": None, "decoder_channels": [16, 16, 16, 16, 16]}
    model = build_model(NamedArgs("UNetAttention", dict(args, drop_path_rate=0.1)))
    # timm spreads the rate over the blocks, rising to just under 0.1; without it there is none
    rates = [float(m.drop_prob) for m in model.encoder.modules() if hasattr(m, "drop_prob")]
    assert rates and 0.05 < max(rates) <= 0.1 and min(rates) >= 0.0
    assert not [m for m in build_model(NamedArgs("UNetAttention", args)).encoder.modules() if hasattr(m, "drop_prob")]
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_stages_deeper_than_the_encoder_depth_are_dropped_and_old_checkpoints_still_load(tmp_path):
    import segmentation_models_pytorch as smp

    from bss.config import from_dict
    from bss.training.checkpoint import load_model, save_checkpoint

    args = dict(TINY, encoder_weights=None)
    torch.manual_seed(0)
    model = build_model(NamedArgs("UNetAttention", args)).eval()
    torch.manual_seed(0)
    full = UNetAttention(**args).eval()  # smp as is: every resnet18 stage kept
    assert isinstance(model.encoder.layer3, torch.nn.Identity) and isinstance(model.encoder.layer4, torch.nn.Identity)
    kept = sum(p.numel() for p in model.parameters())
    assert kept < 0.1 * sum(p.numel() for p in full.parameters())
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(model(x), full(x))  # the same weights and output: only unused stages went

    cfg = from_dict({"model": {"name": "UNetAttention", "args": args}})
    old = save_checkpoint(tmp_path / "old.pt", full, cfg, {}, 1.0)  # written before stages were dropped
    new = save_checkpoint(tmp_path / "new.pt", model, cfg, {}, 1.0)
    assert new.stat().st_size < 0.15 * old.stat().st_size
    for path in (old, new):
        loaded, _ = load_model(path)
        assert torch.equal(loaded(x), full(x))
    # a stage the depth does use is never dropped, and a depth-5 encoder keeps everything
    deep = build_model(NamedArgs("Unet", {"encoder_name": "resnet18", "encoder_weights": None}))
    assert not isinstance(deep.encoder.layer4, torch.nn.Identity)
    assert sum(p.numel() for p in deep.parameters()) == sum(p.numel() for p in smp.Unet("resnet18", encoder_weights=None).parameters())


def test_encoder_weights_of_a_full_depth_encoder_load_into_a_shallower_one(tmp_path):
    donor = build_model(NamedArgs("Unet", {"encoder_name": "resnet18", "encoder_weights": None}))  # depth 5: every stage
    torch.save(donor.encoder.state_dict(), tmp_path / "enc.pt")
    model = build_model(NamedArgs("UNetAttention", dict(TINY, encoder_weights=str(tmp_path / "enc.pt"))))
    assert torch.equal(model.encoder.layer2[0].conv1.weight, donor.encoder.layer2[0].conv1.weight)
