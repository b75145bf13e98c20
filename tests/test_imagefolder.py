"""Image-folder data sets, streamed from disk: the layout checks, the transforms against values
computed by hand, seeded augmentation whatever the number of loader workers, corrupt images
skipped and counted, and a study trained end to end on a generated folder."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import optuna
import pytest
import ray
import torch
from PIL import Image

from helpers import write_spec
from resnet_ablate.data.decode import IMAGENET_MEAN, IMAGENET_STD, decode, normalise
from resnet_ablate.data.folders import IMAGE_SUFFIXES, load_image_folder, scan_image_folder

CLASSES = ("ant", "bee", "cat", "dog", "eel", "fox")  # six: top-5 error means something


def _colour(label: int) -> np.ndarray:
    return np.array([40 * label + 20, 255 - 35 * label, (90 * label) % 256], dtype=np.float64)


def _write_image(path, label: int, rng: np.random.Generator, size=(40, 30)) -> None:
    noise = rng.normal(0, 12, size=(size[1], size[0], 3))
    pixels = np.clip(_colour(label) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Six classes of noisy solid colours: 5 JPEG and 2 PNG training images each (sizes vary),
    3 validation images each, and one corrupt file among the training images."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        for split, count in (("train", 7), ("val", 3)):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                suffix = "png" if split == "train" and i >= 5 else "jpg"
                size = (40 + 6 * i, 30 + 4 * label)
                _write_image(root / split / name / f"{i}.{suffix}", label, rng, size)
    (root / "train" / "ant" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return root


def test_scan_indexes_each_split_by_class(folder):
    index = scan_image_folder(folder)
    assert index.classes == CLASSES
    assert len(index.train) == 6 * 7 + 1 and len(index.test) == 6 * 3
    assert {label for _, label in index.test} == set(range(6))
    assert all(f"/train/{CLASSES[label]}/" in path for path, label in index.train)


def test_pgm_images_are_read_and_other_files_left_out_with_a_warning(tmp_path):
    """The suffixes torchvision's ImageFolder reads (.pgm was left out), and the files it does not
    (a .gif, a notes file) named in one warning rather than dropped in silence."""
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for label, name in enumerate(CLASSES[:2]):
            (tmp_path / split / name).mkdir(parents=True)
            _write_image(tmp_path / split / name / "0.jpg", label, rng)
    gray = np.full((30, 40), 128, dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "train" / "ant" / "1.pgm")
    Image.fromarray(gray).save(tmp_path / "train" / "ant" / "2.gif")
    (tmp_path / "train" / "bee" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "bee" / "more").mkdir()
    (tmp_path / "train" / "bee" / "more" / "list.csv").write_text("a sub-folder's file too")
    (tmp_path / "train" / "bee" / ".DS_Store").write_bytes(b"")  # hidden: no word
    with pytest.warns(UserWarning, match=r"train: 3 files in its class folders left out, "
                                         r"not being images \(.csv: 1, .gif: 1, .txt: 1\)"):
        index = scan_image_folder(tmp_path)
    assert sorted(path.rsplit("/", 1)[1] for path, _ in index.train) == ["0.jpg", "0.jpg", "1.pgm"]
    assert decode(str(tmp_path / "train" / "ant" / "1.pgm"), image_size=16, augmentation="scale",
                  rng=None).shape \
        == (3, 16, 16)


def test_images_in_sub_folders_are_read_in_torchvisions_order(tmp_path):
    """torchvision's ImageFolder walks each class folder (os.walk, links followed) and lists the
    folders sorted by path, each one's files sorted: 'bee/a b' comes before 'bee/a/x', which a
    depth-first walk would not give. A link back up the tree is not walked again."""
    rng = np.random.default_rng(2)
    layout = {"ant": ["0.jpg"],
              "bee": ["b.jpg", "a.jpg", "a/x.jpg", "a/w.png", "a b/y.jpg", "z/deeper/q.jpg"]}
    for split in ("train", "val"):
        for label, (name, files) in enumerate(layout.items()):
            for file in files:
                (tmp_path / split / name / file).parent.mkdir(parents=True, exist_ok=True)
                _write_image(tmp_path / split / name / file, label, rng)
    (tmp_path / "train" / "bee" / "z" / "deeper" / "up").symlink_to(tmp_path / "train" / "bee")
    index = scan_image_folder(tmp_path)
    # By hand, in torchvision's order: folders bee, bee/a, bee/a b, bee/z/deeper.
    expected = ["ant/0.jpg", "bee/a.jpg", "bee/b.jpg", "bee/a/w.png", "bee/a/x.jpg",
                "bee/a b/y.jpg", "bee/z/deeper/q.jpg"]
    for split, samples in (("train", index.train), ("val", index.test)):
        assert [path for path, _ in samples] == [str(tmp_path / split / f) for f in expected]
        assert [label for _, label in samples] == [0] + [1] * 6


@pytest.mark.parametrize("damage, message", [
    ("no root", "image folder {root}/nowhere does not exist"),
    ("no val", "has no val/ split"),
    ("no classes", "holds no class folders"),
    ("empty class", "class folder(s) cat hold no image"),
    ("unknown val class", "class folder(s) gnu are not classes of"),
    ("one class", "{root}/train holds one class folder (ant); a classifier needs two classes"),
    # Left out in silence before: a class behind a broken link (every later label shifts), and
    # images beside the class folders.
    ("dangling class link", "{root}/train/bee links to {root}/gone, which does not exist"),
    ("loose images", "{root}/train holds 1 image(s) beside its class folders (stray.jpg), which "
                     "belong to no class"),
])
def test_a_broken_layout_is_one_error_naming_what_is_wrong(damage, message, tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("ant", "cat"):
            (tmp_path / split / name).mkdir(parents=True)
            _write_image(tmp_path / split / name / "0.jpg", 0, rng)
    root = tmp_path
    if damage == "no root":
        root = tmp_path / "nowhere"
    elif damage == "no val":
        for path in (tmp_path / "val").rglob("*.jpg"):
            path.unlink()
        for sub in ("ant", "cat"):
            (tmp_path / "val" / sub).rmdir()
        (tmp_path / "val").rmdir()
    elif damage == "no classes":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "train").mkdir()
        (tmp_path / "empty" / "val").mkdir()
        root = tmp_path / "empty"
    elif damage == "empty class":
        (tmp_path / "train" / "cat" / "0.jpg").unlink()
    elif damage == "one class":
        for split in ("train", "val"):
            (tmp_path / split / "cat" / "0.jpg").unlink()
            (tmp_path / split / "cat").rmdir()
    elif damage == "dangling class link":
        (tmp_path / "train" / "bee").symlink_to(tmp_path / "gone")
    elif damage == "loose images":
        _write_image(tmp_path / "train" / "stray.jpg", 0, rng)
    else:
        (tmp_path / "val" / "gnu").mkdir()
        _write_image(tmp_path / "val" / "gnu" / "0.jpg", 0, rng)
    with pytest.raises((FileNotFoundError, ValueError), match=message.format(root=tmp_path)
                       .replace("(", r"\(").replace(")", r"\)")):
        scan_image_folder(root)


def test_evaluation_crops_are_normalised_with_imagenets_statistics(tmp_path):
    """A flat colour stays flat through resizing and cropping: every pixel of the tensor must be
    (value / 255 - mean) / std, computed here by hand."""
    for split in ("train", "val"):
        # Two classes (a classifier needs them), the flat colour in the first.
        for name, colour in (("a_flat", (200, 100, 50)), ("b_other", (0, 0, 0))):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (50, 37), colour).save(tmp_path / split / name / "0.png")
    data = load_image_folder(tmp_path, image_size=16, loader_workers=0)
    crops, labels, skipped = next(iter(data.test_loader(4)))
    assert crops.dtype == torch.uint8, "loaders hand uint8 crops on; the device normalises them"
    images = normalise(crops)
    assert images.shape == (2, 3, 16, 16) and labels.tolist() == [0, 1] and skipped == 0
    for channel, value in enumerate((200, 100, 50)):
        expected = (value / 255 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel]
        torch.testing.assert_close(images[0, channel], torch.full((16, 16), expected),
                                   atol=1e-6, rtol=0)


def _epoch(data, epoch: int, seed: int = 0):
    # One batch of all 43 samples: training loaders drop a last partial batch.
    loader = data.train_loader(43, epoch, torch.Generator().manual_seed(seed))
    images, labels, skipped = [], [], 0
    for x, y, s in loader:
        images.append(normalise(x))
        labels.append(y)
        skipped += s
    return torch.cat(images), torch.cat(labels), skipped


@pytest.mark.parametrize("augmentation", ["scale", "random_resized_crop"])
def test_augmentation_is_seeded_per_image_whatever_the_loader_workers(folder, augmentation):
    serial = load_image_folder(folder, image_size=24, augmentation=augmentation, loader_workers=0)
    parallel = load_image_folder(folder, image_size=24, augmentation=augmentation, loader_workers=2)
    images, labels, skipped = _epoch(serial, 1)
    images2, labels2, skipped2 = _epoch(parallel, 1)
    assert torch.equal(images, images2) and torch.equal(labels, labels2)
    # The corrupt file is left out and counted, never a crash.
    assert skipped == skipped2 == 1 and len(labels) == 6 * 7
    assert images.shape[1:] == (3, 24, 24)
    other_epoch, _, _ = _epoch(serial, 2)
    assert not torch.equal(other_epoch, images), "each epoch draws new crops"


def test_crops_follow_the_trials_seed_whatever_the_loader_workers(folder):
    serial = load_image_folder(folder, image_size=24, loader_workers=0)
    parallel = load_image_folder(folder, image_size=24, loader_workers=2)

    def crops(data, augment_seed):
        loader = data.train_loader(43, 1, torch.Generator().manual_seed(0),
                                   augment_seed=augment_seed)
        return torch.cat([x for x, _, _ in loader])

    assert torch.equal(crops(serial, 7), crops(parallel, 7))
    other = crops(serial, 8)  # the same order (the same generator), another trial's seed
    assert all(not torch.equal(a, b) for a, b in zip(crops(serial, 7), other)), \
        "another trial seed draws other crops of every image"


def test_a_study_trains_end_to_end_on_an_image_folder(folder, tmp_path, capsys):
    from resnet_ablate.results import load
    from resnet_ablate.spec import load_spec
    from resnet_ablate.study import RunOptions, run_study

    raw = {
        "study": "folder", "model": {"family": "imagenet", "widths": [8, 16, 16, 32],
                                     "stages": [1, 1, 1, 1], "block": "basic"},
        "dataset": {"name": "imagefolder", "root": str(folder), "image_size": 32,
                    "loader_workers": 1},
        "space": {"shortcut": ["A", "none"]}, "seeds": 1,
        # 43 samples in one batch: none dropped, so every epoch meets the corrupt file.
        "train": {"preset": "imagenet", "epochs": 2, "batch_size": 43, "eval_batch_size": 8,
                  "decode": "auto"},  # a CPU trial: decoded on the CPU, and recorded so
        "resources": {"cpus": 2, "workers": 1},
    }
    spec = load_spec(write_spec(tmp_path, raw))
    try:
        summary = run_study(spec, RunOptions(runs_dir=tmp_path, progress=False))
    finally:
        ray.shutdown()  # the run started a local Ray; the next test file starts its own
    assert summary.completed == 2, summary
    trials = optuna.load_study(study_name="folder", storage=summary.storage).get_trials()
    results = load("folder", runs_dir=tmp_path)
    for trial in trials:
        curves = trial.user_attrs["curves"]
        assert [c["epoch"] for c in curves] == [1, 2]
        assert all(c["skipped_images"] == 1 for c in curves)  # the corrupt training image
        assert all(c["test_top5_error"] <= c["test_error"] for c in curves)
        assert trial.user_attrs["recipe"]["batch_size"] == 43 and trial.user_attrs["recipe"]["weight_decay"] == 1e-4
        # The recorded error is what the kept model makes of the val images, decoded by hand.
        model = results.model(trial.number)
        wrong = 0
        for label, name in enumerate(CLASSES):
            for path in sorted((folder / "val" / name).iterdir()):
                image = Image.open(path).convert("RGB")
                scale = round(32 * 256 / 224) / min(image.size)
                image = image.resize((max(37, round(image.size[0] * scale)),
                                      max(37, round(image.size[1] * scale))), Image.BILINEAR)
                left, top = (image.size[0] - 32) // 2, (image.size[1] - 32) // 2
                pixels = np.asarray(image.crop((left, top, left + 32, top + 32)), np.float32) / 255
                pixels = (pixels - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
                x = torch.from_numpy(pixels.transpose(2, 0, 1).copy())[None]
                wrong += int(model(x).argmax(1).item() != label)
        assert curves[-1]["test_error"] == pytest.approx(wrong / (6 * 3))
    # The final top-5 error is a results column, as ImageNet tables report it.
    table = results.trials.set_index("number")
    assert table["decode"].tolist() == ["cpu", "cpu"]
    for trial in trials:
        assert table.loc[trial.number, "test_top5_error"] == trial.user_attrs["curves"][-1]["test_top5_error"]
    assert len(results.summary(metric="test_top5_error")) == 2
    # The corrupt image its scores left out is a column, and `show` adds it where any trial has one.
    assert table["skipped_images"].tolist() == [1, 1]
    from resnet_ablate.cli import main

    assert main(["show", "folder", "--runs-dir", str(tmp_path)]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert "skipped_images" in header.split()


def test_training_without_augmentation_reads_the_evaluation_crops(folder):
    data = load_image_folder(folder, image_size=24, loader_workers=0)
    images, labels, skipped = next(iter(data.train_loader(
        43, 1, torch.Generator().manual_seed(0), augment=False)))
    # The order the generator draws, each image as the evaluation decodes it (the corrupt one out).
    order = torch.randperm(len(data.index.train), generator=torch.Generator().manual_seed(0))
    paths = [data.index.train[int(i)] for i in order]
    expected = [(decode(path, image_size=24, augmentation="scale", rng=None), label)
                for path, label in paths if "broken" not in path]
    assert skipped == 1 and labels.tolist() == [label for _, label in expected]
    torch.testing.assert_close(normalise(images), torch.stack([x for x, _ in expected]))


def _contents(images):
    return sorted(tuple(round(v, 4) for v in x.flatten()[:16].tolist()) for x in images)


def test_replicas_share_each_global_batch_and_the_evaluation(folder):
    # Two replicas with batches of 4 read what one process reads with batches of 8: the same
    # images in the same global batches (each image's crop is its own), split between them.
    data = load_image_folder(folder, image_size=16, loader_workers=0)
    single = list(data.train_loader(8, 1, torch.Generator().manual_seed(0)))
    parts = [list(data.train_loader(4, 1, torch.Generator().manual_seed(0), part=p, parts=2))
             for p in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == len(single) == 43 // 8
    for k, (images, labels, skipped) in enumerate(single):
        shared = [parts[p][k] for p in (0, 1)]
        assert _contents(torch.cat([s[0] for s in shared])) == _contents(images)
        assert sorted(torch.cat([s[1] for s in shared]).tolist()) == sorted(labels.tolist())
        assert sum(s[2] for s in shared) == skipped
    whole = torch.cat([x for x, _, _ in data.test_loader(5)])
    halves = [torch.cat([x for x, _, _ in data.test_loader(5, part=p, parts=2)]) for p in (0, 1)]
    assert len(halves[0]) + len(halves[1]) == len(whole) == 18
    assert _contents(torch.cat(halves)) == _contents(whole)


def _train_folder(replicas, root, batch_size=8, image_size=16):
    from resnet_ablate.arch import ResNetArch
    from resnet_ablate.models import build
    from resnet_ablate.recipe import TrainRecipe
    from resnet_ablate.train import train

    data = load_image_folder(root, image_size=image_size, loader_workers=0)
    built = []

    def model():
        built.append(build(ResNetArch(family="imagenet", widths=(4, 8, 8, 8), stages=(1, 1, 1, 1),
                                      block="basic"), num_classes=data.num_classes))
        return built[-1]

    recipe = TrainRecipe(epochs=1, batch_size=batch_size, sync_bn=True, precision="fp32", lr=0.01)
    result = train(model, data, recipe, seed=5, threads=1, replicas=replicas)
    return result.history[0], built[-1].state_dict()


def test_replicas_that_lose_an_image_weigh_their_losses_as_one_process(folder):
    # One global batch holds the corrupt image: the replica that reads it has 3 images where
    # the other has 4, and its loss weighs 3/7 of the batch, as one process's mean over 7.
    from helpers import run_replicas

    (single, single_state) = _train_folder(None, folder)
    assert single.skipped_images == 1, "the corrupt image is in one of the epoch's batches"
    for record, state in run_replicas(_train_folder, 2, folder):
        assert record.skipped_images == 1
        assert record.train_loss == pytest.approx(single.train_loss, rel=1e-5)
        for name, value in single_state.items():
            torch.testing.assert_close(state[name].float(), value.float(), atol=1e-5, rtol=1e-4,
                                       msg=name)


def test_a_replica_whose_share_decoded_nothing_steps_with_the_others_as_one_process(tmp_path):
    """Batches of 2, one image a replica, 3 of each class's 5 images corrupt: of the epoch's 5
    batches (in this seed's order) two leave one replica nothing, two leave both nothing and one
    gives each an image. A replica with nothing steps with an empty batch and weight 0 (the run
    failed: "none of the images of a batch could be decoded"), a batch no replica decoded is
    skipped by all, and the replicas end where one process ends. (Few steps: a 1-image batch
    normalises 4 values a channel at the last stage, where rounding differences grow fast.)"""
    from helpers import run_replicas

    rng = np.random.default_rng(1)
    for label, name in enumerate(CLASSES[:2]):
        for split, count in (("train", 2), ("val", 2)):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                _write_image(tmp_path / split / name / f"{i}.jpg", label, rng, (24, 24))
        for i in range(3):
            (tmp_path / "train" / name / f"broken{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    # 64-pixel crops: one image still has 2x2 values a channel at the last stage.
    single, single_state = _train_folder(None, tmp_path, 2, 64)
    assert single.skipped_images == 6
    for record, state in run_replicas(_train_folder, 2, tmp_path, 2, 64):
        assert record.skipped_images == 6
        assert record.train_loss == pytest.approx(single.train_loss, rel=1e-5)
        for name, value in single_state.items():
            torch.testing.assert_close(state[name].float(), value.float(), atol=1e-5, rtol=1e-4,
                                       msg=name)


def test_the_command_line_says_a_left_out_file_in_one_line(tmp_path):
    """The warning as the command's errors are said (`resnet-ablate: ...`), not with the file,
    line and source line of Python's form."""
    rng = np.random.default_rng(4)
    for split in ("train", "val"):
        for label, name in enumerate(CLASSES[:2]):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            _write_image(tmp_path / "data" / split / name / "0.jpg", label, rng)
    (tmp_path / "data" / "train" / "ant" / "notes.txt").write_text("not an image")
    raw = {"study": "noted", "model": {"family": "imagenet", "widths": [8, 8, 8, 8],
                                       "stages": [1, 1, 1, 1], "block": "basic"},
           "dataset": {"name": "imagefolder", "root": str(tmp_path / "data"), "image_size": 16,
                       "loader_workers": 0},
           "space": {"shortcut": ["A"]}, "seeds": 1, "train": {"epochs": 1},
           "resources": {"cpus": 1, "workers": 1}}
    # A process of its own: pytest records warnings where the command would print them.
    done = subprocess.run([sys.executable, "-m", "resnet_ablate.cli", "run",
                           str(write_spec(tmp_path, raw)), "--dry-run", "--runs-dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # The dry run says what it found (the text file left out), before any training.
    assert (f"data: imagefolder at {tmp_path / 'data'}: 2 training images in 2 classes, 2 val "
            "images scored, 16x16 pixels a model sees") in done.stdout.splitlines()
    warned = [line for line in done.stderr.splitlines() if "warn" in line or "class folder" in line]
    assert warned == [f"resnet-ablate: warning: {tmp_path / 'data' / 'train'}: 1 file in its "
                      "class folders left out, not being images (.txt: 1); images are "
                      + ", ".join(IMAGE_SUFFIXES) + " anywhere in a class folder"]
