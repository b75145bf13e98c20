"""Training crops decoded on the device (resnet_ablate/data/device_decode.py), checked on a CPU:
the GPU's batch decoder is stood in for by Pillow, so that everything around it (the crops'
boxes and flips, the fallbacks, the feed) runs as it does on a GPU. The nvJPEG call itself runs
only in the GPU check."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from resnet_ablate.data import device_decode
from resnet_ablate.data.decode import PixelStatistics, Preprocess, decode, normalise, train_crop
from resnet_ablate.data.device_decode import (DeviceCrops, EncodedCrop, encoded_crop, pillow_decode,
                                              resample)
from resnet_ablate.data.feed import Placement, StreamFeed
from resnet_ablate.data.folders import load_image_folder
from resnet_ablate.execution import resolve_execution
from resnet_ablate.recipe import TrainRecipe


def jpeg_only_decoder(datas: list[torch.Tensor]) -> list[torch.Tensor]:
    """nvJPEG's contract: every image of the batch a JPEG it decodes, else the batch raises."""
    images = []
    for data in datas:
        if bytes(data[:3].tolist()) != b"\xff\xd8\xff":
            raise RuntimeError("not a JPEG")
        image = pillow_decode(data)
        if image is None:
            raise RuntimeError("corrupt JPEG")
        images.append(image)
    return images


def _smooth_image(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour gradients with a few bumps: resampling filters that differ in detail give
    nearly the same pixels on it, and a flip changes them a lot."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [128 + 100 * np.sin(rng.uniform(2, 6) * x + rng.uniform(1, 4) * y + phase)
                for phase in rng.uniform(0, 6, size=3)]
    return Image.fromarray(np.stack(channels, axis=-1).clip(0, 255).astype(np.uint8))


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _textured_image(width: int, height: int, seed: int) -> Image.Image:
    """Random colours every 4 pixels, smoothly interpolated: detail at every scale a crop
    samples, so any difference in where or how it is resampled shows."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, size=(height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize((width, height), Image.BILINEAR)


@pytest.mark.parametrize("augmentation", ["scale", "random_resized_crop"])
@pytest.mark.parametrize("width, height, size", [(500, 375, 224), (120, 90, 96), (64, 64, 56)],
                         ids=["imagenet-like", "enlarged", "tiny"])
def test_the_device_crop_is_the_cpu_crop_same_box_same_flip(augmentation, width, height, size):
    """Each image's crop comes from the same draws as the CPU path's (the generator is left in
    the same state) and is resampled as Pillow resamples it: within rounding of the CPU crop
    (under a third of a level of 255 on average), where the crop flipped the other way differs
    by tens of levels."""
    crops = DeviceCrops(torch.device("cpu"), size, decoder=jpeg_only_decoder)
    flips = set()
    for seed in range(10):
        data = _jpeg(_textured_image(width, height, seed))
        cpu_rng, device_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        cpu = np.asarray(train_crop(io.BytesIO(data), image_size=size, augmentation=augmentation,
                                    rng=cpu_rng), dtype=np.float32)
        encoded = encoded_crop(io.BytesIO(data), image_size=size, augmentation=augmentation,
                               rng=device_rng)
        assert cpu_rng.bit_generator.state == device_rng.bit_generator.state
        out, kept, skipped = crops([encoded])
        assert out.shape == (1, 3, size, size) and out.dtype == torch.uint8
        assert kept.tolist() == [0] and skipped == 0
        device = out[0].permute(1, 2, 0).numpy().astype(np.float32)
        difference = np.abs(device - cpu).mean()
        flipped_difference = np.abs(device[:, ::-1] - cpu).mean()
        assert difference < 0.35 and flipped_difference > 10, (seed, difference,
                                                                flipped_difference)
        flips.add(encoded.flip)
    assert flips == {True, False}


def test_resample_is_pillows_box_resize():
    """A fractional box, shrunk and enlarged: Pillow's own resize of that box, within one level
    (its fixed-point weights against these float ones)."""
    image = _textured_image(90, 70, 1)
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    for box, size in (((3.3, 5.7, 80.2, 61.9), 32), ((10.5, 2.25, 30.75, 22.5), 48)):
        expected = np.asarray(image.resize((size, size), Image.BILINEAR, box=box), np.int16)
        got = resample(pixels, box, size, flip=False).permute(1, 2, 0).numpy().astype(np.int16)
        assert np.abs(got - expected).max() <= 1


def test_a_batch_of_images_of_many_sizes_resamples_as_each_alone_as_pillow_does(monkeypatch):
    """The batch is resampled at once, zero-padded to its largest image (in groups where that
    would be large): each crop is still Pillow's resize of its own box, within one level, and
    flipped where asked, however the batch is grouped."""
    from resnet_ablate.data import device_decode

    sizes = [(90, 70), (40, 120), (64, 64), (150, 33)]
    images = [_textured_image(w, h, seed) for seed, (w, h) in enumerate(sizes)]
    boxes = [(3.3, 5.7, 80.2, 61.9), (1.0, 10.25, 39.0, 100.5), (0.0, 0.0, 64.0, 64.0),
             (20.5, 2.0, 140.0, 31.5)]
    flips = [False, True, False, True]
    pixels = [torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in images]
    expected = [np.asarray(im.resize((24, 24), Image.BILINEAR, box=box), np.int16)
                for im, box in zip(images, boxes)]
    expected = [e[:, ::-1] if flip else e for e, flip in zip(expected, flips)]
    batched = device_decode.resample_batch(pixels, boxes, 24, flips)
    monkeypatch.setattr(device_decode, "RESAMPLE_BYTES", 3 * 90 * 120 * 4)  # groups of 1 or 2
    grouped = device_decode.resample_batch(pixels, boxes, 24, flips)
    for got in (batched, grouped):
        assert got.shape == (4, 3, 24, 24) and got.dtype == torch.uint8
        for crop, want in zip(got, expected):
            difference = crop.permute(1, 2, 0).numpy().astype(np.int16) - want
            assert np.abs(difference).max() <= 1


def test_without_augmentation_the_crop_is_the_evaluations_centre_crop():
    data = _jpeg(_smooth_image(300, 200, 3))
    encoded = encoded_crop(io.BytesIO(data), image_size=48, augmentation="scale", rng=None)
    assert not encoded.flip
    out, _, _ = DeviceCrops(torch.device("cpu"), 48, decoder=jpeg_only_decoder)([encoded])
    # The evaluation's recipe: the shorter side to 48 * 256 / 224 = 55, the centre 48 crop.
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image = image.resize((round(300 * 55 / 200), 55), Image.BILINEAR)
    left, top = (image.size[0] - 48) // 2, (55 - 48) // 2
    expected = np.asarray(image.crop((left, top, left + 48, top + 48)), dtype=np.float32)
    assert np.abs(out[0].permute(1, 2, 0).numpy() - expected).mean() < 3.0


def test_what_the_gpu_decoder_refuses_pillow_decodes_and_the_undecodable_are_skipped():
    """A PNG among the JPEGs (ImageNet's training set has one) and a CMYK JPEG go to Pillow; a
    truncated JPEG whose header reads but whose pixels do not is left out and counted."""
    image = _smooth_image(120, 90, 0)
    png = io.BytesIO()
    image.save(png, format="PNG")
    truncated = _jpeg(image)[: len(_jpeg(image)) // 2]
    batch = [EncodedCrop(_jpeg(image), (0.0, 0.0, 120.0, 90.0), False),
             EncodedCrop(png.getvalue(), (10.0, 5.0, 100.0, 85.0), True),
             EncodedCrop(truncated, (0.0, 0.0, 90.0, 90.0), False),
             EncodedCrop(_jpeg(image.convert("CMYK")), (0.0, 0.0, 120.0, 90.0), False)]
    assert encoded_crop(io.BytesIO(truncated), image_size=32, augmentation="scale",
                        rng=None) is not None  # its header reads: only decoding finds it out
    out, kept, skipped = DeviceCrops(torch.device("cpu"), 32, decoder=jpeg_only_decoder)(batch)
    assert out.shape == (3, 3, 32, 32) and kept.tolist() == [0, 1, 3] and skipped == 1
    # The CMYK image decodes to the same picture as the RGB one, within JPEG's rounding.
    assert (out[2].float() - out[0].float()).abs().mean() < 6.0


def test_a_decoder_that_refuses_everything_is_caught_early_and_said_when_it_happens():
    """An image extension that imports but does not decode: nvjpeg_decoder's probe finds it
    (so auto keeps the CPU path), and a DeviceCrops given one anyway counts every image Pillow
    decodes instead and warns once, rather than train slowly while saying gpu."""
    def refuses(datas):
        raise RuntimeError("Not compiled with GPU support")

    assert not device_decode._decodes_a_probe(refuses)
    assert device_decode._decodes_a_probe(jpeg_only_decoder)
    crops = DeviceCrops(torch.device("cpu"), 16, decoder=refuses)
    batch = [encoded_crop(io.BytesIO(_jpeg(_smooth_image(40, 30, i))), image_size=16,
                          augmentation="scale", rng=np.random.default_rng(i)) for i in range(4)]
    with pytest.warns(RuntimeWarning, match="the GPU decoder refused all 4 images of a batch"):
        out, kept, skipped = crops(batch)
    assert out.shape == (4, 3, 16, 16) and skipped == 0 and crops.by_pillow == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once is enough
        crops(batch)
    assert crops.by_pillow == 8


def test_an_unreadable_file_is_left_out_by_the_worker():
    assert encoded_crop(io.BytesIO(b"\xff\xd8\xff not a jpeg"), image_size=32,
                        augmentation="scale", rng=np.random.default_rng(0)) is None


def test_a_feed_decoding_on_the_device_trains_on_the_cpu_feeds_crops(tmp_path, monkeypatch):
    """Two feeds of one image folder, one decoding in its workers and one on its device: the
    same images in the same order with the same labels, each crop within resampling of the
    other's, and the corrupt file counted by both."""
    rng = np.random.default_rng(0)
    for label in range(3):
        for split, count in (("train", 6), ("val", 2)):
            folder = tmp_path / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                _smooth_image(80 + 8 * i, 60 + 5 * label, int(rng.integers(1000))).save(
                    folder / f"{i}.jpg", quality=95)
    (tmp_path / "train" / "class0" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    monkeypatch.setattr(device_decode, "nvjpeg_decoder", lambda device: jpeg_only_decoder)
    data = load_image_folder(tmp_path, image_size=32, loader_workers=0)
    batches = {}
    for on_device in (False, True):
        placement = Placement(torch.device("cpu"), lambda x: x, seed=5, augment=True,
                              decode_on_device=on_device)
        feed = StreamFeed(data, placement)
        batches[on_device] = list(feed.train_batches(1, 19))
        assert feed.skipped == 1
    (cpu_images, cpu_labels, cpu_weight), = batches[False]
    (device_images, device_labels, device_weight), = batches[True]
    assert torch.equal(cpu_labels, device_labels) and cpu_weight == device_weight == 1.0
    assert device_images.shape == cpu_images.shape == (18, 3, 32, 32)
    # Normalised pixels (std units): within a few levels of 255 of each other per image.
    per_image = (device_images - cpu_images).abs().mean(dim=(1, 2, 3))
    assert per_image.max() < 8 / 255 / 0.225, per_image


def test_decode_gpu_is_refused_where_it_cannot_run_and_auto_falls_back():
    streamed = dict(in_memory=False)
    with pytest.raises(ValueError, match="decode: gpu needs a CUDA device with torchvision's "
                                         "nvJPEG decoder installed; this run is on cpu"):
        resolve_execution(TrainRecipe(decode="gpu"), "cpu", **streamed)
    with pytest.raises(ValueError, match="decode: gpu applies to streamed image data sets"):
        resolve_execution(TrainRecipe(decode="gpu"), "cpu")
    assert resolve_execution(TrainRecipe(decode="auto"), "cpu", **streamed).decode == "cpu"
    assert resolve_execution(TrainRecipe(), "cpu", **streamed).decode == "cpu"
    assert resolve_execution(TrainRecipe(decode="auto"), "cpu").decode == "none"  # in memory
    assert device_decode.nvjpeg_decoder(torch.device("cpu")) is None
    with pytest.raises(ValueError, match="decode: gpu needs torchvision's nvJPEG decoder"):
        DeviceCrops(torch.device("cpu"), 32)


def test_a_bad_decode_is_one_clear_error():
    with pytest.raises(ValueError, match="TrainRecipe.decode must be one of cpu, gpu, auto, "
                                         "got 'nvjpeg'"):
        TrainRecipe(decode="nvjpeg")


def test_the_papers_preprocessing_applies_as_on_the_cpu_path():
    """PCA lighting drawn by the worker right after the crop (the CPU path's draw, from the same
    generator), the per-pixel mean subtracted on the device: the float crops the CPU path makes,
    within resampling."""
    images = [_smooth_image(400, 300, seed) for seed in range(4)]
    centres = np.stack([np.asarray(image.resize((64, 64)), dtype=np.float32) / 255
                        for image in images])
    statistics = PixelStatistics.of(centres)
    preprocess = Preprocess(lighting=0.1, pixel_mean=True, statistics=statistics)
    crops = DeviceCrops(torch.device("cpu"), 64, decoder=jpeg_only_decoder, preprocess=preprocess)
    for seed, image in enumerate(images):
        data = _jpeg(image)
        cpu_rng, device_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        cpu = decode(io.BytesIO(data), image_size=64, augmentation="scale", rng=cpu_rng,
                     preprocess=preprocess)
        encoded = encoded_crop(io.BytesIO(data), image_size=64, augmentation="scale",
                               rng=device_rng, preprocess=preprocess)
        assert cpu_rng.bit_generator.state == device_rng.bit_generator.state
        assert encoded.lighting is not None and any(abs(v) > 1e-4 for v in encoded.lighting)
        out = crops([encoded])[0]
        assert out.dtype == torch.float32 and out.shape == (1, 3, 64, 64)
        assert (out[0] - cpu).abs().mean() < 1.5 / 255


@pytest.mark.gpu
def test_nvjpeg_crops_are_pillows_crops_on_the_gpu():
    """The GPU check: torchvision's nvJPEG decodes the batch on the device (where it is
    installed), and the crops match the CPU path's within resampling and JPEG decoders'
    rounding."""
    device = torch.device("cuda")
    decoder = device_decode.nvjpeg_decoder(device)
    if decoder is None:
        pytest.skip("torchvision's nvJPEG decoder is not installed beside this torch")
    crops = DeviceCrops(device, 64)
    encoded, expected = [], []
    for seed in range(8):
        data = _jpeg(_smooth_image(500, 375, seed))
        expected.append(np.asarray(train_crop(io.BytesIO(data), image_size=64, augmentation="scale",
                                              rng=np.random.default_rng(seed)), dtype=np.float32))
        encoded.append(encoded_crop(io.BytesIO(data), image_size=64, augmentation="scale",
                                    rng=np.random.default_rng(seed)))
    out, kept, skipped = crops(encoded)
    assert out.device.type == "cuda" and kept.tolist() == list(range(8)) and skipped == 0
    for crop, cpu in zip(out.cpu(), expected):
        assert np.abs(crop.permute(1, 2, 0).numpy() - cpu).mean() < 2.0
    assert normalise(out).dtype == torch.float32


@pytest.mark.gpu
def test_nvjpeg_never_writes_memory_that_work_queued_on_the_stream_still_reads():
    """torchvision's decoder writes its outputs from a stream of its own that does not wait for
    the caller's: a block freed while a queued kernel still reads it must not become a decoded
    image. Here a copy queued behind a long sleep reads a freed block of the decoded image's
    size, and must read what was there."""
    device = torch.device("cuda")
    decoder = device_decode.nvjpeg_decoder(device)
    if decoder is None:
        pytest.skip("torchvision's nvJPEG decoder is not installed beside this torch")
    data = torch.frombuffer(bytearray(_jpeg(_smooth_image(64, 48, 0))), dtype=torch.uint8)
    for _ in range(5):
        freed = torch.full((3, 48, 64), 7, dtype=torch.uint8, device=device)
        torch.cuda._sleep(100_000_000)  # tens of milliseconds queued before the copy
        copied = freed.clone()  # reads `freed` once the sleep ends
        del freed  # free on this stream while the copy still waits to read it
        image, = decoder([data])
        torch.cuda.synchronize()
        assert image.shape == (3, 48, 64)
        assert bool((copied == 7).all()), "the decoder wrote a block a queued kernel still read"

