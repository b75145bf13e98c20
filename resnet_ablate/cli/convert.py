"""`resnet-ablate convert-imagenet`: ILSVRC's layout as class folders or tar shards."""

from __future__ import annotations

import argparse
import sys
import time

from .registry import command


@command("convert-imagenet")
def _convert_imagenet(args: argparse.Namespace) -> int:
    from ..data.imagenet_layout import SHARD_SIZE, UNDECODABLE, convert_imagenet

    if args.shard_size is not None and args.to != "shards":
        print("resnet-ablate: error: --shard-size applies to --to shards (folders hold a file "
              "an image)", file=sys.stderr)
        return 2
    try:
        done = convert_imagenet(args.root, args.out, val_labels=args.val_labels, to=args.to,
                                shard_size=SHARD_SIZE if args.shard_size is None
                                else args.shard_size, check=not args.keep_undecodable,
                                progress=_progress_lines())
    except (OSError, ValueError) as error:
        print(f"resnet-ablate: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {done.train_images} training and {done.val_images} validation images of "
          f"{done.classes} classes as {done.to} under {done.out}; a spec reads them with:")
    if done.undecodable:
        print(f"left out {done.undecodable} image(s) that do not decode, named in "
              f"{done.out / UNDECODABLE}", file=sys.stderr)
    print("\n".join(done.spec_lines()))
    return 0


def _progress_lines(every_seconds: float = 10.0):
    """`convert_imagenet`'s progress as a line on stderr every `every_seconds` and at each
    split's end: writing ImageNet as shards takes hours."""
    last = [time.monotonic()]

    def progress(split: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] >= every_seconds:
            print(f"convert-imagenet: {split} {done}/{total} images", file=sys.stderr,
                  flush=True)
            last[0] = now

    return progress


def add_convert_command(sub) -> None:
    convert = sub.add_parser("convert-imagenet", help="ILSVRC's layout (train/<wnid>/, a flat "
                             "val/ and its label file) as class folders or tar shards")
    convert.add_argument("root", help="the folder holding train/<wnid>/ and val/")
    convert.add_argument("out", help="a new (or empty) folder to write into")
    convert.add_argument("--val-labels", help="val/'s label file, relative to ROOT unless "
                         "absolute: 'filename label' lines, or the devkit's "
                         "ILSVRC2012_validation_ground_truth.txt (with meta.mat beside it)")
    convert.add_argument("--to", choices=("folders", "shards"), default="folders",
                         help="class folders of hard links (default), or webdataset tar shards")
    convert.add_argument("--shard-size", type=int,
                         help="images a shard, with --to shards (default 1000)")
    convert.add_argument("--keep-undecodable", action="store_true",
                         help="write every image without decoding it first (by default one "
                         "that does not decode is left out and named in OUT/undecodable.txt)")
