"""Sharded data sets (webdataset tar shards): counting and checks, per-image seeded augmentation,
corrupt samples skipped and counted, and a study trained end to end on generated shards."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import optuna
import pytest
import ray
import torch
from PIL import Image

from helpers import write_spec
from resnet_ablate.imagefolder import IMAGENET_MEAN, IMAGENET_STD
from resnet_ablate.shards import load_shards

CLASSES = 6


def _jpeg(label: int, rng: np.random.Generator, size=(40, 34)) -> bytes:
    colour = np.array([40 * label + 20, 255 - 35 * label, (90 * label) % 256], dtype=np.float64)
    pixels = np.clip(colour + rng.normal(0, 12, size=(size[1], size[0], 3)), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three training shards (6 classes x 4 images, one more sample whose image is corrupt) and
    one validation shard (6 x 3); the images kept for the hand-made evaluation."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    val_images = []
    samples = [(f"s{label}-{i}", label, _jpeg(label, rng)) for label in range(CLASSES) for i in range(4)]
    for shard in range(3):
        with tarfile.open(root / f"train-{shard:03d}.tar", "w") as archive:
            for key, label, image in samples[shard::3]:
                _add(archive, f"{key}.jpg", image)
                _add(archive, f"{key}.cls", str(label).encode())
            if shard == 0:
                _add(archive, "broken.jpg", b"\xff\xd8\xff not a jpeg")
                _add(archive, "broken.cls", b"0")
    with tarfile.open(root / "val-000.tar", "w") as archive:
        for label in range(CLASSES):
            for i in range(3):
                image = _jpeg(label, rng, size=(44 + 2 * i, 36))
                val_images.append((label, image))
                _add(archive, f"v{label}-{i}.jpg", image)
                _add(archive, f"v{label}-{i}.cls", str(label).encode())
    return root, val_images


def _spec(root) -> dict:
    return {"train": str(root / "train-{000..002}.tar"), "val": str(root / "val-000.tar"),
            "num_classes": CLASSES}


def test_local_shards_are_counted_and_checked(shards, tmp_path):
    root, _ = shards
    data = load_shards(_spec(root), image_size=24, loader_workers=0)
    assert (data.train_size, data.test_size, len(data.train_urls)) == (6 * 4 + 1, 6 * 3, 3)
    with pytest.raises(FileNotFoundError, match=r"shards.train: 1 of 4 shards not found"):
        load_shards({**_spec(root), "train": str(root / "train-{000..003}.tar")})
    with pytest.raises(ValueError, match="shards.train_size: needed for shards behind URLs"):
        load_shards({**_spec(root), "train": "https://example.invalid/train-{000..001}.tar"})
    with pytest.raises(ValueError, match="missing num_classes"):
        load_shards({"train": _spec(root)["train"], "val": _spec(root)["val"]})


def _epoch(data, epoch):
    images, labels, skipped = [], [], 0
    # Batches of one: training loaders drop each worker's last partial batch, and there is none.
    for x, y, s in data.train_loader(1, epoch, torch.Generator().manual_seed(0)):
        skipped += s
        if len(y):
            images.append(x)
            labels.append(y)
    return torch.cat(images), torch.cat(labels), skipped


def test_each_images_crops_are_seeded_and_a_corrupt_one_is_skipped_and_counted(shards):
    root, _ = shards
    serial = load_shards(_spec(root), image_size=24, loader_workers=0)
    parallel = load_shards(_spec(root), image_size=24, loader_workers=2)
    a, la, skipped = _epoch(serial, 1)
    b, lb, skipped2 = _epoch(parallel, 1)
    assert skipped == skipped2 == 1 and len(la) == len(lb) == 6 * 4
    # Worker count changes the order, never an image's crop: match the images up by content.
    key = lambda x: [round(v, 4) for v in x.flatten()[:16].tolist()]  # noqa: E731
    assert sorted(map(key, a)) == sorted(map(key, b))
    assert not torch.equal(_epoch(serial, 2)[0], a), "each epoch draws new crops and a new order"


def test_a_study_trains_end_to_end_on_shards(shards, tmp_path):
    from resnet_ablate.results import load
    from resnet_ablate.spec import load_spec
    from resnet_ablate.study import RunOptions, run_study

    root, val_images = shards
    raw = {
        "study": "sharded", "model": {"family": "imagenet", "widths": [8, 16, 16, 32],
                                      "stages": [1, 1, 1, 1], "block": "basic"},
        "dataset": {"name": "webdataset", "shards": _spec(root), "image_size": 32,
                    "loader_workers": 1},
        "space": {"shortcut": ["A"]}, "seeds": 1,
        "train": {"preset": "imagenet", "epochs": 2, "batch_size": 25, "eval_batch_size": 8},
        "resources": {"cpus": 2, "workers": 1},
    }
    try:
        summary = run_study(load_spec(write_spec(tmp_path, raw)),
                            RunOptions(runs_dir=tmp_path, progress=False))
    finally:
        ray.shutdown()
    assert summary.completed == 1, summary
    (trial,) = optuna.load_study(study_name="sharded", storage=summary.storage).get_trials()
    curves = trial.user_attrs["curves"]
    assert [c["skipped_images"] for c in curves] == [1, 1]
    model = load("sharded", runs_dir=tmp_path).model(trial.number)
    wrong = 0
    for label, data in val_images:  # the evaluation, decoded here by hand
        image = Image.open(io.BytesIO(data)).convert("RGB")
        scale = 37 / min(image.size)
        image = image.resize((max(37, round(image.size[0] * scale)),
                              max(37, round(image.size[1] * scale))), Image.BILINEAR)
        left, top = (image.size[0] - 32) // 2, (image.size[1] - 32) // 2
        pixels = np.asarray(image.crop((left, top, left + 32, top + 32)), np.float32) / 255
        pixels = (pixels - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
        wrong += int(model(torch.from_numpy(pixels.transpose(2, 0, 1).copy())[None]).argmax(1).item() != label)
    assert curves[-1]["test_error"] == pytest.approx(wrong / len(val_images))


def test_replicas_read_their_own_shards_for_the_same_number_of_steps(shards):
    root, _ = shards
    data = load_shards(_spec(root), image_size=24, loader_workers=0)
    key = lambda x: tuple(round(v, 4) for v in x.flatten()[:16].tolist())  # noqa: E731
    seen = []
    for part in (0, 1):
        batches = list(data.train_loader(2, 1, torch.Generator().manual_seed(0), part=part,
                                         parts=2))
        # One epoch's worth of global batches (25 samples // (2 x 2)) on each replica, the
        # replica with fewer samples reading its shard again rather than stopping early.
        assert len(batches) == data.train_size // 4
        seen.append({key(x) for images, _, _ in batches for x in images})
    assert not seen[0] & seen[1], "a shard is read by one replica only"
    with pytest.raises(ValueError, match="3 training shard.*cannot feed 4 replicas"):
        data.train_loader(2, 1, torch.Generator(), part=0, parts=4)
    halves = [[y for _, y, _ in data.test_loader(4, part=p, parts=2)] for p in (0, 1)]
    assert sum(len(y) for batch in halves for y in batch) == data.test_size
