"""Sharded data sets (webdataset tar shards): counting and checks, per-image seeded augmentation,
corrupt samples skipped and counted, shard URLs opened without a shell, dotted keys, no score
from no images, and a study trained end to end on generated shards."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import re
import tarfile

import numpy as np
import optuna
import pytest
import torch
from PIL import Image

from helpers import labelled_images, run_spec_alone, write_shard
from resnet_ablate.data.decode import IMAGENET_MEAN, IMAGENET_STD, normalise
from resnet_ablate.recipe import TrainRecipe
from resnet_ablate.data.shard_urls import ALLOW_PIPE_URLS_ENV, open_shard
from resnet_ablate.data.shard_format import ShardError
from resnet_ablate.data.shards import load_shards
from resnet_ablate.train import NoImages, evaluate, train

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
    import typing

    from resnet_ablate.data.decode import AUGMENTATIONS, CropAugmentation

    root, _ = shards
    # The streamed options as image folders check them (shards took any augmentation name).
    assert set(typing.get_args(CropAugmentation)) == set(AUGMENTATIONS)
    with pytest.raises(ValueError, match="augmentation='flip' is not one of scale, "
                                         "random_resized_crop"):
        load_shards(_spec(root), augmentation="flip")
    with pytest.raises(ValueError, match="image_size must be an int >= 8, got 4"):
        load_shards(_spec(root), image_size=4)
    data = load_shards(_spec(root), image_size=24, loader_workers=0)
    assert (data.train_size, data.test_size, len(data.train_urls)) == (6 * 4 + 1, 6 * 3, 3)
    with pytest.raises(FileNotFoundError, match=r"shards.train: 1 of 4 shards not found"):
        load_shards({**_spec(root), "train": str(root / "train-{000..003}.tar")})
    with pytest.raises(FileNotFoundError, match=r"train-\*.tar \(a pattern names shards by brace "
                                                r"ranges, .*; \* and \? are not expanded\)"):
        load_shards({**_spec(root), "train": str(root / "train-*.tar")})
    with pytest.raises(ValueError, match="shards.train_size: needed for shards behind URLs"):
        load_shards({**_spec(root), "train": "https://example.invalid/train-{000..001}.tar"})
    with pytest.raises(ValueError, match="missing num_classes"):
        load_shards({"train": _spec(root)["train"], "val": _spec(root)["val"]})
    # A size given for local shards is the count, or refused naming both (an epoch reads its
    # size's worth of batches: 250 would go round the 25 images ten times).
    assert load_shards({**_spec(root), "train_size": 25}, image_size=24).train_size == 25
    assert load_shards({**_spec(root), "train_size": None}, image_size=24).train_size == 25
    with pytest.raises(ValueError, match="shards.train_size: 250 given, but the train shards hold "
                                         "25 images .* leave train_size out, or give 25"):
        load_shards({**_spec(root), "train_size": 250}, image_size=24)
    with pytest.raises(ValueError, match="shards.val_size must be an int >= 1 .*, got '18'"):
        load_shards({**_spec(root), "val_size": "18"}, image_size=24)
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    with pytest.raises(ValueError, match=r"shards.val: its 1 shard\(s\) hold no image \(first "
                                         r".*empty.tar\): nothing to score on"):
        load_shards({**_spec(root), "val": str(empty)}, image_size=24)
    mixed = f"{{{_spec(root)['val']},https://example.invalid/val-001.tar}}"
    with pytest.raises(ValueError, match="shards.val_size: 10 given, but the local val shards "
                                         "alone hold 18 images"):
        load_shards({**_spec(root), "val": mixed, "val_size": 10}, image_size=24)


def _epoch(data, epoch):
    images, labels, skipped = [], [], 0
    # Batches of one: training loaders drop each worker's last partial batch, and there is none.
    for x, y, s in data.train_loader(1, epoch, torch.Generator().manual_seed(0)):
        skipped += s
        if len(y):
            images.append(normalise(x))
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


def test_a_study_trains_end_to_end_on_shards(shards, tmp_path, local_ray):
    from resnet_ablate.results import load

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
    summary, (trial,) = run_spec_alone(tmp_path, raw)
    assert summary.completed == 1, summary
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


@pytest.mark.parametrize("label", [b"7", b"n01440764", b"-1"])
def test_a_label_that_is_no_class_index_is_named_before_training(http_shards, label):
    """A .cls member with a class past num_classes, a wnid or a negative number: one error
    naming the shard, the sample, the label and the valid range, when local shards are read
    (before training, sizes given or not), and as the loader reads one behind a URL."""
    root, base = http_shards
    bad = root / f"val-bad-{label.decode()}.tar"
    with tarfile.open(bad, "w") as archive:
        _add(archive, "v0.jpg", _jpeg(0, np.random.default_rng(1)))
        _add(archive, "v0.cls", label)
    sizes = {"train_size": 25, "val_size": 1}
    message = (rf"shard {{url}}, sample v0: label '{label.decode()}' is not a class index "
               rf"\(0 to {CLASSES - 1}\)")
    for spec in ({**_spec(root), "val": str(bad)}, {**_spec(root), "val": str(bad), **sizes}):
        with pytest.raises(ShardError, match=message.format(url=bad)):
            load_shards(spec, image_size=24, loader_workers=0)
    url = f"{base}/{bad.name}"
    served = load_shards({**_spec(root), "val": url, **sizes}, image_size=24, loader_workers=0)
    with pytest.raises(ShardError, match=message.format(url=url)):
        list(served.test_loader(4))


def test_images_without_a_label_are_named_before_training(shards, tmp_path):
    """A shard of images without their .cls members passed the dry run ("24 training images in 3
    classes"), and its trial failed an epoch in: every sample skipped as unlabelled."""
    root, _ = shards
    bare = tmp_path / "train-bare.tar"
    with tarfile.open(root / "train-000.tar") as source, tarfile.open(bare, "w") as archive:
        for member in source.getmembers():
            if not member.name.endswith(".cls") or member.name == "s0-0.cls":
                archive.addfile(member, source.extractfile(member))
    with pytest.raises(ShardError, match=rf"shard {bare}: [0-9]+ of its [0-9]+ images have no "
                                         r"\.cls member \(e\.g\. s[0-9]-[0-9]\.jpg\)"):
        load_shards({**_spec(root), "train": str(bare)}, image_size=24, loader_workers=0)


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
    # A replica whose one shard holds fewer images than its batch (8 < 10) reads it twice in a
    # pass: each replica takes the epoch's step (25 // 20), where it took none and the other
    # replica waited at its all-reduce for ever.
    for part in (0, 1):
        assert len(list(data.train_loader(10, 1, torch.Generator().manual_seed(0), part=part,
                                          parts=2))) == 1
    # Shards with no decodable image at all end in one error rather than a replica that waits.
    from resnet_ablate.data.errors import DataUnavailable
    from resnet_ablate.data.replica_epoch import repeated

    passes = []
    with pytest.raises(DataUnavailable, match="hold no 4 decodable training images even read "
                                              "1024 times over"):
        next(repeated(lambda urls: passes.append(len(urls)) or [], ["a.tar"], 4))
    assert passes == [2 ** k for k in range(11)]
    # What a replica's first pass read, and whether it ended, for the epoch's size check: an
    # epoch whose last step is the pass's last batch ended it (it read as unended, and so only
    # "no more than stated" was checked: a review's case).
    from resnet_ablate.data.replica_epoch import FirstPass, ReplicaBatches

    def five_batches(urls):  # 5 batches of 4 samples, the third with one skipped
        return [(None, torch.zeros(4 - (i == 2)), int(i == 2)) for i in range(5)]

    for steps, seen in ((3, FirstPass(12, False)), (5, FirstPass(20, True)),
                        (7, FirstPass(20, True))):
        epoch = ReplicaBatches(five_batches, ["a.tar"], 4, steps)
        assert len(list(epoch)) == steps and epoch.first_pass == seen, steps
    with pytest.raises(ValueError, match="3 training shard.*cannot feed 4 replicas"):
        data.train_loader(2, 1, torch.Generator(), part=0, parts=4)
    halves = [[y for _, y, _ in data.test_loader(4, part=p, parts=2)] for p in (0, 1)]
    assert sum(len(y) for batch in halves for y in batch) == data.test_size


def _seeded_epoch(data, epoch, augment_seed):
    """The epoch's crops, sorted, so that the sample order (which depends on the loader workers)
    drops out."""
    crops = []
    for x, _, _ in data.train_loader(1, epoch, torch.Generator().manual_seed(0),
                                     augment_seed=augment_seed):
        crops += [tuple(round(v, 4) for v in image.flatten().tolist()) for image in x]
    return sorted(crops)


def test_crops_follow_the_trials_seed_whatever_the_loader_workers(shards):
    root, _ = shards
    serial = load_shards(_spec(root), image_size=24, loader_workers=0)
    parallel = load_shards(_spec(root), image_size=24, loader_workers=2)
    assert _seeded_epoch(serial, 1, 7) == _seeded_epoch(parallel, 1, 7)
    assert not set(_seeded_epoch(serial, 1, 7)) & set(_seeded_epoch(serial, 1, 8)), \
        "another trial seed draws other crops of every image"


# -- shard URLs: opened by the toolkit, never through a shell


def test_a_pipe_url_is_refused_before_anything_runs(shards, tmp_path):
    root, _ = shards
    canary = tmp_path / "CANARY"
    pipe = f"pipe:touch {canary}; cat {root / 'val-000.tar'}"
    with pytest.raises(ValueError, match=r"shards.train: 'pipe:touch .*' is a pipe: URL, which "
                                         r"runs a shell command; valid: a local path"):
        load_shards({**_spec(root), "train": pipe, "train_size": 18})
    for other in ("gs://bucket/train.tar", "sftp://host/train.tar", "scp://host/train.tar"):
        with pytest.raises(ValueError, match=f"shards.val: '{other}' has the scheme"):
            load_shards({**_spec(root), "val": other, "val_size": 18})
    # And where the trial opens a shard (its process may not be the one that read the spec).
    with pytest.raises(ValueError, match="is a pipe: URL"):
        open_shard(pipe)
    data = load_shards(_spec(root), image_size=24, loader_workers=0)
    with pytest.raises(ValueError, match="is a pipe: URL"):
        list(data._loader([pipe], 4, None, 0, False))
    assert not canary.exists()


def test_a_pipe_url_runs_with_the_opt_in(shards, tmp_path, monkeypatch):
    root, _ = shards
    monkeypatch.setenv(ALLOW_PIPE_URLS_ENV, "1")
    canary = tmp_path / "CANARY"
    data = load_shards({**_spec(root), "val": f"pipe:touch {canary}; cat {root / 'val-000.tar'}",
                        "val_size": 18}, image_size=24, loader_workers=0)
    assert sum(len(y) for _, y, _ in data.test_loader(4)) == 18
    assert canary.exists()


@pytest.fixture
def http_shards(shards):
    """The shards folder served over http on loopback, for the test's duration."""
    import functools
    import http.server
    import threading

    root, _ = shards
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_shards_are_read_without_running_a_command(http_shards, tmp_path, monkeypatch):
    import subprocess

    root, base = http_shards

    def no_command(*args, **kwargs):
        raise AssertionError(f"a command ran: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_command)
    data = load_shards({**_spec(root), "val": f"{base}/val-000.tar", "val_size": 18},
                       image_size=24, loader_workers=0)
    assert sum(len(y) for _, y, _ in data.test_loader(4)) == 18
    canary = tmp_path / "CANARY"
    for quoted in (f"{base}/val-000.tar'; touch {canary}; echo '",
                   f"{base}/val-000.tar'$(touch${{IFS}}{canary})'"):
        data = load_shards({**_spec(root), "val": quoted, "val_size": 18}, image_size=24,
                           loader_workers=0)
        with pytest.raises(ShardError, match=r"shard http://127.0.0.1:\d+/val-000.tar'.* "
                                             r"cannot be read: (HTTPError|InvalidURL)"):
            list(data.test_loader(4))
    assert not canary.exists()


# -- dotted keys (ImageNet's file names keep their .JPEG)


@pytest.mark.parametrize("label_name", ["{stem}.JPEG.cls", "{stem}.cls"])
def test_dotted_keys_are_counted_and_decoded_alike(label_name, tmp_path):
    members = []
    for name, data in labelled_images("n0144_", CLASSES, 2):
        stem, _, extension = name.rpartition(".")
        members.append((f"{stem}.JPEG.jpg" if extension == "jpg" else
                        label_name.format(stem=stem), data))
    write_shard(tmp_path / "train-000.tar", members)
    data = load_shards({"train": str(tmp_path / "train-000.tar"),
                        "val": str(tmp_path / "train-000.tar"), "num_classes": CLASSES},
                       image_size=24, loader_workers=0)
    batches = list(data.test_loader(5))
    assert data.test_size == sum(len(y) for _, y, _ in batches) == CLASSES * 2
    assert sum(s for _, _, s in batches) == 0
    assert sorted(torch.cat([y for _, y, _ in batches]).tolist()) == \
        sorted(list(range(CLASSES)) * 2)


# -- no score from no images


def _damaged(kind: str, folder) -> str:
    """A shard with no decodable image: empty, every image corrupt, or cut short inside its
    first image's header (its label read, the image not)."""
    path = folder / f"{kind}.tar"
    if kind == "empty":
        write_shard(path, [])
    elif kind == "undecodable":
        write_shard(path, [member for i in range(4) for member in
                           ((f"bad{i}.jpg", b"\xff\xd8\xff not a jpeg"), (f"bad{i}.cls", b"1"))])
    else:
        write_shard(path, [("cut.cls", b"1"), ("cut.jpg", labelled_images("x", 1, 1)[0][1])])
        whole = path.read_bytes()
        path.write_bytes(whole[:1024 + 100])  # the label's header and block, then part of a header
    return str(path)


def _tiny_model():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, CLASSES))


@pytest.mark.parametrize("kind", ["empty", "undecodable", "truncated"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_training_or_evaluating_on_no_image_fails_naming_the_split(shards, tmp_path, kind, split):
    root, _ = shards
    spec = {**_spec(root), split: _damaged(kind, tmp_path)}
    if kind == "truncated":  # local: refused as it is read, before training, sized or not
        for sized in ({}, {f"{split}_size": 1}):
            with pytest.raises(ShardError, match="cut short"):
                load_shards({**spec, **sized}, image_size=24, loader_workers=0)
        return
    if kind == "empty":  # local: refused as it is counted, before training
        with pytest.raises(ValueError, match=rf"shards.{split}: its 1 shard\(s\) hold no image"):
            load_shards(spec, image_size=24, loader_workers=0)
        return
    data = load_shards(spec, image_size=24, loader_workers=0)
    recipe = TrainRecipe(epochs=1, batch_size=2, eval_batch_size=4, precision="fp32")
    skipped = {"undecodable": 4}[kind]
    what = "epoch 1's training" if split == "train" else "the val split's evaluation"
    with pytest.raises(NoImages, match=f"{what} had no image to score: {skipped} image"):
        train(_tiny_model, data, recipe, seed=0, threads=1)


def test_evaluating_no_images_in_memory_fails():
    with pytest.raises(NoImages, match="evaluation had no image to score"):
        evaluate(_tiny_model(), torch.empty(0, 3, 8, 8), torch.empty(0, dtype=torch.int64))


def test_a_shard_cut_inside_an_image_fails_naming_it_and_is_not_retried(tmp_path, http_shards):
    """Cut short, locally or behind a URL, read in the process or in a decoding worker: one line
    naming the shard (a worker's error came out as "Caught ShardError in DataLoader worker
    process 0."), and a trial that meets it is data_unavailable, not a failure to retry."""
    from resnet_ablate import trial
    from resnet_ablate.arch import ResNetArch
    from resnet_ablate.data import CorruptShard
    from resnet_ablate.record import Status, TrialTask

    root, base = http_shards
    path = write_shard(root / "cut.tar", labelled_images("x", 2, 1))
    path.write_bytes(path.read_bytes()[:700])  # inside the first image's data
    sized = {"num_classes": CLASSES, "train_size": 2, "val_size": 2}
    # Local: read as it loads, sizes given or not.
    with pytest.raises(CorruptShard, match=f"^shard {path} cannot be read: not a tar file, or "
                                           "cut short"):
        load_shards({"train": str(path), "val": str(path), **sized}, image_size=24)
    # Behind a URL: read as it trains, in the process or in a decoding worker.
    url = f"{base}/cut.tar"
    for workers in (0, 1):
        data = load_shards({"train": url, "val": url, **sized}, image_size=24,
                           loader_workers=workers)
        with pytest.raises(CorruptShard, match=f"^shard {url} cannot be read: ReadError: "
                                               "[^@]*$"):
            list(data.test_loader(2))
    task = TrialTask(
        trial_number=0, arch=ResNetArch(family="cifar", depth=8).to_dict(), seed=0,
        dataset={"name": "webdataset", "image_size": 24, "loader_workers": 1,
                 "shards": {**_spec(root), "val": f"{base}/cut.tar", "val_size": 2}},
        recipe=TrainRecipe(epochs=1, batch_size=8).to_dict(), threads=1, use_gpu=False,
        keep_weights=False)
    outcome = trial.run_trial_body(task, None, torch.device("cpu"))
    assert outcome.status == Status.UNAVAILABLE, outcome.reason
    assert outcome.reason.startswith(f"shard {base}/cut.tar cannot be read: ReadError")


def test_each_trials_seed_reaches_its_streamed_crops(shards, monkeypatch):
    from resnet_ablate.data.shards import ShardData

    root, _ = shards
    data = load_shards(_spec(root), image_size=24, loader_workers=0)
    seeds = []
    original = ShardData.train_loader

    def recording(self, *args, **kwargs):
        seeds.append(kwargs["augment_seed"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ShardData, "train_loader", recording)
    recipe = TrainRecipe(epochs=1, batch_size=4, eval_batch_size=8, precision="fp32")
    for seed in (0, 1, 0):
        train(_tiny_model, data, recipe, seed=seed, threads=1)
    assert seeds[0] == seeds[2] != seeds[1]


# -- a missing or unreachable shard: named when the trial starts, not retried


def test_a_missing_or_unreachable_shard_is_named_by_the_check_a_trial_starts_with(http_shards):
    from helpers import free_port
    from resnet_ablate.data import DataUnavailable

    root, base = http_shards
    present = load_shards({**_spec(root), "val": f"{base}/val-000.tar", "val_size": 18},
                          image_size=24, loader_workers=0)
    present.check_available()  # every shard answers: nothing raised
    missing = load_shards({**_spec(root), "val": f"{base}/val-{{000..002}}.tar", "val_size": 18},
                          image_size=24, loader_workers=0)
    with pytest.raises(DataUnavailable, match=rf"^shards.val: shard {base}/val-001.tar cannot be "
                                              r"read: HTTP 404 .* \(and 1 more of its 3\)$"):
        missing.check_available()
    nobody = f"http://127.0.0.1:{free_port()}/train-000.tar"
    unreachable = load_shards({**_spec(root), "train": nobody, "train_size": 8}, image_size=24,
                              loader_workers=0)
    with pytest.raises(DataUnavailable, match=rf"^shards.train: shard {nobody} cannot be read: "
                                              r"unreachable \(URLError: .*refused"):
        unreachable.check_available()


def test_a_trial_whose_shard_is_missing_fails_before_training_and_is_not_retried(http_shards,
                                                                                 tmp_path,
                                                                                 local_ray):
    from resnet_ablate.record import FailureKind

    root, base = http_shards
    raw = {
        "study": "missing-shard", "model": {"family": "imagenet", "widths": [4, 8, 8, 8],
                                            "stages": [1, 1, 1, 1], "block": "basic"},
        "dataset": {"name": "webdataset", "image_size": 32, "loader_workers": 0,
                    "shards": {**_spec(root), "val": f"{base}/val-{{000..001}}.tar",
                               "val_size": 18}},
        "space": {"shortcut": ["A"]}, "seeds": 1, "max_attempts": 3,
        "train": {"preset": "imagenet", "epochs": 1, "batch_size": 8},
        "resources": {"cpus": 1, "workers": 1},
    }
    _, trials = run_spec_alone(tmp_path, raw)
    assert len(trials) == 1, "a deterministic failure is not tried again"
    (trial,) = trials
    assert trial.state == optuna.trial.TrialState.FAIL
    assert trial.user_attrs["failure_kind"] == FailureKind.DATA_UNAVAILABLE
    assert trial.user_attrs["failure"].startswith(f"shards.val: shard {base}/val-001.tar cannot "
                                                  "be read: HTTP 404")
    assert trial.user_attrs.get("curves", []) == [], "it failed before its first epoch"


# -- the paper's protocol on shards: statistics from the first training images, test-time views


def test_shards_pixel_statistics_and_views_are_the_image_folders_on_the_same_images(shards):
    from resnet_ablate.data.decode import PixelStatistics, centre_pixels, decode_views

    root, val_images = shards
    data = load_shards(_spec(root), image_size=24, loader_workers=0)
    crops = []  # every decodable training image, in shard order (fewer than the sample)
    for shard in range(3):
        with tarfile.open(root / f"train-{shard:03d}.tar") as archive:
            for member in archive.getmembers():
                if member.name.endswith(".jpg"):
                    crop = centre_pixels(io.BytesIO(archive.extractfile(member).read()), 24)
                    crops += [] if crop is None else [crop]
    assert len(crops) == 6 * 4
    expected = PixelStatistics.of(np.stack(crops))
    np.testing.assert_allclose(data.pixel_statistics.mean_image, expected.mean_image)
    np.testing.assert_allclose(data.pixel_statistics.eigenvalues, expected.eigenvalues)
    views, labels, skipped = next(iter(data.test_loader(4, view="ten_crop")))
    assert skipped == 0 and views[0].shape == (4, 10, 3, 24, 24)
    assert labels.tolist() == [label for label, _ in val_images[:4]]
    for i, (_, image) in enumerate(val_images[:4]):
        torch.testing.assert_close(views[0][i], decode_views(io.BytesIO(image), image_size=24,
                                                             view="ten_crop")[0])
    views, labels, _ = next(iter(data.test_loader(4, view="multi_scale")))
    assert len(labels) == 1 and len(views) == 5, "one image a batch, one view per scale"


def test_shard_statistics_take_an_equal_share_of_each_shard_in_a_seeded_order(tmp_path,
                                                                              monkeypatch):
    """Shards written class by class: a sample of 4 images takes the first image of each of 4
    shards (it took the first shard's 4, one class), and the shards drawn depend on the seed."""
    from resnet_ablate.data import shards as shard_module
    from resnet_ablate.data.decode import PixelStatistics, centre_pixels

    rng = np.random.default_rng(3)
    firsts = []
    for label in range(CLASSES):
        images = [_jpeg(label, rng) for _ in range(3)]
        firsts.append(images[0])
        with tarfile.open(tmp_path / f"train-{label:03d}.tar", "w") as archive:
            for i, image in enumerate(images):
                _add(archive, f"c{label}-{i}.jpg", image)
                _add(archive, f"c{label}-{i}.cls", str(label).encode())
    _write_val(tmp_path)
    monkeypatch.setattr(shard_module, "STATISTICS_SAMPLE", 4)
    spec = {"train": str(tmp_path / "train-{000..005}.tar"), "val": str(tmp_path / "val.tar"),
            "num_classes": CLASSES}
    means = {}
    for seed in (0, 1):
        order = list(range(CLASSES))
        np.random.default_rng(seed).shuffle(order)
        expected = PixelStatistics.of(
            [centre_pixels(io.BytesIO(firsts[label]), 24) for label in order[:4]])
        data = load_shards(spec, image_size=24, loader_workers=0, seed=seed)
        np.testing.assert_allclose(data.pixel_statistics.mean_image, expected.mean_image,
                                   rtol=1e-6)
        means[seed] = data.pixel_statistics.mean_image
    assert not np.allclose(means[0], means[1]), "another seed draws other shards"


def test_statistics_of_no_decodable_image_fail_as_no_images(tmp_path):
    """The per-pixel mean and lighting of a split whose images all fail to decode: NoImages,
    which a trial records as data_unavailable and does not retry (np.stack failed on nothing:
    an error, retried three times)."""
    from resnet_ablate.data import load_image_folder

    with tarfile.open(tmp_path / "train-000.tar", "w") as archive:
        for i in range(3):
            _add(archive, f"bad{i}.jpg", b"\xff\xd8 not a jpeg")
            _add(archive, f"bad{i}.cls", b"0")
    _write_val(tmp_path)
    data = load_shards({"train": str(tmp_path / "train-000.tar"),
                        "val": str(tmp_path / "val.tar"), "num_classes": CLASSES},
                       image_size=24, loader_workers=0)
    with pytest.raises(NoImages, match="none of the 3 training images read for the data set's "
                                       "pixel statistics could be decoded"):
        data.pixel_statistics
    # A trial's message names what in its recipe needs them (it named the per-pixel mean and
    # lighting both, whichever was used).
    from types import SimpleNamespace

    from resnet_ablate.data.feed import _pixel_statistics
    for lighting, pixel_mean, named in ((0.1, False, "PCA lighting (lighting) needs"),
                                        (0.0, True, "the per-pixel mean (mean: pixel) needs"),
                                        (0.1, True, "(mean: pixel) and PCA lighting (lighting) "
                                                    "need")):
        with pytest.raises(NoImages, match=re.escape(named) + " training images: none of the 3"):
            _pixel_statistics(data, SimpleNamespace(lighting=lighting, pixel_mean=pixel_mean))
    for name in ("a", "b"):
        for split in ("train", "val"):
            (tmp_path / "folder" / split / name).mkdir(parents=True)
        (tmp_path / "folder" / "train" / name / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
        (tmp_path / "folder" / "val" / name / "0.jpg").write_bytes(
            _jpeg(0, np.random.default_rng(0)))
    folder = load_image_folder(tmp_path / "folder", image_size=24, loader_workers=0)
    with pytest.raises(NoImages, match="none of the 2 training images read"):
        folder.pixel_statistics


def _write_val(root) -> None:
    rng = np.random.default_rng(9)
    with tarfile.open(root / "val.tar", "w") as archive:
        for label in range(2):
            _add(archive, f"v{label}.jpg", _jpeg(label, rng))
            _add(archive, f"v{label}.cls", str(label).encode())


def test_a_data_parallel_trial_that_fails_before_training_records_its_replicas(http_shards,
                                                                               monkeypatch):
    """A replica of a 2-replica run whose shard is missing: its outcome is unavailable, and its
    record says it was one of 2 replicas (it said 1: the record was made after the check)."""
    from types import SimpleNamespace

    from resnet_ablate import trial
    from resnet_ablate.arch import ResNetArch
    from resnet_ablate.record import Status, TrialTask

    root, base = http_shards
    monkeypatch.setattr(trial, "_backend", lambda: "gloo")  # no process group here
    task = TrialTask(
        trial_number=0, arch=ResNetArch(family="cifar", depth=8).to_dict(), seed=0,
        dataset={"name": "webdataset", "image_size": 24, "loader_workers": 0,
                 "shards": {**_spec(root), "val": f"{base}/val-{{000..001}}.tar",
                            "val_size": 18}},
        recipe=TrainRecipe(epochs=1, batch_size=8).to_dict(), threads=1, use_gpu=False,
        keep_weights=False)
    outcome = trial.run_trial_body(task, None, torch.device("cpu"),
                                   replicas=SimpleNamespace(world=2, leader=True))
    assert outcome.status == Status.UNAVAILABLE and "val-001.tar" in outcome.reason
    assert outcome.data_parallel is not None and outcome.data_parallel.replicas == 2


def test_a_local_shard_cut_between_members_is_refused_at_load(tmp_path, monkeypatch):
    """Cut where a member ends: tarfile reads a whole, shorter shard (its samples counted and
    trained on without a word); the missing end-of-archive blocks name it as cut short."""
    from resnet_ablate.data import CorruptShard

    path = write_shard(tmp_path / "train-000.tar", labelled_images("x", 3, 2))
    whole = path.read_bytes()
    with tarfile.open(path) as archive:
        second = archive.getmembers()[2]  # the second sample's first member
    spec = {"train": str(path), "val": str(path), "num_classes": 3}
    assert load_shards(spec, image_size=24, loader_workers=0).train_size == 6
    path.write_bytes(whole[:second.offset])
    with pytest.raises(CorruptShard, match=f"shard {path} cannot be read: cut short "
                                           r"\(no end-of-archive blocks after its 2 members\)"):
        load_shards(spec, image_size=24, loader_workers=0)
    # Found as the data set loads, every replica of a data-parallel trial finds it: an outcome
    # on each, not an error for Ray Train to restart the group for.
    from types import SimpleNamespace

    from resnet_ablate import trial
    from resnet_ablate.arch import ResNetArch
    from resnet_ablate.record import Status, TrialTask

    monkeypatch.setattr(trial, "_backend", lambda: "gloo")  # no process group here
    task = TrialTask(
        trial_number=0, arch=ResNetArch(family="cifar", depth=8).to_dict(), seed=0,
        dataset={"name": "webdataset", "image_size": 24, "loader_workers": 0, "shards": spec},
        recipe=TrainRecipe(epochs=1, batch_size=8).to_dict(), threads=1, use_gpu=False,
        keep_weights=False)
    outcome = trial.run_trial_body(task, None, torch.device("cpu"),
                                   replicas=SimpleNamespace(world=2, leader=True))
    assert outcome.status == Status.UNAVAILABLE and "cut short" in outcome.reason


class _Failing(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, index):
        from resnet_ablate.data import CorruptShard

        raise CorruptShard("shard s.tar cannot be read: ReadError: file could not be opened:\n"
                           "- method gz: ReadError('not a gzip file')")


def test_a_decoding_workers_shard_error_keeps_its_whole_message():
    """Raised in a DataLoader worker, a message of several lines comes out whole (only its last
    line came out, without the shard's name)."""
    from resnet_ablate.data import CorruptShard
    from resnet_ablate.data.shards import _NamingTheShard

    loader = _NamingTheShard(torch.utils.data.DataLoader(_Failing(), num_workers=1))
    with pytest.raises(CorruptShard) as raised:
        list(loader)
    assert str(raised.value) == ("shard s.tar cannot be read: ReadError: file could not be "
                                 "opened:\n- method gz: ReadError('not a gzip file')")


COMPRESSIONS = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}


def test_a_shard_behind_a_url_cut_between_members_fails_naming_it(http_shards):
    """Read as it trains, a shard cut where a member ends is named as cut short when its reader
    reaches the end without the end-of-archive blocks (it read as a whole, shorter shard), also
    compressed whole after the cut (gzip, bzip2, xz: its decompressed bytes are judged); the
    same shard whole, plain and compressed, reads through."""
    from resnet_ablate.data import CorruptShard

    root, base = http_shards
    whole = write_shard(root / "whole-000.tar", labelled_images("x", 3, 2))
    with tarfile.open(whole) as archive:
        second = archive.getmembers()[2]
    cut = whole.read_bytes()[:second.offset]
    (root / "between-000.tar").write_bytes(cut)
    for suffix, compress in COMPRESSIONS.items():
        (root / f"whole-000.tar.{suffix}").write_bytes(compress(whole.read_bytes()))
        (root / f"between-000.tar.{suffix}").write_bytes(compress(cut))
    sizes = {"num_classes": 3, "train_size": 6, "val_size": 6}
    for name in ("whole-000.tar", *(f"whole-000.tar.{suffix}" for suffix in COMPRESSIONS)):
        url = f"{base}/{name}"
        data = load_shards({"train": url, "val": url, **sizes}, image_size=24, loader_workers=0)
        assert sum(len(labels) for _, labels, _ in data.test_loader(4)) == 6, name
    for name in ("between-000.tar", *(f"between-000.tar.{suffix}" for suffix in COMPRESSIONS)):
        url = f"{base}/{name}"
        data = load_shards({"train": url, "val": url, **sizes}, image_size=24, loader_workers=0)
        with pytest.raises(CorruptShard, match=f"^shard {url} cannot be read: cut short"):
            list(data.test_loader(4))


@pytest.mark.parametrize("suffix", sorted(COMPRESSIONS))
def test_a_compressed_shard_with_wrong_bytes_is_a_corrupt_shard(http_shards, suffix):
    """Bytes flipped inside a compressed shard: the decompressors' own errors (zlib.error,
    lzma.LZMAError, a gzip CRC's OSError) came out raw, or as a connection's fault; they are
    CorruptShard, named, local or behind a URL (data_unavailable, not retried)."""
    from resnet_ablate.data import CorruptShard

    root, base = http_shards
    whole = write_shard(root / f"plain-{suffix}.tar", labelled_images("x", 3, 2))
    packed = COMPRESSIONS[suffix](whole.read_bytes())
    middle = len(packed) // 2
    flipped = packed[:middle] + bytes(b ^ 0xFF for b in packed[middle:middle + 16]) \
        + packed[middle + 16:]
    path = root / f"flipped-000.tar.{suffix}"
    path.write_bytes(flipped)
    with pytest.raises(CorruptShard, match=f"^shard {path} cannot be read"):
        load_shards({"train": str(path), "val": str(path), "num_classes": 3}, image_size=24,
                    loader_workers=0)
    url = f"{base}/{path.name}"
    data = load_shards({"train": url, "val": url, "num_classes": 3, "train_size": 6,
                        "val_size": 6}, image_size=24, loader_workers=0)
    with pytest.raises(CorruptShard, match=f"^shard {url} cannot be read"):
        list(data.test_loader(4))


@pytest.mark.parametrize("suffix", sorted(COMPRESSIONS))
def test_a_compressed_local_shard_is_read_once_as_it_loads(tmp_path, monkeypatch, suffix):
    """A compressed shard is counted, its labels and its end checked, in one pass over its
    bytes (a tar reader seeking back in it decompressed it again from its start); cut between
    members and compressed, it is refused naming it, and a bad label is named in it."""
    from resnet_ablate.data import CorruptShard, shard_format

    whole = write_shard(tmp_path / "plain.tar", labelled_images("x", 3, 2))
    with tarfile.open(whole) as archive:
        second = archive.getmembers()[2]
    path = tmp_path / f"train-000.tar.{suffix}"
    path.write_bytes(COMPRESSIONS[suffix](whole.read_bytes()))
    read = []

    class Counted(io.BufferedReader):
        def read(self, size=-1):
            data = super().read(size)
            if str(self.name) == str(path):
                read.append(len(data))
            return data

    monkeypatch.setattr(shard_format, "open", lambda name, mode: Counted(io.FileIO(name, mode)),
                        raising=False)
    spec = {"train": str(path), "val": str(whole), "num_classes": 3}
    assert load_shards(spec, image_size=24, loader_workers=0).train_size == 6
    assert 0 < sum(read) <= path.stat().st_size + 6  # the magic number, then the whole once
    path.write_bytes(COMPRESSIONS[suffix](whole.read_bytes()[:second.offset]))
    with pytest.raises(CorruptShard, match=rf"^shard {path} cannot be read: cut short \(no "
                                           r"end-of-archive blocks after its 2 members\)"):
        load_shards(spec, image_size=24, loader_workers=0)
    members = labelled_images("x", 3, 2)
    members[3] = (members[3][0], b"7")
    path.write_bytes(COMPRESSIONS[suffix](write_shard(tmp_path / "bad.tar", members).read_bytes()))
    with pytest.raises(CorruptShard, match=rf"shard {path}, sample x0-1: label '7' is not a class"):
        load_shards(spec, image_size=24, loader_workers=0)


def _replicated_epoch(urls: dict, train_size: int) -> list:
    """One training epoch of batch 8 on 2 replicas, each in a thread, their collective sums met
    at a barrier: each replica's steps, or the error it raised."""
    import threading

    from resnet_ablate.data.feed import Placement, StreamFeed

    data = load_shards({**urls, "train_size": train_size, "val_size": 18}, image_size=24,
                       loader_workers=0)
    given, barrier, outcomes = [None, None], threading.Barrier(2, timeout=20), [None, None]

    def summed(part: int):
        def sums(values: list) -> list:
            given[part] = values
            barrier.wait()
            total = [float(a) + float(b) for a, b in zip(*given)]
            barrier.wait()
            return total
        return sums

    def replica(part: int) -> None:
        feed = StreamFeed(data, Placement(torch.device("cpu"), lambda x: x, seed=0, augment=True,
                                          part=part, parts=2, sum_over_replicas=summed(part)))
        try:
            outcomes[part] = sum(1 for _ in feed.train_batches(1, 8))
        except Exception as error:  # noqa: BLE001 (each replica's outcome is compared)
            outcomes[part] = error  # (the other, waiting at the barrier, breaks on its timeout)

    threads = [threading.Thread(target=replica, args=(part,)) for part in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def test_a_size_stated_for_shards_behind_urls_is_checked_by_a_pass_over_them(http_shards,
                                                                             tmp_path, local_ray):
    """Shards behind URLs are not counted before training, so their sizes are the spec's word:
    a wrong train_size set a data-parallel epoch's length (its shards read round and round)
    and the study's costs, and val_size was read by nothing. An epoch in one process reads
    every training shard once, and an evaluation every val shard: each checks its size, and a
    trial whose size is wrong fails naming it, not retried."""
    from resnet_ablate.data import SizeMisstated
    from resnet_ablate.data.feed import Placement, StreamFeed
    from resnet_ablate.record import FailureKind

    root, base = http_shards
    urls = {"train": f"{base}/train-{{000..002}}.tar", "val": f"{base}/val-000.tar",
            "num_classes": CLASSES}

    def epoch(train_size: int) -> int:
        data = load_shards({**urls, "train_size": train_size, "val_size": 18}, image_size=24,
                           loader_workers=0)
        feed = StreamFeed(data, Placement(torch.device("cpu"), lambda x: x, seed=0,
                                          augment=True))
        return sum(len(labels) for _, labels, _ in feed.train_batches(1, 8))

    # 25 samples (one undecodable): three batches of 8 read 24, the last one left unread.
    assert epoch(25) == 24 - 1
    for wrong in (250, 20):
        with pytest.raises(SizeMisstated, match=rf"^shards.train_size: {wrong} stated, but a pass "
                                                r"over the train shards read 24 images \(give or "
                                                r"take 7 in partial batches\): give their count"):
            epoch(wrong)
    # Two replicas (threads here, their sums a barrier's): with 3 steps an epoch, one reads two
    # shards (17 samples) without ending its pass and the other its one shard again, so only
    # "no more than stated" is checked; a size overstated twofold has each read its shards round
    # and round (6 steps), both passes end, and their sum (24 of 25, 1 in a partial batch) is
    # checked as one process's would be.
    assert _replicated_epoch(urls, 25) == [3, 3]
    outcomes = _replicated_epoch(urls, 50)
    for outcome in outcomes:
        assert isinstance(outcome, SizeMisstated) and str(outcome).startswith(
            "shards.train_size: 50 stated, but a pass over the train shards read 24 images "
            "(give or take 6 in partial batches)")
    local = load_shards(_spec(root), image_size=24, loader_workers=0)
    assert local.sizes_stated == (), "local shards are counted: nothing to check"

    raw = {
        "study": "misstated-val", "model": {"family": "imagenet", "widths": [4, 8, 8, 8],
                                            "stages": [1, 1, 1, 1], "block": "basic"},
        "dataset": {"name": "webdataset", "image_size": 32, "loader_workers": 0,
                    "shards": {**_spec(root), "val": urls["val"], "val_size": 12}},
        "space": {"shortcut": ["A"]}, "seeds": 1, "max_attempts": 3,
        "train": {"preset": "imagenet", "epochs": 1, "batch_size": 8},
        "resources": {"cpus": 1, "workers": 1},
    }
    _, trials = run_spec_alone(tmp_path, raw)
    assert len(trials) == 1, "a deterministic failure is not tried again"
    assert trials[0].user_attrs["failure_kind"] == FailureKind.DATA_UNAVAILABLE
    assert trials[0].user_attrs["failure"].startswith(
        "SizeMisstated: shards.val_size: 12 stated, but a pass over the val shards read 18 images: give their "
        "count")
