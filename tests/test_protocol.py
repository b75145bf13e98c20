"""The paper's ImageNet protocol (Sec. 3.4) as recipe options, on a generated image folder:
per-pixel mean and PCA lighting against numpy's own statistics and eigh, 10-crop and multi-scale
fully-convolutional testing against the crops and scales cut by hand with torch ops."""

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from resnet_ablate.arch import ResNetArch
from resnet_ablate.data.decode import (IMAGENET_MEAN, IMAGENET_STD, PAPER_SCALES, Preprocess,
                                       decode, decode_views)
from resnet_ablate.data.folders import load_image_folder
from resnet_ablate.models import build
from resnet_ablate.recipe import TrainRecipe
from resnet_ablate.train import train

CLASSES = 6  # more than five: a top-5 error that can be other than 0
SIZE = 24  # the crop; the paper's 256 and its scales scale with it (224 -> 24)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Six classes of noisy colours, 6 training and 3 validation JPEGs each, of varied sizes."""
    root = tmp_path_factory.mktemp("protocol")
    rng = np.random.default_rng(0)
    for label in range(CLASSES):
        colour = np.array([60 * label + 20, 200 - 40 * label, (80 * label) % 256], np.float64)
        for split, count in (("train", 6), ("val", 3)):
            (root / split / f"c{label}").mkdir(parents=True)
            for i in range(count):
                width, height = 36 + 5 * i, 30 + 3 * label
                pixels = np.clip(colour + rng.normal(0, 30, (height, width, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / f"c{label}" / f"{i}.jpg")
    return root


def _rgb(path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _shorter_side(image: Image.Image, length: int) -> Image.Image:
    scale = length / min(image.size)
    return image.resize((max(length, round(image.size[0] * scale)),
                         max(length, round(image.size[1] * scale))), Image.BILINEAR)


def _channel_normalised(image: Image.Image) -> torch.Tensor:
    pixels = torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)
    return (pixels - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def _centre_crops_by_hand(paths) -> np.ndarray:
    crops = []
    for path in paths:
        scaled = np.asarray(_shorter_side(_rgb(path), round(SIZE * 256 / 224)), np.float32) / 255
        top, left = (scaled.shape[0] - SIZE) // 2, (scaled.shape[1] - SIZE) // 2
        crops.append(scaled[top:top + SIZE, left:left + SIZE])
    return np.stack(crops)


def test_pixel_statistics_are_the_mean_image_and_numpys_eigh_of_the_rgb_covariance(folder):
    data = load_image_folder(folder, image_size=SIZE, loader_workers=0)
    stats = data.pixel_statistics
    crops = _centre_crops_by_hand([path for path, _ in data.index.train])  # 24 < the sample
    np.testing.assert_allclose(stats.mean_image, crops.mean(axis=0), atol=1e-6)
    values, vectors = np.linalg.eigh(np.cov(crops.reshape(-1, 3).T.astype(np.float64), bias=True))
    np.testing.assert_allclose(stats.eigenvalues, values, rtol=1e-9)
    # Eigenvectors are defined up to sign: compare the projections they make.
    np.testing.assert_allclose(stats.eigenvectors @ stats.eigenvectors.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(np.abs(stats.eigenvectors.T @ vectors), np.eye(3), atol=1e-9)


def test_pca_lighting_adds_the_drawn_mix_of_principal_components_to_every_pixel(folder):
    data = load_image_folder(folder, image_size=SIZE, loader_workers=0)
    stats = data.pixel_statistics
    path = data.index.train[5][0]
    draws = np.random.default_rng(11)
    plain = decode(path, image_size=SIZE, augmentation="scale", rng=draws)
    alpha = draws.normal(0, 0.1, size=3)  # the lighting's draws come after the crop's and flip's
    lit = decode(path, image_size=SIZE, augmentation="scale", rng=np.random.default_rng(11),
                 preprocess=Preprocess(lighting=0.1, statistics=stats))
    values, vectors = np.linalg.eigh(np.cov(
        _centre_crops_by_hand([p for p, _ in data.index.train]).reshape(-1, 3).T, bias=True))
    # AlexNet's shift sum_i alpha_i lambda_i p_i (sign-free: alpha is drawn per vector)
    signs = np.sign(np.sum(stats.eigenvectors * vectors, axis=0))
    shift = (vectors * signs) @ (alpha * values)
    expected = torch.tensor(shift / np.array(IMAGENET_STD), dtype=torch.float32)[:, None, None]
    torch.testing.assert_close(lit - plain, expected.expand_as(plain), atol=1e-5, rtol=0)
    evaluated = decode(path, image_size=SIZE, augmentation="scale", rng=None,
                       preprocess=Preprocess(lighting=0.1, statistics=stats))
    torch.testing.assert_close(evaluated, decode(path, image_size=SIZE, augmentation="scale",
                                                 rng=None), msg="no lighting at evaluation")


def test_the_per_pixel_mean_replaces_the_channel_normalisation(folder):
    data = load_image_folder(folder, image_size=SIZE, loader_workers=0)
    path = data.index.test[0][0]
    centred = decode(path, image_size=SIZE, augmentation="scale", rng=None,
                     preprocess=Preprocess(pixel_mean=True, statistics=data.pixel_statistics))
    mean_image = _centre_crops_by_hand([p for p, _ in data.index.train]).mean(axis=0)
    expected = _centre_crops_by_hand([path])[0] - mean_image
    torch.testing.assert_close(centred, torch.from_numpy(expected).permute(2, 0, 1).float(),
                               atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="need the data set's PixelStatistics"):
        Preprocess(pixel_mean=True)


def _ten_crops_by_hand(path) -> torch.Tensor:
    scaled = _channel_normalised(_shorter_side(_rgb(path), round(SIZE * 256 / 224)))
    height, width = scaled.shape[1:]
    corners = [(0, 0), (0, width - SIZE), (height - SIZE, 0), (height - SIZE, width - SIZE),
               ((height - SIZE) // 2, (width - SIZE) // 2)]
    crops = [scaled[:, top:top + SIZE, left:left + SIZE] for top, left in corners]
    return torch.stack(crops + [torch.flip(crop, dims=[2]) for crop in crops])


def _errors_by_hand(model, paths_and_labels, scores_of) -> tuple[float, float]:
    wrong = wrong5 = 0
    with torch.no_grad():
        for path, label in paths_and_labels:
            scores = scores_of(model, path)
            wrong += int(scores.argmax().item() != label)
            wrong5 += int(label not in scores.topk(min(5, scores.numel())).indices.tolist())
    return wrong / len(paths_and_labels), wrong5 / len(paths_and_labels)


def _ten_crop_scores(model, path):
    return F.softmax(model(_ten_crops_by_hand(path)), dim=1).mean(dim=0)


def _multi_scale_scores(model, path):
    views = [_channel_normalised(_shorter_side(_rgb(path), round(SIZE * s / 224)))[None]
             for s in PAPER_SCALES]
    return torch.stack([F.softmax(model(view), dim=1)[0] for view in views]).mean(dim=0)


def test_the_views_are_the_ten_crops_and_the_whole_image_at_each_scale_cut_by_hand(folder):
    for path, _ in load_image_folder(folder, image_size=SIZE, loader_workers=0).index.test[::4]:
        (ten,) = decode_views(path, image_size=SIZE, view="ten_crop")
        torch.testing.assert_close(ten, _ten_crops_by_hand(path), atol=1e-6, rtol=0)
        scales = decode_views(path, image_size=SIZE, view="multi_scale")
        assert [tuple(v.shape[2:]) for v in scales] == [
            tuple(_shorter_side(_rgb(path), round(SIZE * s / 224)).size[::-1]) for s in PAPER_SCALES]
        for view, s in zip(scales, PAPER_SCALES):
            torch.testing.assert_close(view[0], _channel_normalised(
                _shorter_side(_rgb(path), round(SIZE * s / 224))), atol=1e-6, rtol=0)


def test_ten_crop_and_multi_scale_testing_are_recorded_beside_the_centre_crop(folder):
    data = load_image_folder(folder, image_size=SIZE, loader_workers=0)
    model = build(ResNetArch(family="imagenet", widths=(4, 8, 8, 8), stages=(1, 1, 1, 1),
                             block="basic"), num_classes=CLASSES)
    recipe = TrainRecipe(epochs=2, batch_size=8, eval_batch_size=5, lr=0.05,
                         test_views=("ten_crop", "multi_scale"))
    result = train(model, data, recipe, seed=0)
    first, last = result.history
    assert first.test_error_10crop is None and first.test_error_multiscale is None, \
        "scored after the last epoch only"
    model.eval()
    ten = _errors_by_hand(model, data.index.test, _ten_crop_scores)
    multi = _errors_by_hand(model, data.index.test, _multi_scale_scores)
    assert (last.test_error_10crop, last.test_top5_error_10crop) == pytest.approx(ten)
    assert (last.test_error_multiscale, last.test_top5_error_multiscale) == pytest.approx(multi)
    centre = _errors_by_hand(model, data.index.test, lambda m, p: F.softmax(m(
        _ten_crops_by_hand(p)[4:5]), dim=1)[0])
    assert last.test_error == pytest.approx(centre[0]), "the centre crop is the tenth's fifth"


def test_every_view_a_recipe_takes_has_its_metrics_and_epoch_record_fields():
    import dataclasses

    from resnet_ablate.recipe import TEST_VIEWS
    from resnet_ablate.record import METRICS, VIEW_METRIC_NAMES, EpochRecord

    assert set(VIEW_METRIC_NAMES) == set(TEST_VIEWS)
    fields = {f.name for f in dataclasses.fields(EpochRecord)}
    for names in VIEW_METRIC_NAMES.values():
        assert set(names) <= fields and set(names) <= set(METRICS)


def test_an_image_the_views_skip_is_counted_once(folder, tmp_path):
    """A corrupt validation image is skipped by the centre crop and by each view: the epoch's
    skipped_images counts it once, as in the epochs scored without the views."""
    shutil.copytree(folder, tmp_path / "data")
    (tmp_path / "data" / "val" / "c0" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    data = load_image_folder(tmp_path / "data", image_size=SIZE, loader_workers=0)
    model = build(ResNetArch(family="imagenet", widths=(4, 8, 8, 8), stages=(1, 1, 1, 1),
                             block="basic"), num_classes=CLASSES)
    recipe = TrainRecipe(epochs=2, batch_size=8, eval_batch_size=5, lr=0.05,
                         test_views=("ten_crop", "multi_scale"))
    first, last = train(model, data, recipe, seed=0).history
    assert first.skipped_images == last.skipped_images == 1


def test_the_protocol_options_are_checked_and_refused_on_in_memory_data():
    from resnet_ablate.data import load_dataset

    with pytest.raises(ValueError, match="test_views must be a list of distinct views out of "
                                         "ten_crop, multi_scale"):
        TrainRecipe(test_views=("ten_crops",))
    with pytest.raises(ValueError, match=r"test_views must be a list of distinct views out of "
                                         r".*\(a list even for one: \[ten_crop\]\), got 'ten_crop'"):
        TrainRecipe(test_views="ten_crop")
    with pytest.raises(ValueError, match=r"lighting must be a number in \[0, 1\]"):
        TrainRecipe(lighting=-0.1)
    with pytest.raises(ValueError, match="mean must be one of channel, pixel"):
        TrainRecipe(mean="image")
    model = build(ResNetArch(family="cifar", depth=8), num_classes=10, in_channels=1)
    with pytest.raises(ValueError, match="apply to streamed image data sets"):
        train(model, load_dataset("digits"), TrainRecipe(epochs=1, lighting=0.1), seed=0)
    from resnet_ablate.spec import SpecError, parse_spec

    with pytest.raises(SpecError, match="train.test_views: applies to imagefolder and webdataset "
                                        r"\(the paper's ImageNet protocol\), not to digits"):
        parse_spec({"study": "s", "space": {"depth": [8]}, "train": {"test_views": ["ten_crop"]}})
    # The per-pixel mean applies to every data set (the paper's CIFAR input, Sec. 4.2).
    spec = parse_spec({"study": "s", "space": {"depth": [8]}, "train": {"mean": "pixel"}})
    assert spec.train.mean == "pixel"
    result = train(model, load_dataset("digits"), TrainRecipe(epochs=1, mean="pixel"), seed=0)
    assert result.ok and result.final_test_accuracy > 0.5


def test_a_study_trained_on_the_per_pixel_mean_is_analysed_on_it_too():
    """The data a study's analyses read (Fig. 7, a reloaded trial's model) is the data its trials
    saw: with `mean: pixel`, centred. A model trained so scores its recorded test error there,
    and far worse on the images uncentred."""
    from types import SimpleNamespace

    from resnet_ablate.results.analysis import study_dataset
    from resnet_ablate.data import load_dataset

    def study(train):
        return SimpleNamespace(study="s", spec={"dataset": "digits", "train": train})

    model = build(ResNetArch(family="cifar", depth=8), num_classes=10, in_channels=1)
    result = train(model, load_dataset("digits"), TrainRecipe(epochs=2, mean="pixel"), seed=0)
    centred, plain = study_dataset(study({"mean": "pixel"})), study_dataset(study({}))
    assert centred.centring == "pixel" and plain.centring == "channel"

    def error(data):
        with torch.no_grad():
            wrong = (model.eval()(data.test_x).argmax(1) != data.test_y).sum().item()
        return wrong / len(data.test_y)

    assert error(centred) == pytest.approx(result.history[-1].test_error, abs=1e-9)
    assert error(plain) > error(centred) + 0.02

