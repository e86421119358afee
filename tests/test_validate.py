"""pipelines/tools/validate.py: bad images are found before a run, with the file and the reason."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import convert
from conftest import import_loader_library
from pipelines.tools.validate import BadImage, check_image, find_bad, image_size
from pipelines.loaders.samples import open_split
from conftest import skimage_photos

# Pillow test images that PIL opens but DALI's JPEG parser rejects ("Invalid marker"): measured
# with nvidia-dali 2.4 (test_header_rules_agree_with_dali re-checks it whenever DALI is there)
DALI_REJECTS = ["jpeg_ff00_header.jpg", "junk_jpeg_header.jpg", "photoshop-200dpi-broken.jpg", "truncated_app14.jpg"]
GOOD = ["hopper.jpg", "hopper_gray.jpg", "pil_sample_cmyk.jpg", "flower.jpg", "exif_gps.jpg", "hopper.png"]


def jpeg_bytes(photo: np.ndarray, **save) -> bytes:
    out = io.BytesIO()
    Image.fromarray(photo).save(out, format="JPEG", **save)
    return out.getvalue()


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return skimage_photos()[1][:96, :128]  # coffee, 96 x 128 RGB


def with_junk_between_segments(data: bytes) -> bytes:
    """Insert two stray bytes after the first segment following SOI (as in Pillow's junk_jpeg_header)."""
    first_len = data[4] << 8 | data[5]
    cut = 4 + first_len
    return data[:cut] + b"\x00\x11" + data[cut:]


def test_image_size_reads_the_header(photo):
    assert image_size(jpeg_bytes(photo)) == (96, 128)
    assert image_size(jpeg_bytes(photo, progressive=True)) == (96, 128)
    assert image_size(jpeg_bytes(photo[..., 0])) == (96, 128)  # grayscale
    for fmt in ("PNG", "BMP", "PPM", "WEBP"):
        buf = io.BytesIO()
        Image.fromarray(photo).save(buf, format=fmt)
        assert image_size(buf.getvalue()) == (96, 128), fmt
    assert image_size(np.frombuffer(jpeg_bytes(photo), np.uint8)) == (96, 128)  # arrays as the loaders read them


def test_check_image_reasons(photo):
    good = jpeg_bytes(photo)
    assert check_image(good) is None
    assert "empty" in check_image(b"")
    assert "not a readable image" in check_image(b"this is not an image at all")
    assert "truncated" in check_image(good[:200]).lower()            # header cut: caught before PIL
    assert "truncated" in check_image(good[:len(good) // 2]).lower()  # scan data cut: PIL's full decode
    junk = with_junk_between_segments(good)
    with Image.open(io.BytesIO(junk)) as img:  # PIL accepts it ...
        img.load()
    assert "invalid JPEG marker" in check_image(junk)  # ... DALI would not
    with pytest.raises(BadImage, match="invalid JPEG marker"):
        image_size(junk)


def test_pillow_odd_images(pillow_test_images):
    for name in DALI_REJECTS:
        assert check_image((pillow_test_images / name).read_bytes()) is not None, name
    for name in GOOD:
        assert check_image((pillow_test_images / name).read_bytes()) is None, name
    assert "truncated" in check_image((pillow_test_images / "truncated_jpeg.jpg").read_bytes())


@pytest.mark.dali
def test_header_rules_agree_with_dali(pillow_test_images):
    """For every Pillow test JPEG, image_size raises exactly when DALI's CPU decoder cannot parse it
    (decode failures on truncated data are PIL's part of check_image)."""
    dali = import_loader_library("nvidia.dali")  # an error, not a skip, where the project installed it
    from nvidia.dali import fn

    current = []

    @dali.pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1,
                       exec_async=False, exec_pipelined=False)
    def decode():
        encoded = fn.external_source(lambda: [current[0]], batch=True)
        return fn.peek_image_shape(encoded)

    disagreements = []
    for path in sorted(pillow_test_images.glob("*.jpg")):
        data = np.fromfile(path, np.uint8)
        try:
            image_size(data)
            ours = True
        except BadImage:
            ours = False
        current[:] = [data]
        pipe = decode()
        try:
            pipe.run()
            theirs = True
        except RuntimeError:
            theirs = False
        if ours != theirs:
            disagreements.append((path.name, ours, theirs))
    assert not disagreements, f"(file, header ok here, DALI parses it): {disagreements}"


def make_bad_folder(root: Path, photo: np.ndarray) -> Path:
    good = jpeg_bytes(photo)
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            (root / cls / f"{i}.jpg").write_bytes(jpeg_bytes(np.roll(photo, 7 * i, axis=1)))
    (root / "cats" / "truncated.jpg").write_bytes(good[:len(good) // 2])
    (root / "dogs" / "junk.jpg").write_bytes(with_junk_between_segments(good))
    (root / "dogs" / "text.jpg").write_bytes(b"hello")
    return root


def test_find_bad_is_reusable(tmp_path, photo):
    samples = open_split(make_bad_folder(tmp_path / "split", photo))
    bad = {samples.names[i]: reason for i, reason in find_bad(samples, workers=2)}
    assert set(bad) == {"cats/truncated.jpg", "dogs/junk.jpg", "dogs/text.jpg"}
    assert "invalid JPEG marker" in bad["dogs/junk.jpg"]


def test_cli_lists_bad_files_and_fails(tmp_path, photo, capsys):
    make_bad_folder(tmp_path / "data" / "train", photo)
    shutil.copytree(tmp_path / "data" / "train" / "cats", tmp_path / "data" / "val" / "cats")
    report_path = tmp_path / "report.json"
    assert convert.main(["validate", str(tmp_path / "data"), "--json", str(report_path), "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert "truncated.jpg" in out and "junk.jpg" in out and "text.jpg" in out
    report = json.loads(report_path.read_text())
    assert report["checked"] == 10 + 3 + 6 and report["bad"] == 3 + 1  # val has its own truncated.jpg
    assert {s: r["bad"] for s, r in report["splits"].items()} == {"train": 3, "val": 1}
    files = [b["file"] for b in report["splits"]["train"]["bad_files"]]
    assert any(f.endswith("cats/truncated.jpg") for f in files)
    # a clean split passes
    (tmp_path / "data" / "val" / "cats" / "truncated.jpg").unlink()
    assert convert.main(["validate", str(tmp_path / "data" / "val")]) == 0


def test_cli_on_webdataset_shards(tmp_path, image_folder):
    out = tmp_path / "wds"
    assert convert.main(["webdataset", "--src", str(image_folder), "--out", str(out), "--shard-size", "10"]) == 0
    assert convert.main(["validate", str(out)]) == 0
    # corrupt one stored image in place: overwrite its first bytes (the JPEG markers)
    samples = open_split(out / "train")
    i = 13
    shard, offset = samples.shards[samples.shard_of[i]], int(samples.offsets[i])
    with open(shard, "r+b") as f:
        f.seek(offset)
        f.write(b"\x00" * 16)
    report_path = tmp_path / "r.json"
    assert convert.main(["validate", str(out / "train"), "--json", str(report_path)]) == 1
    bad = json.loads(report_path.read_text())["splits"]["train"]["bad_files"]
    assert [b["file"] for b in bad] == [f"{shard}:{samples.names[i]}"]


@pytest.mark.parametrize("order", ["<", ">"])                # II (little-endian) and MM TIFF headers
def test_image_size_is_the_upright_size_of_an_exif_turned_jpeg(photo, order):
    """The header's size is what the loaders decode: EXIF orientations 5-8 (90 / 270 degrees) swap
    it, 1-4 do not; the independent reference is Pillow's exif_transpose of the decoded image."""
    import struct
    from PIL import ImageOps
    for o in range(1, 9):
        tiff = (b"II*\0" if order == "<" else b"MM\0*") + struct.pack(order + "I", 8) + struct.pack(order + "H", 1) \
            + struct.pack(order + "HHI", 0x0112, 3, 1) + struct.pack(order + "HH", o, 0) + b"\0\0\0\0"
        data = jpeg_bytes(photo, exif=b"Exif\0\0" + tiff)
        with Image.open(io.BytesIO(data)) as img:
            assert img.getexif().get(0x0112) == o                   # Pillow reads the block we wrote
            w, h = ImageOps.exif_transpose(img).size
        assert image_size(data) == (h, w) == ((128, 96) if o >= 5 else (96, 128)), o


def test_image_size_matches_pillow_on_its_orientation_samples(pillow_test_images):
    from PIL import ImageOps
    for path in sorted(pillow_test_images.glob("*orientation*.jpg")):
        with Image.open(path) as img:
            w, h = ImageOps.exif_transpose(img).size
        assert image_size(path.read_bytes()) == (h, w), path.name
