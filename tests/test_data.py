"""Datasets and augmentation: digits split and statistics, CIFAR-10's official format, crops."""

import dataclasses
import hashlib
import pickle
import shutil
import socket
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from resnet_ablate.data import cifar as cifar_module
from resnet_ablate.data import (
    Augmentation,
    DataUnavailable,
    SyntheticSpec,
    clear_dataset_cache,
    crop_and_flip,
    DatasetShape,
    dataset_shape,
    load_dataset,
    random_crop_flip,
    read_cifar10,
)

CLASS_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer",
               b"dog", b"frog", b"horse", b"ship", b"truck"]  # fmt: skip
PER_BATCH = 10  # one image of each class per batch file


def raw_from_normalised(x: torch.Tensor, mean, std) -> np.ndarray:
    scale, shift = torch.tensor(std).view(1, -1, 1, 1), torch.tensor(mean).view(1, -1, 1, 1)
    return (x.double() * scale + shift).numpy()


def sorted_rows(images: np.ndarray) -> np.ndarray:
    flat = images.reshape(images.shape[0], -1)
    return flat[np.lexsort(flat.T[::-1])]


# ---------------------------------------------------------------------------------------------
# Entry point


def test_unknown_dataset_name_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'.*digits, cifar10, cifar100, imagefolder, webdataset, synthetic"):
        load_dataset("mnist")


def test_options_for_another_dataset_are_rejected():
    with pytest.raises(ValueError, match="cifar10 and cifar100 only"):
        load_dataset("digits", root="/tmp")
    with pytest.raises(ValueError, match="synthetic dataset only"):
        load_dataset("digits", synthetic=SyntheticSpec())


def test_the_loader_takes_the_catalogues_streamed_names_and_shard_keys():
    # The spec's catalogue is the one list: the loader streams exactly its names and checks
    # a shards section against exactly its keys.
    from resnet_ablate.data.shards import load_shards
    from resnet_ablate.spec.catalogue import REQUIRED_SHARD_KEYS, SHARD_KEYS, STREAMED_DATASETS

    for name in STREAMED_DATASETS:
        with pytest.raises(ValueError, match=f"{name} needs"):
            load_dataset(name)
    with pytest.raises(ValueError, match="apply to imagefolder and webdataset only"):
        load_dataset("digits", image_size=32)
    with pytest.raises(ValueError) as refused:
        load_shards({"bogus": 1})
    message = str(refused.value)
    assert message.endswith(f"valid keys: {', '.join(SHARD_KEYS)}")
    assert f"missing {', '.join(REQUIRED_SHARD_KEYS)}" in message


def test_cache_hands_out_one_bundle_per_argument_set():
    first = load_dataset("synthetic", seed=3)
    assert load_dataset("synthetic", seed=3) is first
    assert load_dataset("synthetic", seed=4) is not first
    # A spec's fields (dataset.synthetic as written) name the same data as the SyntheticSpec.
    assert load_dataset("synthetic", seed=3, synthetic={}) is first
    three = load_dataset("synthetic", seed=3, synthetic={"num_classes": 3})
    assert three is load_dataset("synthetic", seed=3, synthetic=SyntheticSpec(num_classes=3))
    assert three.num_classes == 3
    assert load_dataset("synthetic", seed=3, cache=False) is not first
    clear_dataset_cache()
    assert load_dataset("synthetic", seed=3) is not first


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_is_the_default_and_splits_all_1797_images_four_to_one():
    bundle = load_dataset()
    assert bundle.name == "digits"
    assert bundle.train_size + bundle.test_size == 1797
    assert bundle.test_size == 360  # ceil(0.2 * 1797)
    assert tuple(bundle.train_x.shape) == (1437, 1, 8, 8)
    assert tuple(bundle.test_x.shape) == (360, 1, 8, 8)
    assert bundle.train_x.dtype == torch.float32 and bundle.train_y.dtype == torch.int64
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 1, 8)
    assert bundle.eval_split == "test" and bundle.augmentation is None


def test_digits_split_is_stratified():
    bundle = load_dataset("digits")
    per_class = np.bincount(load_digits().target, minlength=10)
    test_counts = np.bincount(bundle.test_y.numpy(), minlength=10)
    train_counts = np.bincount(bundle.train_y.numpy(), minlength=10)
    np.testing.assert_array_equal(train_counts + test_counts, per_class)
    assert np.all(np.abs(test_counts - 0.2 * per_class) <= 1)


def test_digits_split_is_fixed_by_the_seed():
    a = load_dataset("digits", seed=0, cache=False)
    b = load_dataset("digits", seed=0, cache=False)
    c = load_dataset("digits", seed=1, cache=False)
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.test_y, c.test_y)


def test_digits_are_normalised_with_training_statistics():
    bundle = load_dataset("digits")
    train_raw = raw_from_normalised(bundle.train_x, bundle.mean, bundle.std)
    test_raw = raw_from_normalised(bundle.test_x, bundle.mean, bundle.std)
    # Undoing the normalisation gives back the dataset's integer pixels 0..16, all 1,797 images.
    np.testing.assert_allclose(train_raw, np.round(train_raw), atol=1e-4)
    np.testing.assert_array_equal(
        sorted_rows(np.round(np.concatenate([train_raw, test_raw]))),
        sorted_rows(load_digits().images.astype(np.float64)),
    )
    # The statistics are those of the training pixels only.
    assert bundle.mean[0] == pytest.approx(np.round(train_raw).mean(), rel=1e-9)
    assert bundle.std[0] == pytest.approx(np.round(train_raw).std(), rel=1e-9)
    assert bundle.train_x.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert bundle.train_x.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)


def test_digits_validation_is_carved_from_the_training_split():
    plain = load_dataset("digits")
    held = load_dataset("digits", validation=True, validation_fraction=0.1)
    assert held.eval_split == "validation"
    assert held.train_size + held.test_size == plain.train_size
    assert held.test_size == 144  # ceil(0.1 * 1437)


# ---------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_shape_is_configurable_and_classes_balanced():
    spec = SyntheticSpec(num_classes=3, channels=2, image_size=6, train_size=30, test_size=12)
    bundle = load_dataset("synthetic", synthetic=spec)
    assert tuple(bundle.train_x.shape) == (30, 2, 6, 6)
    assert tuple(bundle.test_x.shape) == (12, 2, 6, 6)
    assert bundle.num_classes == 3 and bundle.in_channels == 2 and bundle.image_size == 6
    np.testing.assert_array_equal(np.bincount(bundle.train_y.numpy()), [10, 10, 10])


def test_synthetic_data_is_seeded():
    a = load_dataset("synthetic", seed=5, cache=False)
    b = load_dataset("synthetic", seed=5, cache=False)
    c = load_dataset("synthetic", seed=6, cache=False)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.train_x, c.train_x)


def test_synthetic_spec_rejects_nonsense_naming_the_field():
    with pytest.raises(ValueError, match="SyntheticSpec.image_size"):
        SyntheticSpec(image_size=0)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 in its official format, written by hand


def official_row(image: np.ndarray) -> np.ndarray:
    """The format's documented layout: 1024 red values row-major, then 1024 green, 1024 blue."""
    red, green, blue = image[0], image[1], image[2]
    return np.concatenate([red.ravel(), green.ravel(), blue.ravel()])


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """A ten-times-smaller-than-tiny CIFAR-10: six official batch files of ten images each."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "extracted" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images, labels = {}, {}
    for member in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images[member] = rng.integers(0, 256, size=(PER_BATCH, 3, 32, 32), dtype=np.uint8)
        labels[member] = [int(c) for c in rng.permutation(10)]
        batch = {
            b"batch_label": member.encode(),
            b"labels": labels[member],
            b"data": np.stack([official_row(image) for image in images[member]]),
            b"filenames": [f"{member}_{i}.png".encode() for i in range(PER_BATCH)],
        }
        (folder / member).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"num_cases_per_batch": PER_BATCH, b"label_names": CLASS_NAMES, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    archive_dir = root / "archived"
    archive_dir.mkdir()
    archive = archive_dir / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    train_images = np.concatenate([images[f"data_batch_{i}"] for i in range(1, 6)])
    train_labels = np.concatenate([labels[f"data_batch_{i}"] for i in range(1, 6)])
    return {
        "folder": folder,
        "archive": archive,
        "train_images": train_images,
        "train_labels": train_labels,
        "test_images": images["test_batch"],
        "test_labels": np.array(labels["test_batch"]),
    }


@pytest.mark.parametrize("where", ["archive", "archive_dir", "folder", "folder_parent"])
def test_cifar10_reads_the_official_format_from_archive_or_folder(cifar, where):
    root = {
        "archive": cifar["archive"],
        "archive_dir": cifar["archive"].parent,
        "folder": cifar["folder"],
        "folder_parent": cifar["folder"].parent,
    }[where]
    arrays = read_cifar10(root)
    assert arrays.train_images.shape == (50, 3, 32, 32) and arrays.train_images.dtype == np.uint8
    np.testing.assert_array_equal(arrays.train_images, cifar["train_images"])
    np.testing.assert_array_equal(arrays.train_labels, cifar["train_labels"])
    np.testing.assert_array_equal(arrays.test_images, cifar["test_images"])
    np.testing.assert_array_equal(arrays.test_labels, cifar["test_labels"])
    assert arrays.classes[0] == "airplane" and arrays.classes[9] == "truck"


def test_cifar10_pixel_layout_is_red_green_blue_planes_row_major(cifar):
    arrays = read_cifar10(cifar["folder"])
    batch = pickle.loads((cifar["folder"] / "data_batch_2").read_bytes(), encoding="bytes")
    row = batch[b"data"][3]
    image = arrays.train_images[PER_BATCH + 3]  # fourth image of the second batch
    assert image[0, 0, 0] == row[0]
    assert image[0, 0, 31] == row[31]
    assert image[0, 1, 0] == row[32]
    assert image[1, 5, 7] == row[1024 + 5 * 32 + 7]
    assert image[2, 31, 31] == row[3071]


def test_cifar10_bundle_follows_the_paper_recipe(cifar):
    bundle = load_dataset("cifar10", root=cifar["archive"], cache=False)
    assert (bundle.train_size, bundle.test_size) == (50, 10)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 3, 32)
    assert bundle.augmentation == Augmentation(pad=4, flip=True)
    assert bundle.classes[3] == "cat"
    # Per-channel statistics of the training pixels, applied to both splits.
    raw_train = cifar["train_images"].astype(np.float64)
    mean = raw_train.mean(axis=(0, 2, 3))
    std = raw_train.std(axis=(0, 2, 3))
    np.testing.assert_allclose(bundle.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(bundle.std, std, rtol=1e-12)
    expected_test = (cifar["test_images"] - mean[None, :, None, None]) / std[None, :, None, None]
    np.testing.assert_allclose(bundle.test_x.numpy(), expected_test, atol=1e-5)
    np.testing.assert_array_equal(bundle.train_y.numpy(), cifar["train_labels"])


def test_the_per_pixel_mean_is_subtracted_as_the_paper_does(cifar):
    """`mean: pixel` (Sec. 4.2): each image minus the training images' mean image (computed by
    hand in float64 from the archive's raw pixels), before any crop."""
    from resnet_ablate.data.bundle import pixel_centred
    from resnet_ablate.data.feed import MemoryFeed, Placement

    bundle = load_dataset("cifar10", root=cifar["archive"], cache=False)
    raw_train = cifar["train_images"].astype(np.float64)
    std = raw_train.std(axis=(0, 2, 3))[None, :, None, None]
    mean_image = raw_train.mean(axis=0, keepdims=True)
    centred = pixel_centred(bundle)
    assert centred.centring == "pixel" and pixel_centred(centred) is centred
    np.testing.assert_allclose(centred.train_x.numpy(), (raw_train - mean_image) / std, atol=1e-5)
    np.testing.assert_allclose(centred.test_x.numpy(),
                               (cifar["test_images"] - mean_image) / std, atol=1e-5)
    # A run's feed centres the images it holds, which its batches then crop and pad (with 0:
    # the mean image's value).
    feed = MemoryFeed(bundle, Placement(torch.device("cpu"), lambda x: x, seed=0, augment=True,
                                        pixel_mean=True))
    torch.testing.assert_close(feed.train_x, centred.train_x)
    torch.testing.assert_close(feed.test_x, centred.test_x)


def test_cifar10_validation_split_is_stratified_seeded_and_disjoint(cifar):
    bundle = load_dataset(
        "cifar10", root=cifar["folder"], validation=True, validation_fraction=0.2, cache=False
    )
    assert bundle.eval_split == "validation"
    assert (bundle.train_size, bundle.test_size) == (40, 10)
    # Five images per class in training; a fifth of each class goes to validation.
    np.testing.assert_array_equal(np.bincount(bundle.test_y.numpy(), minlength=10), [1] * 10)
    train_raw = np.round(raw_from_normalised(bundle.train_x, bundle.mean, bundle.std))
    held_raw = np.round(raw_from_normalised(bundle.test_x, bundle.mean, bundle.std))
    # Validation images come from the training batches, never the test batch, and the two parts
    # together are the whole training set.
    np.testing.assert_array_equal(
        sorted_rows(np.concatenate([train_raw, held_raw])),
        sorted_rows(cifar["train_images"].astype(np.float64)),
    )
    # Statistics come from the 40 images trained on.
    np.testing.assert_allclose(bundle.mean, train_raw.mean(axis=(0, 2, 3)), rtol=1e-9)
    again = load_dataset(
        "cifar10", root=cifar["archive"], validation=True, validation_fraction=0.2, cache=False
    )
    assert torch.equal(again.test_x, bundle.test_x)
    other = load_dataset(
        "cifar10", root=cifar["archive"], validation=True, validation_fraction=0.2, seed=1,
        cache=False,
    )
    assert not torch.equal(other.test_x, bundle.test_x)


def test_missing_cifar10_says_where_it_looked_and_how_to_fix_it(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_dataset("cifar10", root=tmp_path / "nowhere")
    message = str(error.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in message
    assert str(tmp_path / "nowhere" / "cifar-10-python.tar.gz") in message
    assert "`download: true`" in message and "download=True" in message  # a spec's, Python's
    with pytest.raises(ValueError,
                       match="cifar10 needs a root: .*a spec.s dataset `root:`, Python.s root="):
        load_dataset("cifar10")


def test_cifar10_archive_missing_a_batch_names_the_member(tmp_path, cifar):
    broken = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(broken, "w:gz") as tar:
        tar.add(cifar["folder"] / "data_batch_1", arcname="cifar-10-batches-py/data_batch_1")
    member = "cifar-10-batches-py/data_batch_2"
    with pytest.raises(FileNotFoundError, match=f"lacks the member {member}"):
        read_cifar10(broken)


class _RunsACommand:
    """What a crafted batch file would smuggle in: unpickling it calls os.system."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


def test_a_crafted_cifar_batch_is_refused_without_running_anything(tmp_path, cifar):
    import shutil

    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(cifar["folder"], folder)
    marker = tmp_path / "ran"
    crafted = {b"labels": [0], b"data": _RunsACommand(f"touch {marker}")}
    (folder / "data_batch_1").write_bytes(pickle.dumps(crafted, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_1: not a CIFAR batch: refusing \w+\.system"):
        read_cifar10(folder)
    assert not marker.exists()


def fake_urlretrieve(source: Path):
    calls = []

    def retrieve(url, filename):
        calls.append(url)
        Path(filename).write_bytes(source.read_bytes())

    return retrieve, calls


def test_download_checks_the_md5_and_keeps_only_a_verified_archive(tmp_path, cifar, monkeypatch):
    retrieve, calls = fake_urlretrieve(cifar["archive"])
    monkeypatch.setattr(cifar_module.urllib.request, "urlretrieve", retrieve)
    # The tiny archive is not the official one: its md5 differs, so nothing is kept.
    with pytest.raises(OSError, match="c58f30108f718f92721af3b95e74349a"):
        load_dataset("cifar10", root=tmp_path / "a", download=True, cache=False)
    assert calls == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert list((tmp_path / "a").iterdir()) == []
    # With its digest accepted, the download lands under root and loads.
    digest = hashlib.md5(cifar["archive"].read_bytes()).hexdigest()
    monkeypatch.setitem(cifar_module.CIFAR_FORMATS, "cifar10",
                        dataclasses.replace(cifar_module.CIFAR10, md5=digest))
    bundle = load_dataset("cifar10", root=tmp_path / "b", download=True, cache=False)
    assert bundle.train_size == 50
    assert (tmp_path / "b" / "cifar-10-python.tar.gz").is_file()
    # Once present, nothing is downloaded again.
    load_dataset("cifar10", root=tmp_path / "b", download=True, cache=False)
    assert len(calls) == 2


def test_a_download_that_cannot_reach_the_address_says_what_to_do_and_leaves_nothing(
        tmp_path, monkeypatch):
    """Offline (as a --dry-run of a CIFAR spec with `download: true` finds itself): one error
    naming the address, the folder and the fix; no empty folder, no partial file."""
    def unreachable(url, filename):
        Path(filename).write_bytes(b"partial")
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(cifar_module.urllib.request, "urlretrieve", unreachable)
    root = tmp_path / "data"
    with pytest.raises(DataUnavailable) as raised:  # not retried: it fails again
        load_dataset("cifar10", root=root, download=True, cache=False)
    assert str(raised.value) == (
        f"could not download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into "
        f"{root}/ ([Errno -2] Name or service not known); where this machine cannot reach it, "
        f"put cifar-10-python.tar.gz (or the folder it unpacks to) in {root}/ yourself")
    assert not root.exists()
    (tmp_path / "kept").mkdir()  # a folder that was there stays, emptied of the partial file
    with pytest.raises(OSError, match="could not download"):
        load_dataset("cifar10", root=tmp_path / "kept", download=True, cache=False)
    assert list((tmp_path / "kept").iterdir()) == []


@pytest.mark.parametrize("member, key, value, expected", [
    ("data_batch_1", b"labels", [1000] * PER_BATCH,
     r"data_batch_1: b'labels' holds 1000; expected a list of class indices in 0\.\.9 "
     r"\(CIFAR-10 has 10 classes\)"),
    ("data_batch_1", b"labels", [10**30] * PER_BATCH,
     r"data_batch_1: b'labels': not class indices in 0\.\.9 \(a object array\)"),
    ("test_batch", b"data", [[300] * 3072] * PER_BATCH,
     r"test_batch: b'data': not 3072 pixel values in 0\.\.255 per image \(values up to 300\)"),
    ("batches.meta", b"label_names", 10,
     r"batches.meta: b'label_names' holds 10; expected a list of 10 class names"),
])
def test_malformed_cifar_values_are_one_error_naming_the_member(member, key, value, expected,
                                                                tmp_path, cifar):
    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(cifar["folder"], folder)
    batch = pickle.loads((folder / member).read_bytes(), encoding="bytes")
    batch[key] = value
    (folder / member).write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ValueError, match=expected) as error:
        read_cifar10(folder)
    assert len(str(error.value).splitlines()) == 1


def test_cifar100_reads_its_official_format_with_the_fine_labels(tmp_path):
    """CIFAR-100 as its archive holds it: one train and one test pickle with fine and coarse
    labels, a meta file with both name lists; the bundle has the 100 fine classes."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    expected = {}
    for member, count in (("train", 30), ("test", 20)):
        images = rng.integers(0, 256, size=(count, 3, 32, 32), dtype=np.uint8)
        fine = [int(c) for c in rng.integers(0, 100, size=count)]
        batch = {b"filenames": [b"x.png"] * count, b"batch_label": member.encode(),
                 b"fine_labels": fine, b"coarse_labels": [c // 5 for c in fine],
                 b"data": np.stack([official_row(image) for image in images])}
        (folder / member).write_bytes(pickle.dumps(batch, protocol=2))
        expected[member] = (images, np.array(fine))
    fine_names = [f"class{i}".encode() for i in range(100)]
    meta = {b"fine_label_names": fine_names, b"coarse_label_names": [b"super"] * 20}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    archive = tmp_path / "archived" / "cifar-100-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-100-python")

    for root in (folder, tmp_path, archive, archive.parent):
        arrays = cifar_module.read_cifar100(root)
        np.testing.assert_array_equal(arrays.train_images, expected["train"][0])
        np.testing.assert_array_equal(arrays.train_labels, expected["train"][1])
        np.testing.assert_array_equal(arrays.test_labels, expected["test"][1])
        assert arrays.classes == tuple(n.decode() for n in fine_names)
    bundle = load_dataset("cifar100", root=archive, cache=False)
    assert (bundle.num_classes, bundle.train_size, bundle.test_size) == (100, 30, 20)
    # The archive's own counts, not the official 50,000 (a dry run's cost of a subset).
    assert dataset_shape("cifar100", root=archive) == DatasetShape(100, 3, 32, 30, 20, "test")
    with pytest.raises(FileNotFoundError, match=r"CIFAR-100 not found: .*cifar-100-python\.tar\.gz"):
        load_dataset("cifar100", root=tmp_path / "nowhere", cache=False)


# ---------------------------------------------------------------------------------------------
# Augmentation


def test_crop_of_padded_image_matches_a_hand_computed_window():
    image = torch.arange(1.0, 10.0).view(1, 1, 3, 3)  # [[1,2,3],[4,5,6],[7,8,9]]
    top_left = crop_and_flip(image, 1, torch.tensor([0]), torch.tensor([0]), torch.tensor([False]))
    assert top_left[0, 0].tolist() == [[0, 0, 0], [0, 1, 2], [0, 4, 5]]
    no = torch.tensor([False])
    bottom_right = crop_and_flip(image, 1, torch.tensor([2]), torch.tensor([2]), no)
    assert bottom_right[0, 0].tolist() == [[5, 6, 0], [8, 9, 0], [0, 0, 0]]
    flipped = crop_and_flip(image, 1, torch.tensor([0]), torch.tensor([2]), torch.tensor([True]))
    # Window rows 0..2, columns 2..4 of the padded image is [[0,0,0],[2,3,0],[5,6,0]], mirrored.
    assert flipped[0, 0].tolist() == [[0, 0, 0], [0, 3, 2], [0, 6, 5]]


def test_batched_crop_equals_per_image_slices_of_the_padded_batch_and_flip_equals_torch_flip():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 32, 32, generator=generator)
    top = torch.tensor([0, 8, 3, 4, 7, 1])
    left = torch.tensor([8, 0, 5, 4, 2, 6])
    no_flip = torch.zeros(6, dtype=torch.bool)
    padded = torch.zeros(6, 3, 40, 40)
    padded[:, :, 4:36, 4:36] = images
    crops = crop_and_flip(images, 4, top, left, no_flip)
    for n in range(6):
        expected = padded[n, :, top[n] : top[n] + 32, left[n] : left[n] + 32]
        assert torch.equal(crops[n], expected)
    flips = crop_and_flip(images, 4, top, left, ~no_flip)
    assert torch.equal(flips, torch.flip(crops, dims=[-1]))
    # A channels_last batch gives the same crops, still channels_last (no copy before the model).
    nhwc = crop_and_flip(images.contiguous(memory_format=torch.channels_last), 4, top, left, no_flip)
    assert torch.equal(nhwc, crops) and nhwc.is_contiguous(memory_format=torch.channels_last)


def test_crop_offsets_out_of_range_are_rejected():
    with pytest.raises(ValueError, match=r"top must be 1 offsets in \[0, 8\]"):
        crop_and_flip(
            torch.zeros(1, 1, 4, 4), 4, torch.tensor([9]), torch.tensor([0]), torch.tensor([False])
        )


def test_random_crop_flip_is_seeded_and_draws_every_window_and_both_flips():
    images = torch.randn(400, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    augmentation = Augmentation(pad=1, flip=True)
    a = random_crop_flip(images, augmentation, torch.Generator().manual_seed(7))
    b = random_crop_flip(images, augmentation, torch.Generator().manual_seed(7))
    c = random_crop_flip(images, augmentation, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Every output is one of the 3 x 3 windows, plain or mirrored, of its own padded image; with
    # 400 draws every one of the 18 choices turns up.
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    seen = set()
    for n in range(images.shape[0]):
        matches = [
            (dy, dx, mirror)
            for dy in range(3)
            for dx in range(3)
            for mirror in (False, True)
            if torch.equal(
                a[n],
                torch.flip(padded[n, :, dy : dy + 6, dx : dx + 6], dims=[-1])
                if mirror
                else padded[n, :, dy : dy + 6, dx : dx + 6],
            )
        ]
        assert matches, f"image {n} is no window of its padded image"
        seen.update(matches)
    assert len(seen) == 18


def test_random_crop_without_flip_never_mirrors():
    images = torch.randn(64, 1, 5, 5, generator=torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(0)
    out = random_crop_flip(images, Augmentation(pad=0, flip=False), generator)
    assert torch.equal(out, images)
