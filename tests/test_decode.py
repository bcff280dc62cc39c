"""Decoding gives Pillow's `Image.open(p).convert("RGB")`, and refuses bad input in one line."""

import io
import os
import struct
import threading
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from trufor_trt.engine.decode import MIN_SIDE, decode_bytes, decode_image
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


# Every mode Pillow has, in every format the decoder accepts (those Pillow writes it in).
MATRIX_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
                "I", "I;16", "I;16B", "F")
MATRIX_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")


def _in_mode(mode: str) -> Image.Image:
    rgb = Image.fromarray(_pixels(34, 45))
    if mode.startswith("I;16"):
        deep = np.random.default_rng(5).integers(0, 65536, (34, 45), dtype=np.uint16)
        return Image.frombytes(mode, (45, 34), deep.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    if mode in ("I", "F"):
        values = np.random.default_rng(6).integers(-5, 70000, (34, 45))
        return Image.fromarray(values.astype(np.int32 if mode == "I" else np.float32))
    return rgb.convert(mode) if mode not in ("PA", "RGBX") else rgb.convert("RGBA").convert(mode)


def _saved(image: Image.Image, image_format: str, **options):
    buffer = io.BytesIO()
    try:
        image.save(buffer, image_format, **options)
    except (OSError, KeyError, ValueError, TypeError):  # Pillow does not write this mode in this format
        return None
    return buffer.getvalue()


def _official(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"))


def test_every_mode_in_every_format_decodes_as_pillows_convert_rgb():
    """The matrix: each mode Pillow writes in each accepted format (16-bit, float, palettes
    with and without transparency...), bit for bit the official code's pixels."""
    cases = {f"{mode} {image_format}": _saved(_in_mode(mode), image_format)
             for mode in MATRIX_MODES for image_format in MATRIX_FORMATS}
    cases["P+transparency GIF"] = _saved(_in_mode("P"), "GIF", transparency=5, optimize=False)
    cases["P+transparency PNG"] = _saved(_in_mode("P"), "PNG", transparency=5)
    written = {name: data for name, data in cases.items() if data is not None}
    differ = [name for name, data in written.items()
              if not np.array_equal(decode_bytes(data, name), _official(data))]
    assert not differ, differ
    assert len(written) >= 60, sorted(set(cases) - set(written))


def _gif_descriptor(data: bytes) -> int:
    """Where a GIF's first image descriptor starts (after the colour table and any extensions)."""
    offset = 13 + (3 * 2 ** ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    while data[offset] == 0x21:  # an extension: its label, then sub-blocks up to an empty one
        offset += 2
        while data[offset]:
            offset += data[offset] + 1
        offset += 1
    assert data[offset] == 0x2C
    return offset


def _gif_on_a_larger_screen() -> bytes:
    """A transparent GIF whose first (only) frame is smaller than its logical screen, placed inside it."""
    gif = bytearray(_saved(_in_mode("P"), "GIF", transparency=3, optimize=False))
    start = _gif_descriptor(bytes(gif))
    gif[6:10] = struct.pack("<HH", 80, 60)  # the screen; the frame keeps its 45 x 34
    gif[start + 1:start + 5] = struct.pack("<HH", 20, 10)  # the frame's left and top on the screen
    return bytes(gif)


def _bmp_555(pixels: np.ndarray) -> bytes:
    """A 16-bit (5-5-5) BMP of `pixels` (rows bottom-up, padded to 4 bytes)."""
    height, width, _ = pixels.shape
    packed = ((pixels[:, :, 0].astype(np.uint16) >> 3) << 10 | (pixels[:, :, 1].astype(np.uint16) >> 3) << 5
              | pixels[:, :, 2].astype(np.uint16) >> 3).astype("<u2")
    rows = [packed[row].tobytes().ljust((width * 2 + 3) // 4 * 4, b"\0") for row in range(height - 1, -1, -1)]
    body = b"".join(rows)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 16, 0, len(body), 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + len(body), 0, 0, 14 + len(info)) + info + body


@pytest.mark.parametrize("name", ["gif_transparent_index", "gif_frame_smaller_than_screen", "bmp_16_bit"])
def test_the_files_the_issue_names_give_the_official_pixels(name):
    data = {"gif_transparent_index": lambda: _saved(_in_mode("P"), "GIF", transparency=5, optimize=False),
            "gif_frame_smaller_than_screen": _gif_on_a_larger_screen,
            "bmp_16_bit": lambda: _bmp_555(_pixels(34, 45))}[name]()
    with Image.open(io.BytesIO(data)) as image:
        assert image.size[0] >= MIN_SIDE and (name != "bmp_16_bit" or image.info.get("compression") == 0)
    np.testing.assert_array_equal(decode_bytes(data, name), _official(data))
    if name == "bmp_16_bit":  # what OpenCV, the decoder before, made of it (these GIFs it reads as Pillow does)
        opencv = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)[:, :, ::-1]
        assert np.abs(opencv.astype(int) - _official(data)).max() > 0


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
    finish, and descriptor 2 comes back when the last one ends."""
    from trufor_trt.engine.decode import quiet_decoders

    before = (os.fstat(2).st_ino, os.fstat(2).st_dev)
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
        assert (os.fstat(2).st_ino, os.fstat(2).st_dev) != before  # still silenced: the first decodes on
    finally:
        leave.set()
        for thread in threads:
            thread.join(10)
    assert (os.fstat(2).st_ino, os.fstat(2).st_dev) == before


def test_every_format_the_decoder_takes_is_found_in_a_folder_and_an_inbox(tmp_path):
    """A GIF is taken when named, so a folder or watch's inbox must not pass it over."""
    from trufor_trt.batch.inputs import expand_inputs
    from trufor_trt.engine.decode import PILLOW_FORMATS
    from trufor_trt.service.inbox import Inbox

    suffixes = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif", "WebP": ".webp"}
    assert set(suffixes) == set(PILLOW_FORMATS)
    for kind, suffix in suffixes.items():
        (tmp_path / f"{kind}{suffix}").write_bytes(_saved(_in_mode("RGB"), PILLOW_FORMATS[kind]))
    names = sorted(f"{kind}{suffix}" for kind, suffix in suffixes.items())
    assert sorted(job.relative for job in expand_inputs([str(tmp_path)])) == names
    assert sorted(str(relative) for _, relative in Inbox(tmp_path)._candidates()) == names
