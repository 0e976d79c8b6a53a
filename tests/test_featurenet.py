"""The feature network: training is seeded and resumable, files round-trip, the shipped weights load, and the
Inception-v3 loader reads a state dict in pytorch-fid's layout (a randomly initialised one: no download)."""

from __future__ import annotations

import pytest
import torch

from encdiff import cli
from encdiff.errors import EncdiffError
from encdiff.featurenet import FeatureNet, FeatureNetConfig, FeatureNetTraining, augment, shipped_weights_path, train_feature_net
from encdiff.inception import FIDInceptionV3, load_inception

TINY = FeatureNetConfig(widths=(4, 8, 8, 16), num_classes=3, class_names=("a", "b", "c"))
QUICK = FeatureNetTraining(epochs=2, batch_size=16, bf16=False, eval_every=1)


def toy_data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.randint(0, 60, (n, 3, 32, 32), generator=g, dtype=torch.uint8) + (labels * 90).view(-1, 1, 1, 1).to(torch.uint8)
    return images, labels


def test_augment_is_seeded_crop_and_flip():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.uint8).view(2, 3, 8, 8)
    a = augment(images, torch.Generator().manual_seed(1), pad=2)
    b = augment(images, torch.Generator().manual_seed(1), pad=2)
    assert a.shape == (2, 3, 8, 8) and torch.equal(a, b)
    # with no padding the only freedom left is the flip
    same = augment(images, torch.Generator().manual_seed(3), pad=0)
    for i in range(2):
        assert torch.equal(same[i], images[i].float()) or torch.equal(same[i], images[i].float().flip(-1))


def test_training_is_deterministic_resumable_and_round_trips(tmp_path):
    images, labels = toy_data()
    net = train_feature_net(images, labels, tmp_path / "a.safetensors", QUICK, TINY, images, labels, log=lambda s: None)
    assert net.info["test_accuracy_fp16_file"] > 0.5  # three easily separated brightness classes
    again = train_feature_net(images, labels, tmp_path / "b.safetensors", QUICK, TINY, log=lambda s: None)
    for key, value in net.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    # an interrupted run (1 of 2 epochs, checkpoint left behind) resumes to the same weights
    one = FeatureNetTraining(**{**QUICK.__dict__, "epochs": 1})
    train_feature_net(images, labels, tmp_path / "c.safetensors", one, TINY, log=lambda s: None)
    (tmp_path / "c.safetensors").unlink()
    ckpt = tmp_path / "c.safetensors.ckpt"
    assert ckpt.is_file()
    # same total schedule: rename the 1-epoch checkpoint as if the 2-epoch run had stopped after epoch 1
    ckpt.rename(tmp_path / "d.safetensors.ckpt")
    lines = []
    resumed = train_feature_net(images, labels, tmp_path / "d.safetensors", QUICK, TINY, log=lines.append)
    assert any("resumed" in line for line in lines)
    assert resumed.state_dict()["classifier.weight"].shape == (3, 16)
    loaded = FeatureNet.load(tmp_path / "a.safetensors")
    assert loaded.config.widths == TINY.widths and loaded.config.class_names == TINY.class_names
    # features are scaled to mean |f|^2 / d = 1 on the training images (KID's kernel expects O(1) values)
    with torch.inference_mode():
        features = loaded.features(images.float() / 127.5 - 1)
    assert features.shape == (48, 16)
    assert float(features.double().square().sum(1).mean() / 16) == pytest.approx(1.0, rel=0.02)


def test_eval_features_are_mirror_invariant_and_training_sees_single_images():
    torch.manual_seed(0)
    net = FeatureNet(TINY).eval()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(net.features(x), net.features(x.flip(-1)), atol=1e-6)
        # the mirror average is the mean of the two single-image embeddings, not some other pooling
        plain = FeatureNet(FeatureNetConfig(**{**TINY.__dict__, "flip_average": False})).eval()
        plain.load_state_dict(net.state_dict())
        assert torch.allclose(net.features(x), (plain.features(x) + plain.features(x.flip(-1))) / 2, atol=1e-6)
        assert not torch.allclose(plain.features(x), plain.features(x.flip(-1)), atol=1e-3)
        net.train()
        assert not torch.allclose(net(x), net(x.flip(-1)), atol=1e-3)


def test_load_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(EncdiffError, match="other.safetensors: not an encdiff feature-net file"):
        FeatureNet.load(tmp_path / "other.safetensors")


def test_shipped_weights_small_and_loadable():
    path = shipped_weights_path()
    assert path.stat().st_size <= 5 * 1024 * 1024
    net = FeatureNet.load()
    assert net.config.class_names[0] == "airplane" and net.features(torch.zeros(2, 3, 32, 32)).shape == (2, 256)
    assert net.info["test_accuracy_fp16_file"] >= 0.90  # recorded when it was tested (benchmarks/featurenet.md)
    assert net.config.flip_average


def test_cli_train_feature_net(tmp_path):
    images, labels = toy_data(30)
    from encdiff.images import save_png

    for split in ("train", "test"):
        for i in range(len(images)):
            folder = tmp_path / "data" / split / "abc"[int(labels[i])]
            folder.mkdir(parents=True, exist_ok=True)
            save_png(images[i], folder / f"{i}.png")
    out = tmp_path / "net.safetensors"
    assert cli.main(["train-feature-net", str(tmp_path / "data"), "--out", str(out), "--epochs", "1",
                     "--batch-size", "8", "--no-bf16"]) == 0
    net = FeatureNet.load(out)
    assert net.config.class_names == ("a", "b", "c") and "test_accuracy_fp32" in net.info
    assert cli.main(["train-feature-net", str(tmp_path / "missing")]) == 2
    # --epochs 0 --init: the same weights re-calibrated and re-tested, no training
    again = tmp_path / "again.safetensors"
    assert cli.main(["train-feature-net", str(tmp_path / "data"), "--out", str(again), "--epochs", "0",
                     "--init", str(out), "--no-bf16"]) == 0
    retested = FeatureNet.load(again)
    for key, value in net.state_dict().items():
        assert torch.allclose(value, retested.state_dict()[key]), key
    assert retested.info["test_accuracy_fp32"] == net.info["test_accuracy_fp32"]
    assert cli.main(["train-feature-net", str(tmp_path / "data"), "--epochs", "0"]) == 2


def test_inception_loads_a_pytorch_fid_state_dict(tmp_path):
    torch.manual_seed(0)
    reference = FIDInceptionV3().eval()
    # torchvision's Inception3 without the auxiliary head has 23,834,568 parameters at 1000 classes;
    # pytorch-fid's has 1008 classes: 8 more rows of 2049 in fc.
    assert sum(p.numel() for p in reference.parameters()) == 23_834_568 + 8 * 2049
    with torch.no_grad():
        for name, buffer in reference.named_buffers():  # non-trivial BatchNorm statistics
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(reference.state_dict(), path)  # the format of pytorch-fid's file: a plain state dict
    net = load_inception(path)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        features = net.features(x)
        assert features.shape == (2, 2048)
        assert torch.equal(features, reference.features(x))
    state = reference.state_dict()
    del state["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(EncdiffError, match=r"broken.pth: not pytorch-fid's Inception-v3 layout: 1 missing"):
        load_inception(tmp_path / "broken.pth")
    with pytest.raises(EncdiffError, match="Inception weights file not found"):
        load_inception(tmp_path / "absent.pth")
