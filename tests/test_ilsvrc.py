"""ILSVRC's own layout on a generated tree: a flat val/ folder labelled by the devkit's ground
truth (with meta.mat) or by 'filename label' lines, a study trained on it end to end, and
`resnet-ablate convert-imagenet` to class folders and to shards."""

import io
import shutil

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from helpers import run_spec_alone
from resnet_ablate.cli import main
from resnet_ablate.data.folders import scan_image_folder
from resnet_ablate.data.shards import load_shards

WNIDS = ("n01440764", "n01443537", "n01484850")
# The devkit numbers its synsets in its own order, not the wnids' sorted order.
ILSVRC_IDS = {1: "n01484850", 2: "n01440764", 3: "n01443537"}


def _jpeg(path, label: int, rng, size=(40, 34)) -> None:
    colour = np.array([80 * label + 20, 220 - 70 * label, (110 * label) % 256], np.float64)
    pixels = np.clip(colour + rng.normal(0, 10, (size[1], size[0], 3)), 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(path, format="JPEG")


@pytest.fixture(scope="module")
def ilsvrc(tmp_path_factory):
    """train/<wnid>/<wnid>_<i>.JPEG (6 a class), a flat val/ of 9 images in a shuffled class order,
    the devkit's ground truth and meta.mat under devkit/, and a 'filename wnid' file."""
    root = tmp_path_factory.mktemp("ilsvrc")
    rng = np.random.default_rng(0)
    for label, wnid in enumerate(WNIDS):
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(6):
            _jpeg(root / "train" / wnid / f"{wnid}_{i}.JPEG", label, rng, (40 + 4 * i, 34))
    (root / "val").mkdir()
    truth = [WNIDS[i % 3] for i in rng.permutation(9)]
    for k, wnid in enumerate(truth, start=1):
        _jpeg(root / "val" / f"ILSVRC2012_val_{k:08d}.JPEG", WNIDS.index(wnid), rng)
    devkit = root / "devkit"
    devkit.mkdir()
    by_wnid = {wnid: number for number, wnid in ILSVRC_IDS.items()}
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{by_wnid[wnid]}\n" for wnid in truth))
    synsets = np.array([(number, wnid, 0) for number, wnid in ILSVRC_IDS.items()],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    scipy.io.savemat(devkit / "meta.mat", {"synsets": synsets})
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{k:08d},{wnid} 1 2 30 40\n" for k, wnid in enumerate(truth, start=1)))
    return root, [WNIDS.index(wnid) for wnid in truth]


def test_a_flat_val_folder_is_labelled_by_the_devkits_ground_truth_or_by_filename_lines(ilsvrc):
    root, truth = ilsvrc
    with pytest.raises(ValueError, match="holds no class folders .a flat folder of images: give "
                                         r"its label file as val_labels \(--val-labels\)"):
        scan_image_folder(root)
    devkit = scan_image_folder(root, val_labels="devkit/ILSVRC2012_validation_ground_truth.txt")
    kaggle = scan_image_folder(root, val_labels=root / "LOC_val_solution.csv")
    assert devkit.classes == WNIDS and len(devkit.train) == 18
    assert [label for _, label in devkit.test] == truth == [label for _, label in kaggle.test]
    assert [p.rsplit("/", 1)[1] for p, _ in devkit.test] == [
        f"ILSVRC2012_val_{k:08d}.JPEG" for k in range(1, 10)]
    # A class subset (ImageNet-100) with the full file: lines of images not in val/ go unread,
    # whatever class they name.
    full = root.parent / f"{root.name}-full-solution.csv"
    full.write_text((root / "LOC_val_solution.csv").read_text()
                    + "ILSVRC2012_val_00000099,n09999999 1 2 30 40\n")
    assert [label for _, label in scan_image_folder(root, val_labels=full).test] == truth


def test_a_label_file_that_does_not_fit_is_one_error_naming_the_line(ilsvrc, tmp_path):
    root, truth = ilsvrc
    ids = tmp_path / "ground_truth.txt"  # the devkit's numbers, no meta.mat beside them
    ids.write_text("1\n" * 9)
    with pytest.raises(ValueError, match="its labels are ILSVRC2012_IDs, which the devkit's "
                                         "meta.mat maps"):
        scan_image_folder(root, val_labels=ids)
    # A meta.mat beside them that is not the devkit's: damaged, or another .mat.
    for content, reason in ((b"garbage", "MatReadError"), (None, "it holds no 'synsets'")):
        if content is None:
            scipy.io.savemat(tmp_path / "meta.mat", {"classes": np.arange(3)})
        else:
            (tmp_path / "meta.mat").write_bytes(content)
        with pytest.raises(ValueError, match=rf"meta.mat: not the devkit's meta.mat, whose "
                                             rf"'synsets' map the ILSVRC2012_IDs of "
                                             rf"ground_truth.txt to wnids \({reason}"):
            scan_image_folder(root, val_labels=ids)
    with pytest.raises(ValueError, match=r"val_labels: .*val is a folder, not a label file"):
        scan_image_folder(root, val_labels="val")
    short = tmp_path / "short.txt"
    short.write_text("ILSVRC2012_val_00000001 n01440764\nILSVRC2012_val_00000002 2\n")
    with pytest.raises(ValueError, match="no label for 7 of the 9 images in val/, first "
                                         "ILSVRC2012_val_00000003.JPEG"):
        scan_image_folder(root, val_labels=short)
    # A first line that names an image of val/ is not a header: its bad label is named too.
    first = tmp_path / "first.txt"
    first.write_text("ILSVRC2012_val_00000001 7\nILSVRC2012_val_00000002 n01440764\n")
    with pytest.raises(ValueError, match=r"first.txt:1: label '7' is none of train/'s 3 class "
                                         r"folders .* and no index in 0..2"):
        scan_image_folder(root, val_labels=first)
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("ILSVRC2012_val_00000001 n01440764\nILSVRC2012_val_00000002 n99999999\n")
    with pytest.raises(ValueError, match=r"wrong.txt:2: label 'n99999999' is none of train/'s 3 "
                                         r"class folders .*: is its class folder missing from "
                                         r"train/ \(still a .tar, say\)\?"):
        scan_image_folder(root, val_labels=wrong)
    # An image labelled twice, differently: the later line won, and the image was scored
    # against whichever class it named. A repeated line is only a repeat.
    lines = [f"ILSVRC2012_val_{k:08d} {WNIDS[y]}\n" for k, y in enumerate(truth, start=1)]
    other = WNIDS[(truth[0] + 1) % 3]
    conflicting = tmp_path / "conflicting.txt"
    conflicting.write_text("".join([*lines, f"ILSVRC2012_val_00000001 {other}\n"]))
    with pytest.raises(ValueError, match=rf"conflicting.txt:10: 'ILSVRC2012_val_00000001' is "
                                         rf"labelled '{other}' here and '{WNIDS[truth[0]]}' on "
                                         r"line 1: one label an image"):
        scan_image_folder(root, val_labels=conflicting)
    repeated = tmp_path / "repeated.txt"
    repeated.write_text("".join([*lines, lines[0]]))
    assert [label for _, label in scan_image_folder(root, val_labels=repeated).test] == truth
    # A spreadsheet's byte-order mark before the first line is no part of its label.
    marked = tmp_path / "marked.csv"
    marked.write_bytes((root / "LOC_val_solution.csv").read_text().encode("utf-8-sig"))
    assert [label for _, label in scan_image_folder(root, val_labels=marked).test] == truth
    wnids = tmp_path / "wnids.txt"
    wnids.write_bytes("".join(f"{WNIDS[y]}\n" for y in truth).encode("utf-8-sig"))
    assert [label for _, label in scan_image_folder(root, val_labels=wnids).test] == truth
    with pytest.raises(FileNotFoundError, match="val_labels: .*nowhere.txt does not exist"):
        scan_image_folder(root, val_labels="nowhere.txt")
    binary = tmp_path / "labels.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ValueError, match=r"val_labels: .*labels.bin is not a text file"):
        scan_image_folder(root, val_labels=binary)


def test_a_half_sorted_val_folder_is_refused_rather_than_scored_on_its_flat_half(ilsvrc,
                                                                                 tmp_path):
    """An interrupted valprep.sh leaves val/ with some images in class folders and the rest flat:
    a label file would label the flat ones and leave the others out without a word (a study
    scored on part of its test set). Class folders alone with a label file: leave it out."""
    root, truth = ilsvrc
    half = tmp_path / "half"
    shutil.copytree(root, half)
    labels = half / "LOC_val_solution.csv"

    def sort_into_class_folders(numbers):
        for k in numbers:
            image = half / "val" / f"ILSVRC2012_val_{k:08d}.JPEG"
            (half / "val" / WNIDS[truth[k - 1]]).mkdir(exist_ok=True)
            image.rename(half / "val" / WNIDS[truth[k - 1]] / image.name)

    sort_into_class_folders((1, 2))
    with pytest.raises(ValueError, match=r"val holds 7 image\(s\) directly and 2 in sub-folders "
                                         r"\(.*\), which a label file of a flat val/ leaves out"):
        scan_image_folder(half, val_labels=labels)
    sort_into_class_folders(range(3, 10))
    with pytest.raises(ValueError, match=r"val holds class folders \(n0.*\), not a flat folder of "
                                         r"images: leave out val_labels"):
        scan_image_folder(half, val_labels=labels)
    assert sorted(label for _, label in scan_image_folder(half).test) == sorted(truth)


def test_the_devkits_ground_truth_refuses_a_val_folder_missing_an_image_or_holding_a_stray(
        ilsvrc, tmp_path):
    # Its lines label images by number: one image fewer or more would shift every later label.
    root, _ = ilsvrc
    labels = root / "devkit" / "ILSVRC2012_validation_ground_truth.txt"
    missing = tmp_path / "missing"
    shutil.copytree(root, missing)
    (missing / "val" / "ILSVRC2012_val_00000005.JPEG").unlink()
    shutil.copy(missing / "val" / "ILSVRC2012_val_00000009.JPEG",
                missing / "val" / "ILSVRC2012_val_00000041.JPEG")  # as many images as lines
    with pytest.raises(ValueError, match="line 5 labels image number 5, but the image at that "
                                         "place in val/ .sorted by name. is "
                                         "ILSVRC2012_val_00000006.JPEG"):
        scan_image_folder(missing, val_labels=labels)
    (missing / "val" / "ILSVRC2012_val_00000041.JPEG").unlink()
    # A class subset (or an extraction that lost images): val/ holds some of the numbers.
    subset = tmp_path / "subset"
    shutil.copytree(missing, subset)
    (subset / "val" / "ILSVRC2012_val_00000001.JPEG").unlink()
    with pytest.raises(ValueError, match="its 9 lines label images 1 to 9 in order, but val/ "
                                         "holds 7 of them, numbered 2 to 9 with gaps: an "
                                         "incomplete extraction, or a class subset"):
        scan_image_folder(subset, val_labels=labels)
    for k in range(5, 9):  # 1..8 of the 9 that the file labels: the last one is missing
        (missing / "val" / f"ILSVRC2012_val_{k + 1:08d}.JPEG").rename(
            missing / "val" / f"ILSVRC2012_val_{k:08d}.JPEG")
    with pytest.raises(ValueError, match="its 9 lines label images 1 to 9, but val/ holds only "
                                         "1 to 8"):
        scan_image_folder(missing, val_labels=labels)
    # A stray copy without a number, with one image missing (as many images as lines): the
    # check must not stop at the name it cannot read.
    stray = tmp_path / "stray"
    shutil.copytree(root, stray)
    shutil.copy(stray / "val" / "ILSVRC2012_val_00000003.JPEG",
                stray / "val" / "ILSVRC2012_val_00000003 - Copy.JPEG")
    (stray / "val" / "ILSVRC2012_val_00000009.JPEG").unlink()
    # Names of the user's own, one of them ending in a number: labelled by their place, as
    # before (only a numbered set with strays among it is refused).
    own = tmp_path / "own"
    shutil.copytree(root, own, ignore=shutil.ignore_patterns("ILSVRC2012_val_*"))
    rng = np.random.default_rng(3)
    for name in ("beach.JPEG", "holiday_2019.JPEG", "kitchen.JPEG"):
        _jpeg(own / "val" / name, 0, rng)
    one_a_line = tmp_path / "own-labels.txt"
    one_a_line.write_text("n01440764\nn01443537\nn01484850\n")
    labelled = scan_image_folder(own, val_labels=one_a_line)
    assert [(p.rsplit("/", 1)[1], WNIDS[y]) for p, y in labelled.test] == [
        ("beach.JPEG", "n01440764"), ("holiday_2019.JPEG", "n01443537"),
        ("kitchen.JPEG", "n01484850")]
    with pytest.raises(ValueError, match=r"val/ holds numbered images .* beside 1 without a number "
                                         r"\(ILSVRC2012_val_00000003 - Copy.JPEG\), which would "
                                         r"shift every later label"):
        scan_image_folder(stray, val_labels=labels)


def test_a_study_trains_on_the_ilsvrc_layout_and_it_converts_to_folders_and_shards(
        ilsvrc, tmp_path, capsys):

    root, truth = ilsvrc
    raw = {
        "study": "ilsvrc", "model": {"family": "imagenet", "widths": [4, 8, 8, 8],
                                     "stages": [1, 1, 1, 1], "block": "basic"},
        "dataset": {"name": "imagefolder", "root": str(root), "image_size": 32,
                    "loader_workers": 0,
                    "val_labels": "devkit/ILSVRC2012_validation_ground_truth.txt"},
        "space": {"shortcut": ["A"]}, "seeds": 1,
        "train": {"preset": "imagenet", "epochs": 1, "batch_size": 6, "eval_batch_size": 4},
        "resources": {"cpus": 1, "workers": 1},
    }
    summary, (trial,) = run_spec_alone(tmp_path, raw)
    assert summary.completed == 1, summary
    assert trial.user_attrs["test_images"] == 9
    # Three classes: every label is among the top five, so no top-5 error is recorded (not 0%).
    assert [c["test_top5_error"] for c in trial.user_attrs["curves"]] == [None]

    folders, shards = tmp_path / "folders", tmp_path / "shards"
    labels = "devkit/ILSVRC2012_validation_ground_truth.txt"
    assert main(["convert-imagenet", str(root), str(folders), "--val-labels", labels]) == 0
    converted = scan_image_folder(folders)
    assert converted.classes == WNIDS and len(converted.train) == 18
    by_name = {p.rsplit("/", 1)[1]: label for p, label in converted.test}
    assert [by_name[f"ILSVRC2012_val_{k:08d}.JPEG"] for k in range(1, 10)] == truth
    assert main(["convert-imagenet", str(root), str(shards), "--val-labels", labels, "--to",
                 "shards", "--shard-size", "4"]) == 0
    printed, errors = capsys.readouterr()
    assert f'train: "{shards}/train-{{000000..000004}}.tar"' in printed
    # Each split's end on stderr at least (every ten seconds besides).
    assert "convert-imagenet: train 18/18 images" in errors
    assert "convert-imagenet: val 9/9 images" in errors
    data = load_shards({"train": f"{shards}/train-{{000000..000004}}.tar",
                        "val": f"{shards}/val-{{000000..000002}}.tar", "num_classes": 3},
                       image_size=32, loader_workers=0)
    assert (data.train_size, data.test_size) == (18, 9)
    read = torch.cat([y for _, y, _ in data.test_loader(9)])
    assert read.tolist() == truth, "val shards keep the images' order and labels"
    assert main(["convert-imagenet", str(root), str(shards)]) == 2, "not into a non-empty folder"
    (tmp_path / "a-file").write_text("")
    assert main(["convert-imagenet", str(root), str(tmp_path / "a-file")]) == 2
    assert "a-file is a file: convert into a new folder" in capsys.readouterr().err


def test_shards_of_folders_whose_file_names_repeat_across_classes_keep_every_sample(tmp_path):
    """cat/0.jpg and dog/0.jpg: each sample keeps a key of its own in the shards (a reader groups
    members by key), where both were written as 0.jpg and one of them was lost; and a folder
    that shards cannot hold is refused before anything is written."""
    from resnet_ablate.data.imagenet_layout import convert_imagenet

    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for label, name in enumerate(("cat", "dog", "eel")):
            (tmp_path / "tree" / split / name).mkdir(parents=True)
            for i in range(count):
                _jpeg(tmp_path / "tree" / split / name / f"{i}.jpg", label, rng)
    told = []  # progress: every image, split by split (ImageNet's take hours to write)
    convert_imagenet(tmp_path / "tree", tmp_path / "shards", to="shards", shard_size=5,
                     progress=lambda *args: told.append(args))
    assert told == [("train", k, 12) for k in range(1, 13)] + [("val", k, 6) for k in range(1, 7)]
    data = load_shards({"train": str(tmp_path / "shards" / "train-{000000..000002}.tar"),
                        "val": str(tmp_path / "shards" / "val-{000000..000001}.tar"),
                        "num_classes": 3}, image_size=24, loader_workers=0)
    assert (data.train_size, data.test_size) == (12, 6)
    labels = sorted(torch.cat([y for _, y, _ in data.test_loader(6)]).tolist())
    assert labels == [0, 0, 1, 1, 2, 2]
    seen = torch.cat([y for _, y, _ in data.train_loader(3, 1, torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == [0] * 4 + [1] * 4 + [2] * 4

    (tmp_path / "tree" / "val" / "eel" / "odd.bmp").write_bytes(b"BM")
    with pytest.raises(ValueError, match=r"odd.bmp: a shard holds .* images, not .bmp"):
        convert_imagenet(tmp_path / "tree", tmp_path / "refused", to="shards")
    assert not (tmp_path / "refused").exists()


def test_images_in_sub_folders_convert_to_folders_keeping_their_paths(tmp_path):
    """bee/a/0.jpg and bee/b/0.jpg: converted to class folders, each keeps its sub-folder (by name
    alone the second link failed and its copy replaced the first image)."""
    from resnet_ablate.data.imagenet_layout import convert_imagenet

    rng = np.random.default_rng(3)
    files = {"ant": ["0.jpg"], "bee": ["a/0.jpg", "b/0.jpg"]}
    for split in ("train", "val"):
        for label, (name, found) in enumerate(files.items()):
            for file in found:
                (tmp_path / "tree" / split / name / file).parent.mkdir(parents=True,
                                                                        exist_ok=True)
                _jpeg(tmp_path / "tree" / split / name / file, label, rng)
    convert_imagenet(tmp_path / "tree", tmp_path / "out")
    for split in ("train", "val"):
        for name, found in files.items():
            for file in found:
                assert (tmp_path / "out" / split / name / file).read_bytes() \
                    == (tmp_path / "tree" / split / name / file).read_bytes()
    assert len(scan_image_folder(tmp_path / "out").train) == 3


def test_names_that_differ_in_an_image_extension_before_the_last_keep_samples_of_their_own(
        tmp_path):
    """photo.jpg and photo.png.jpg: the reader takes both as sample `photo` (an image extension
    before the last is no part of a key), so the converter gives them keys that stay apart; and
    a shard made elsewhere with two such members is refused by the check a trial starts with,
    naming both, where webdataset failed every epoch on a duplicate."""
    import tarfile

    from resnet_ablate.data import CorruptShard
    from resnet_ablate.data.imagenet_layout import convert_imagenet
    from resnet_ablate.data.shard_format import count_samples

    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for label, name in enumerate(("cat", "dog")):
            folder = tmp_path / "tree" / split / name
            folder.mkdir(parents=True)
            for file in ("photo.jpg", "photo.png.jpg", "photo.JPEG.jpg"):
                _jpeg(folder / file, label, rng)
    convert_imagenet(tmp_path / "tree", tmp_path / "shards", to="shards", shard_size=4)
    data = load_shards({"train": str(tmp_path / "shards" / "train-{000000..000001}.tar"),
                        "val": str(tmp_path / "shards" / "val-{000000..000001}.tar"),
                        "num_classes": 2}, image_size=24, loader_workers=0)
    assert (data.train_size, data.test_size) == (6, 6)
    assert sorted(torch.cat([y for _, y, _ in data.test_loader(6)]).tolist()) == [0] * 3 + [1] * 3

    made_elsewhere = tmp_path / "elsewhere.tar"
    with tarfile.open(made_elsewhere, "w") as archive:
        for member in ("photo.jpg", "photo.png.jpg"):
            archive.add(tmp_path / "tree" / "val" / "cat" / member, arcname=member)
    with pytest.raises(CorruptShard, match=r"elsewhere.tar: members photo.jpg and photo.png.jpg "
                                           r"are both sample photo's jpg"):
        count_samples([str(made_elsewhere)])
    # Its images first, then its labels (`tar cf x.tar *.jpg *.cls`): the reader made each
    # member a sample of its own, an image without a label, and the trial trained an epoch
    # before failing on "12 images skipped" of 6.
    apart = tmp_path / "apart.tar"
    with tarfile.open(apart, "w") as archive:
        for member in ("a.jpg", "b.jpg"):
            archive.add(tmp_path / "tree" / "val" / "cat" / "photo.jpg", arcname=member)
        for member in ("a.cls", "b.cls"):
            info = tarfile.TarInfo(member)
            info.size = 1
            archive.addfile(info, io.BytesIO(b"0"))
    with pytest.raises(CorruptShard, match=r"apart.tar: members a.jpg and a.cls of sample a are "
                                           r"not next to each other"):
        load_shards({"train": str(apart), "val": str(apart), "num_classes": 2}, image_size=24,
                    loader_workers=0)
    # A member without a key (a folder's entry) between a sample's members parts nothing.
    together = tmp_path / "together.tar"
    with tarfile.open(together, "w") as archive:
        archive.add(tmp_path / "tree" / "val" / "cat" / "photo.jpg", arcname="a.jpg")
        archive.addfile(tarfile.TarInfo("notes"), io.BytesIO(b""))
        info = tarfile.TarInfo("a.cls")
        info.size = 1
        archive.addfile(info, io.BytesIO(b"0"))
    assert count_samples([str(together)], num_classes=2) == 1


def test_a_tree_of_links_converts_to_files_and_a_dangling_link_is_refused(ilsvrc, tmp_path):
    """A class subset made of links (absolute and relative): the shards hold the images and the
    folders hard links to the files, so both read back whole (the shards held the links, which
    decoded as nothing, and relative links dangled one folder deeper); a link to nothing is
    refused before anything is written."""
    import os

    from resnet_ablate.data.imagenet_layout import convert_imagenet

    root, _ = ilsvrc
    subset = tmp_path / "subset"
    for split in ("train", "val"):
        for wnid in WNIDS[:2]:
            (subset / split / wnid).mkdir(parents=True)
            for i, image in enumerate(sorted((root / "train" / wnid).iterdir())[:3]):
                link = subset / split / wnid / image.name
                # Absolute links in train, relative ones in val.
                link.symlink_to(image if split == "train" else os.path.relpath(image, link.parent))
    convert_imagenet(subset, tmp_path / "shards", to="shards", shard_size=4)
    convert_imagenet(subset, tmp_path / "folders")
    shards = load_shards({"train": str(tmp_path / "shards" / "train-{000000..000001}.tar"),
                          "val": str(tmp_path / "shards" / "val-{000000..000001}.tar"),
                          "num_classes": 2}, image_size=24, loader_workers=0)
    images, labels, skipped = next(iter(shards.test_loader(6)))
    assert (len(labels), skipped) == (6, 0), "every image decodes from the shards"
    folders = scan_image_folder(tmp_path / "folders")
    assert len(folders.train) == len(folders.test) == 6
    assert all(not os.path.islink(path) and os.path.isfile(path) for path, _ in folders.test)
    (subset / "train" / WNIDS[0] / "gone.JPEG").symlink_to(tmp_path / "nowhere.JPEG")
    # Indexed, so that training counts it as an undecodable image rather than drops it unsaid.
    assert any(path.endswith("gone.JPEG") for path, _ in scan_image_folder(subset).train)
    for to in ("shards", "folders"):
        with pytest.raises(ValueError, match="gone.JPEG: a link to nothing"):
            convert_imagenet(subset, tmp_path / f"again-{to}", to=to)
        assert not (tmp_path / f"again-{to}").exists()


@pytest.mark.parametrize("to", ["folders", "shards"])
def test_an_image_that_does_not_decode_is_left_out_of_the_conversion_and_named(tmp_path, capsys,
                                                                             to):
    """A truncated JPEG and a text file named .jpg were copied into the converted data set,
    where every trial skipped them again in every epoch: they are left out and named, unless
    --keep-undecodable."""
    rng = np.random.default_rng(1)
    for split, count in (("train", 3), ("val", 2)):
        for label, name in enumerate(("cat", "dog")):
            (tmp_path / "tree" / split / name).mkdir(parents=True)
            for i in range(count):
                _jpeg(tmp_path / "tree" / split / name / f"{i}.jpg", label, rng)
    whole = (tmp_path / "tree" / "train" / "cat" / "0.jpg").read_bytes()
    truncated = tmp_path / "tree" / "train" / "dog" / "cut.jpg"
    truncated.write_bytes(whole[:len(whole) // 2])
    text = tmp_path / "tree" / "val" / "cat" / "notes.jpg"
    text.write_text("not an image")
    out = tmp_path / "out"
    assert main(["convert-imagenet", str(tmp_path / "tree"), str(out), "--to", to]) == 0
    assert "wrote 6 training and 4 validation images of 2 classes" in capsys.readouterr().out
    assert sorted((out / "undecodable.txt").read_text().splitlines()) == [
        f"train\t{truncated}", f"val\t{text}"]
    if to == "folders":
        index = scan_image_folder(out)
        assert (len(index.train), len(index.test)) == (6, 4)
    else:
        data = load_shards({"train": str(out / "train-000000.tar"),
                            "val": str(out / "val-000000.tar"), "num_classes": 2},
                           image_size=24, loader_workers=0)
        assert (data.train_size, data.test_size) == (6, 4)
    kept = tmp_path / "kept"
    assert main(["convert-imagenet", str(tmp_path / "tree"), str(kept), "--to", to,
                 "--keep-undecodable"]) == 0
    assert "wrote 7 training and 5 validation images" in capsys.readouterr().out
    assert not (kept / "undecodable.txt").exists()
    # A class none of whose training images decodes: the conversion wrote a data set that
    # trained on one class fewer (shards) or did not read (folders), and said it had written it.
    for path in (tmp_path / "tree" / "train" / "dog").iterdir():
        path.write_text("not an image")
    lost = tmp_path / "lost"
    assert main(["convert-imagenet", str(tmp_path / "tree"), str(lost), "--to", to]) == 2
    assert ("train/dog: none of its images decodes (e.g. " in capsys.readouterr().err
            and not lost.exists())
    # A validation split none of whose images decodes: it said it had written the data set (0
    # validation images), whose spec was then refused (no val/ folder; an empty shard).
    for label, name in enumerate(("cat", "dog")):
        _jpeg(tmp_path / "tree" / "train" / name / "whole.jpg", label, rng)
        for path in (tmp_path / "tree" / "val" / name).iterdir():
            path.write_text("not an image")
    assert main(["convert-imagenet", str(tmp_path / "tree"), str(lost), "--to", to]) == 2
    assert ("val: none of its 5 images decodes (e.g. " in capsys.readouterr().err
            and not lost.exists())


def test_a_conversion_cut_short_removes_what_it_wrote_and_shard_size_needs_shards(tmp_path,
                                                                                capsys):
    """Ctrl-C during a conversion left half a shard, and the rerun refused the folder as not
    empty; --shard-size was ignored without --to shards."""
    from resnet_ablate.data import imagenet_layout

    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for label, name in enumerate(("cat", "dog")):
            (tmp_path / "tree" / split / name).mkdir(parents=True)
            for i in range(3):
                _jpeg(tmp_path / "tree" / split / name / f"{i}.jpg", label, rng)
    out = tmp_path / "out"
    out.mkdir()  # an empty folder of the user's: kept, emptied again

    def interrupted(split: str, done: int, total: int) -> None:
        if split == "val":  # the training shards written, the validation ones begun
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        imagenet_layout.convert_imagenet(tmp_path / "tree", out, to="shards", shard_size=2,
                                         progress=interrupted)
    assert out.is_dir() and not any(out.iterdir())
    assert main(["convert-imagenet", str(tmp_path / "tree"), str(out), "--to", "shards",
                 "--shard-size", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        *(f"train-00000{k}.tar" for k in range(3)), *(f"val-00000{k}.tar" for k in range(3))]
    assert main(["convert-imagenet", str(tmp_path / "tree"), str(tmp_path / "folders"),
                 "--shard-size", "2"]) == 2
    assert "--shard-size applies to --to shards" in capsys.readouterr().err
    assert not (tmp_path / "folders").exists()
