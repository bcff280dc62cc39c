"""Decoding gives Pillow's `Image.open(p).convert("RGB")`, and refuses bad input in one line."""

import os
import struct
import threading
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from trufor_trt.engine.decode import MIN_SIDE, decode_image
from trufor_trt.errors import ImageError

from conftest import IMAGES_DIR

SHARED_IMAGES = sorted(path for path in IMAGES_DIR.rglob("*") if path.is_file())


def pillow_rgb(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


@pytest.mark.parametrize("path", SHARED_IMAGES, ids=lambda path: path.name)
def test_shared_images_decode_like_pillow(path):
    np.testing.assert_array_equal(decode_image(path), pillow_rgb(path))


def _pixels(height=40, width=50):
    return np.random.default_rng(7).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _pillow_variants():
    rgb = Image.fromarray(_pixels())
    palette = rgb.convert("P")
    return {
        "grey": (rgb.convert("L"), {}),
        "grey_alpha": (rgb.convert("LA"), {}),
        "rgba": (rgb.convert("RGBA"), {}),
        "palette": (palette, {}),
        "palette_transparent": (palette, {"transparency": 5}),
        "one_bit": (rgb.convert("1"), {}),
        "rgb": (rgb, {}),
    }


@pytest.mark.parametrize("kind", sorted(_pillow_variants()))
def test_png_kinds_decode_like_pillow(tmp_path, kind):
    image, options = _pillow_variants()[kind]
    path = tmp_path / f"{kind}.png"
    image.save(path, **options)
    np.testing.assert_array_equal(decode_image(path), pillow_rgb(path))


def test_jpeg_exif_orientation_is_not_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(_pixels(40, 60)).save(path, quality=95, exif=exif)
    decoded = decode_image(path)
    assert decoded.shape == (40, 60, 3)
    np.testing.assert_array_equal(decoded, pillow_rgb(path))


def test_sixteen_bit_images_are_rescaled_linearly(tmp_path):
    deep = np.random.default_rng(3).integers(0, 65536, (33, 35, 3), dtype=np.uint16)
    deep[0, :4, 0] = [0, 128, 129, 65535]
    path = tmp_path / "deep.png"
    assert cv2.imwrite(str(path), deep[:, :, ::-1])
    decoded = decode_image(path)
    np.testing.assert_array_equal(decoded, np.rint(deep / 257.0).astype(np.uint8))
    assert list(decoded[0, :4, 0]) == [0, 0, 1, 255]


def test_sixteen_bit_grey_becomes_three_equal_channels(tmp_path):
    deep = np.full((32, 32), 257 * 200, dtype=np.uint16)
    path = tmp_path / "grey16.png"
    assert cv2.imwrite(str(path), deep)
    assert (decode_image(path) == 200).all()


def _png_bytes(width: int, height: int, with_pixels: bool) -> bytes:
    """A PNG whose header claims width x height; pixel data only if asked."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload)))
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    data = chunk(b"IDAT", zlib.compress(b"\0" * (1 + 3 * width) * height)) if with_pixels else b""
    return b"\x89PNG\r\n\x1a\n" + header + data + chunk(b"IEND", b"")


def _write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _encoded(suffix: str, pixels) -> bytes:
    ok, data = cv2.imencode(suffix, pixels)
    assert ok
    return data.tobytes()


BAD_INPUTS = {
    "missing": (lambda tmp: tmp / "absent.png", "no such file"),
    "folder": (lambda tmp: tmp, "not a regular file"),
    "empty": (lambda tmp: _write(tmp, "empty.png", b""), "empty file"),
    "text": (lambda tmp: _write(tmp, "notes.png", b"just some text\n"), "not an image"),
    "truncated_png": (lambda tmp: _write(tmp, "cut.png", _encoded(".png", _pixels())[:300]),
                      "truncated or corrupt PNG"),
    "truncated_jpeg": (lambda tmp: _write(tmp, "cut.jpg", _encoded(".jpg", _pixels())[:700]),
                       "truncated or corrupt JPEG"),
    "too_small": (lambda tmp: _write(tmp, "small.png", _png_bytes(MIN_SIDE - 1, 100, True)),
                  f"minimum of {MIN_SIDE} px"),
    "bomb": (lambda tmp: _write(tmp, "bomb.png", _png_bytes(100_000, 100_000, False)),
             "more than the limit"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_one_typed_line(tmp_path, case):
    make_path, expected = BAD_INPUTS[case]
    with pytest.raises(ImageError) as raised:
        decode_image(make_path(tmp_path))
    assert expected in raised.value.reason
    assert "\n" not in str(raised.value)


def test_smallest_accepted_image_decodes(tmp_path):
    path = _write(tmp_path, "edge.png", _png_bytes(MIN_SIDE, MIN_SIDE, True))
    assert decode_image(path).shape == (MIN_SIDE, MIN_SIDE, 3)


def test_pixel_limit_is_configurable(tmp_path):
    path = _write(tmp_path, "ok.png", _encoded(".png", _pixels()))
    with pytest.raises(ImageError, match="more than the limit of 1,999"):
        decode_image(path, max_pixels=1999)
    assert decode_image(path, max_pixels=2000).shape == (40, 50, 3)


def _cmyk_jpeg(source, quality: int) -> bytes:
    """A CMYK JPEG as Pillow writes it (an Adobe APP14 marker, inverted samples)."""
    import io

    with Image.open(source) as image:
        buffer = io.BytesIO()
        image.convert("RGB").convert("CMYK").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _adobe_transform_offset(data: bytes) -> int:
    """Where the Adobe APP14 marker keeps its colour transform byte (0 CMYK, 2 YCCK)."""
    start = data.index(b"\xff\xee")
    assert data[start + 4:start + 9] == b"Adobe"
    return start + 4 + 11


def _cmyk_variants(source, quality):
    cmyk = _cmyk_jpeg(source, quality)
    start = cmyk.index(b"\xff\xee")
    length = struct.unpack(">H", cmyk[start + 2:start + 4])[0]
    no_adobe = cmyk[:start] + cmyk[start + 2 + length:]  # plain CMYK, not inverted
    offset = _adobe_transform_offset(cmyk)
    ycck = cmyk[:offset] + b"\x02" + cmyk[offset + 1:]  # the same samples read as YCCK
    return {"adobe_cmyk": cmyk, "plain_cmyk": no_adobe, "ycck": ycck}


@pytest.mark.shared
@pytest.mark.parametrize("index, quality", [(0, 95), (7, 75), (30, 50)])
def test_cmyk_and_ycck_jpegs_decode_exactly_like_pillow(tmp_path, index, quality):
    source = sorted((IMAGES_DIR / "cocoglide_sample").rglob("*.png"))[index]
    opencv_differs = False
    for name, data in _cmyk_variants(source, quality).items():
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(data)
        with Image.open(path) as image:
            assert image.mode == "CMYK"
        np.testing.assert_array_equal(decode_image(path), pillow_rgb(path), err_msg=name)
        opencv = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
        opencv_differs |= not np.array_equal(opencv, pillow_rgb(path))
    assert opencv_differs  # what this guards against: OpenCV's own CMYK conversion


def test_sixteen_bit_rgb_differs_from_pillow_by_at_most_one_level(tmp_path):
    values = np.linspace(0, 65535, 40 * 50 * 3).round().astype(np.uint16).reshape(40, 50, 3)
    cv2.imwrite(str(tmp_path / "rgb16.png"), values[:, :, ::-1])
    ours, pillows = decode_image(tmp_path / "rgb16.png"), pillow_rgb(tmp_path / "rgb16.png")
    np.testing.assert_array_equal(pillows, (values >> 8).astype(np.uint8))  # the high byte
    assert np.abs(ours.astype(int) - pillows.astype(int)).max() == 1


def test_a_corrupt_jpeg_is_reported_by_us_alone(tmp_path, capfd):
    # Complete markers around damaged entropy-coded data: libjpeg itself warns on stderr.
    data = bytearray(cv2.imencode(".jpg", _pixels(64, 64))[1].tobytes())
    scan = data.index(b"\xff\xda")
    data[scan + 40:len(data) - 40] = b"\x00" * (len(data) - scan - 80)
    (tmp_path / "damaged.jpg").write_bytes(bytes(data))
    capfd.readouterr()
    decode_image(tmp_path / "damaged.jpg")
    assert capfd.readouterr().err == ""


def test_decoders_are_quiet_for_several_threads_at_once_and_everything_is_restored():
    """The pipeline's host workers decode at once: one decode must not wait for another to
    finish, and descriptor 2 and OpenCV's log level come back when the last one ends."""
    from trufor_trt.engine.decode import quiet_decoders

    before = (os.fstat(2).st_ino, os.fstat(2).st_dev), cv2.utils.logging.getLogLevel()
    inside, leave, second_done = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with quiet_decoders():
            inside.set()
            leave.wait(10)

    def second() -> None:
        inside.wait(10)
        with quiet_decoders():
            pass
        second_done.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    try:
        assert second_done.wait(5), "a decode waited for another one to finish"
        assert (os.fstat(2).st_ino, os.fstat(2).st_dev) != before[0]  # still silenced: the first decodes on
    finally:
        leave.set()
        for thread in threads:
            thread.join(10)
    assert ((os.fstat(2).st_ino, os.fstat(2).st_dev), cv2.utils.logging.getLogLevel()) == before
