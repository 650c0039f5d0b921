"""Feature networks: the factory, the digits CNN, pixels, and the Inception loading path and
preprocessing against clean-fid's own per-image code (with a TorchScript stand-in)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.resize import build_resizer
from sklearn.model_selection import train_test_split

from searchd.evaluation import FEATURES, load_features
from searchd.evaluation.digits import METADATA, WEIGHTS, digits_images
from searchd.evaluation.features import INCEPTION_FILE, INCEPTION_URL, InceptionFeatures
from searchd.evaluation.resize import pil_bicubic_resize, to_uint8_levels
from searchd.evaluation.standin import make_standin_inception

# clean-fid's own loader calls torch.jit.load, which warns that TorchScript is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


def test_unknown_network_lists_the_known_ones():
    with pytest.raises(ValueError, match="digits, inception, pixels"):
        load_features("resnet")
    assert set(FEATURES) == {"inception", "digits", "pixels"}
    with pytest.raises(ValueError, match="bad options"):
        load_features("pixels", colour=True)


def test_pixels_is_the_flattened_identity():
    net = load_features("pixels", shape=(1, 8, 8))
    x = torch.randn(5, 1, 8, 8)
    assert net.dim == 64
    torch.testing.assert_close(net(x), x.reshape(5, 64))
    with pytest.raises(ValueError, match="no \\['logits'\\]"):
        net.logits(x)


def test_digits_network_is_small_accurate_and_exposes_logits():
    meta = json.loads(METADATA.read_text())
    assert WEIGHTS.stat().st_size < 1_000_000
    net = load_features("digits")
    assert 64 <= net.dim <= 128 and net.dim == meta["feature_dim"]
    # Recompute the held-out accuracy of the shipped weights on the recorded split.
    x, y = digits_images()
    _, test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
    out = net.extract(torch.from_numpy(x[test]), ("features", "logits"))
    acc = float((out["logits"].argmax(1).numpy() == y[test]).mean())
    assert acc >= 0.97
    assert acc == pytest.approx(meta["heldout_accuracy"], abs=1e-6)
    assert out["features"].shape == (len(test), net.dim)
    # SiLU features: no dead unit, so the covariance is full rank.
    assert np.linalg.matrix_rank(np.cov(out["features"].numpy().astype(np.float64).T)) == net.dim


def test_features_do_not_depend_on_the_batch_size():
    net = load_features("digits", batch_size=7)
    x = torch.from_numpy(digits_images()[0][:50])
    whole = load_features("digits", batch_size=4096)(x)
    torch.testing.assert_close(net(x), whole, rtol=1e-5, atol=1e-6)


def test_digits_channels_last_pooling_changes_no_bit():
    """The network's pooling runs on channels-last copies (a speed setting): features and
    logits equal, bit for bit, those of the same weights with torch's NCHW ``MaxPool2d``,
    on the digits and on wide noisy inputs, at the evaluator's block shape."""
    from searchd.evaluation.digits import ChannelsLastMaxPool2d, load_digits_cnn

    net, _ = load_digits_cnn()
    plain, _ = load_digits_cnn()
    pools = [i for i, m in enumerate(plain.conv) if isinstance(m, ChannelsLastMaxPool2d)]
    assert len(pools) == 2
    for i in pools:
        plain.conv[i] = torch.nn.MaxPool2d(2)
    g = torch.Generator().manual_seed(3)
    digits = torch.from_numpy(digits_images()[0][:256])
    with torch.inference_mode():
        for x in (digits, 3 * torch.randn(256, 1, 8, 8, generator=g), digits[:5]):
            for a, b in zip(net(x), plain(x)):
                assert torch.equal(a, b)
                assert a.is_contiguous()


# Inception --------------------------------------------------------------------------------------
def test_missing_inception_file_says_where_to_put_it(tmp_path):
    where = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError) as e:
        load_features("inception", path=where)
    msg = str(e.value)
    assert "\n" not in msg and str(where) in msg and INCEPTION_URL in msg
    # A folder means the file inside it.
    with pytest.raises(FileNotFoundError, match=str(tmp_path / INCEPTION_FILE)):
        load_features("inception", path=tmp_path)
    with pytest.raises(ValueError, match="unknown inception mode"):
        load_features("inception", mode="legacy_pytorch", path=tmp_path)


def test_a_file_that_is_not_torchscript_is_refused(tmp_path):
    bad = tmp_path / INCEPTION_FILE
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="TorchScript"):
        load_features("inception", path=bad)


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inception")
    make_standin_inception(folder, seed=0)
    return folder


def test_pil_bicubic_emulation_matches_clean_fids_resizer():
    rng = np.random.default_rng(0)
    resize = build_resizer("clean")
    for hw in [(8, 8), (32, 32), (17, 23)]:
        imgs = rng.integers(0, 256, (2, *hw, 3), dtype=np.uint8)
        theirs = np.stack([resize(im) for im in imgs])  # [B, 299, 299, 3] float32
        ours = pil_bicubic_resize(torch.from_numpy(imgs).permute(0, 3, 1, 2).float())
        # Equal up to float32 rounding of the accumulation order.
        np.testing.assert_allclose(ours.permute(0, 2, 3, 1).numpy(), theirs, atol=1e-4, rtol=0)


def test_uint8_quantization_is_edms():
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 1.0, 2.0])
    expected = (x * 127.5 + 128).clip(0, 255).to(torch.uint8).float()
    torch.testing.assert_close(to_uint8_levels(x), expected)


def test_inception_clean_mode_equals_clean_fids_per_image_path(standin):
    """Batched preprocessing on the device vs clean-fid's own per-image PIL path, through the
    same (stand-in) TorchScript file loaded by clean-fid's InceptionV3W."""
    net = load_features("inception", path=standin, mode="clean")
    assert isinstance(net, InceptionFeatures) and net.dim == 2048
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 8, 8, generator=g) * 2.2 - 1.1
    ours = net(x)
    u8 = (x * 127.5 + 128).clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)
    resize = build_resizer("clean")
    batch = torch.stack(
        [torch.from_numpy(resize(im.permute(1, 2, 0).numpy()).transpose(2, 0, 1)) for im in u8]
    )
    with torch.no_grad():
        theirs = InceptionV3W(str(standin), download=False).eval()(batch)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_inception_legacy_mode_feeds_levels_to_the_network(standin):
    net = load_features("inception", path=standin, mode="legacy_tensorflow")
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    u8 = (x * 127.5 + 128).clamp(0, 255).to(torch.uint8).float()
    with torch.no_grad():
        theirs = InceptionV3W(str(standin), download=False, resize_inside=True).eval()(u8)
    torch.testing.assert_close(net(x), theirs)
    assert "spatial" not in net.outputs


def test_inception_logits_and_spatial_features(standin):
    net = load_features("inception", path=standin / INCEPTION_FILE)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    out = net.extract(x, ("features", "logits", "spatial"))
    assert out["logits"].shape == (2, 1008) and net.n_classes == 1008
    # sFID's spatial features: 7 channels of mixed_6/conv at 17 x 17.
    assert out["spatial"].shape == (2, 7 * 17 * 17) and net.spatial_dim == 2023
    # The same features whether or not the spatial ones are taken on the way.
    torch.testing.assert_close(out["features"], net(x), rtol=1e-5, atol=1e-6)
    w = net.base.output.weight
    torch.testing.assert_close(out["logits"], out["features"] @ w.T, rtol=1e-5, atol=1e-5)
