"""Capture points under hostile input: every reproduction of issue 30 refused with a one-line
reason in bounded memory and time: image bombs of each accepted format, files that are not
images or not regular files, names that would forge log lines, links in a watched inbox, and
`serve` against slow, idle, oversized, malformed and numerous clients."""

import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
import unicodedata
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from trufor_trt.engine.decode import decode_bytes, read_image_file
from trufor_trt.engine.image_headers import header_size, sniff_format
from trufor_trt.errors import ImageError, printable


MIB = 1024 ** 2


def _riff(chunk: bytes, body: bytes) -> bytes:
    payload = b"WEBP" + chunk + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", len(payload)) + payload


def _tiff(width: int, height: int) -> bytes:
    """A little-endian TIFF whose one directory claims width x height, with one tiny deflated strip."""
    strip = zlib.compress(b"\0" * 64)
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 8), (262, 3, 1, 1),
               (273, 4, 1, 8 + 2 + 12 * 8 + 4), (277, 3, 1, 1), (279, 4, 1, len(strip))]
    directory = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *entry) for entry in entries)
    return b"II*\x00" + struct.pack("<I", 8) + directory + struct.pack("<I", 0) + strip


def _tiff_two_sizes(first: tuple, second: tuple) -> bytes:
    """A TIFF whose directory states its width and length twice (first, then second (w, h))."""
    strip = zlib.compress(b"\0" * 64)
    entries = [(256, 4, 1, first[0]), (257, 4, 1, first[1]), (256, 4, 1, second[0]), (257, 4, 1, second[1]),
               (258, 3, 1, 8), (259, 3, 1, 8), (262, 3, 1, 1), (273, 4, 1, 8 + 2 + 12 * 10 + 4), (277, 3, 1, 1),
               (279, 4, 1, len(strip))]
    directory = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *entry) for entry in entries)
    return b"II*\x00" + struct.pack("<I", 8) + directory + struct.pack("<I", 0) + strip


def test_a_tiff_that_states_two_sizes_is_held_to_the_one_it_decodes(tmp_path):
    """Whichever size the header check reads, the limit holds for the size the decoder parsed:
    each order of a small and a 900 MP size is refused (or decoded small) in bounded memory and time."""
    for order, sizes in {"small-first": ((64, 64), (30000, 30000)), "large-first": ((30000, 30000), (64, 64))}.items():
        (tmp_path / f"{order}.tif").write_bytes(_tiff_two_sizes(*sizes))
    code = (f"import time\nfor path in sorted(Path({str(tmp_path)!r}).glob('*.tif')):\n"
            "    started = time.monotonic()\n"
            "    try:\n        assert decode_bytes(read_image_file(path), path).size <= 3 * 150_000_000\n"
            "    except ImageError:\n        pass\n"
            "    assert time.monotonic() - started < 2, path\n")
    assert _peak_rss_growth(code) < 200 * MIB


def _bombs() -> dict:
    """Format -> a small file claiming far more pixels than --max-pixels' default allows."""
    vp8x = bytes([0, 0, 0, 0]) + (16383 - 1).to_bytes(3, "little") + (16383 - 1).to_bytes(3, "little")
    lossless = bytes([0x2F]) + ((16383 - 1) | ((16383 - 1) << 14)).to_bytes(4, "little")
    lossy = b"\x00\x00\x00\x9d\x01\x2a" + struct.pack("<HH", 16383, 16383)
    gif_frame = (b"GIF89a" + struct.pack("<HHBBB", 10, 10, 0, 0, 0)
                 + b"\x2c" + struct.pack("<HHHHB", 0, 0, 60000, 60000, 0) + b"\x02\x02\x44\x01\x00\x3b")
    return {
        "webp-extended": _riff(b"VP8X", vp8x), "webp-lossless": _riff(b"VP8L", lossless),
        "webp-lossy": _riff(b"VP8 ", lossy),
        "tiff": _tiff(13000, 13000),
        "bmp": b"BM" + struct.pack("<IHHI", 0, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, 50000, 50000, 1, 24,
                                                                      0, 0, 0, 0, 0, 0),
        "gif-screen": b"GIF89a" + struct.pack("<HHBBB", 60000, 60000, 0, 0, 0) + b"\x3b",
        "gif-frame": gif_frame,
        "png": b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0),
    }


@pytest.mark.parametrize("name", sorted(_bombs()))
def test_every_formats_bomb_is_refused_from_its_header(name):
    data = _bombs()[name]
    with pytest.raises(ImageError, match=r"pixels, more than the limit of 150,000,000 \(raise it with --max-pixels\)"):
        decode_bytes(data, name)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _progressive_jpeg_with_scans(scans: int, side: int) -> bytes:
    """A flat progressive JPEG with `scans` more scans, each a few bytes that make the decoder
    pass over every luma block (one end-of-band run of 32767 blocks, its Huffman table's only
    code)."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (90, 120, 150)).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    table = b"\xff\xc4" + struct.pack(">H", 20) + b"\x13" + bytes([1] + [0] * 15) + b"\xe0"
    scan = b"\xff\xda" + struct.pack(">H", 8) + b"\x01\x01\x03\x01\x3f\x00" + b"\x7f\xff\x00"
    return data[:-2] + table + scan * scans + data[-2:]


def _png_with_text_chunks(chunks: int) -> bytes:
    """A 256 x 256 PNG with `chunks` compressed text chunks, each inflating to 1 MB (with an
    empty keyword, which Pillow's limit on text memory does not count)."""
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), (10, 20, 30)).save(buffer, "PNG")
    data = buffer.getvalue()
    text = _png_chunk(b"zTXt", b"\x00\x00" + zlib.compress(bytes(1_000_000), 9))
    first_data = data.index(b"IDAT") - 4
    return data[:first_data] + text * chunks + data[first_data:]


def time_bombs() -> dict:
    """Files whose decoding costs far more than their pixels (issue 39), all within limits of
    size and pixels; on the code before it: about 6 s and 4 s here."""
    return {"jpeg-scans": _progressive_jpeg_with_scans(20_000, 2048), "png-text": _png_with_text_chunks(6000)}


def test_time_bombs_cost_under_two_seconds_and_200_mb(tmp_path):
    for name, data in time_bombs().items():
        (tmp_path / f"{name}.bomb").write_bytes(data)
    code = (f"import time\nfor path in sorted(Path({str(tmp_path)!r}).glob('*.bomb')):\n"
            "    started = time.monotonic()\n"
            "    try:\n        decode_bytes(read_image_file(path), path)\n        raise SystemExit(f'{path} decoded')\n"
            "    except ImageError as exc:\n        assert 'bomb' in str(exc), exc\n"
            "    assert time.monotonic() - started < 2, (path, time.monotonic() - started)\n")
    assert _peak_rss_growth(code) < 200 * MIB


def test_a_decode_is_stopped_once_its_allowance_has_passed():
    """Under the scan limit, but slow for its size: stopped mid-decode at a small allowance;
    decoded (as Pillow decodes it) at the default."""
    data = _progressive_jpeg_with_scans(450, 2048)
    with pytest.raises(ImageError, match=r"decoding took over 0\.007\d* s, this image's allowance \(--decode-seconds 0\.005"):
        decode_bytes(data, "slow.jpg", decode_seconds=0.005)
    assert np.array_equal(decode_bytes(data, "slow.jpg"), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def _real_images(folder: Path) -> dict:
    """Small real files of every accepted format, written by OpenCV and Pillow."""
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 255, (37, 53, 3), np.uint8)
    paths = {}
    for suffix in (".png", ".jpg", ".bmp", ".tif", ".webp"):
        paths[suffix] = folder / f"opencv{suffix}"
        assert cv2.imwrite(str(paths[suffix]), pixels)
    for name, options in (("lossless.webp", {"lossless": True}), ("lossy.webp", {"quality": 80}),
                          ("pillow.gif", {}), ("big-endian.tif", {"tiffinfo": {}}), ("pillow.bmp", {})):
        paths[name] = folder / name
        Image.fromarray(pixels).save(paths[name], **options)
    return paths


def test_header_sizes_are_what_the_decoders_decode(tmp_path):
    """Not a parser checked against itself: each file is written by OpenCV or Pillow and read back."""
    for name, path in _real_images(tmp_path).items():
        data = path.read_bytes()
        kind = sniff_format(data)
        assert header_size(data, kind) == (37, 53), name
        assert decode_bytes(data, name).shape == (37, 53, 3), name


def test_a_file_whose_header_does_not_say_its_size_is_not_handed_to_a_codec():
    for data in (_riff(b"VP8X", b"\0\0"), b"GIF89a\x0a\x00", b"II*\x00\x08\x00\x00\x00\x01\x00", b"BM\0\0"):
        with pytest.raises(ImageError, match="its header does not say its size"):
            decode_bytes(data, "truncated")


def _peak_rss_growth(code: str) -> int:
    """Bytes the peak RSS of a fresh process grows by while it runs `code` (after its imports)."""
    script = ("import resource\n"
              "from pathlib import Path\n"
              "from trufor_trt.engine.decode import decode_bytes, read_image_file\n"
              "from trufor_trt.errors import ImageError\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              f"{code}\n"
              "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)\n")
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                              cwd=Path(__file__).resolve().parents[1])
    assert finished.returncode == 0, finished.stderr
    return int(finished.stdout.strip().splitlines()[-1])


def test_bombs_and_large_non_images_cost_no_memory(tmp_path):
    for name, data in _bombs().items():
        (tmp_path / f"{name}.bomb").write_bytes(data)
    sparse = tmp_path / "two-gigabytes.png"
    with open(sparse, "wb") as handle:
        handle.truncate(2 * 1024 ** 3)  # a hole: nothing on disk, 2 GB to whoever reads it
    code = (f"for path in sorted(Path({str(tmp_path)!r}).glob('*.bomb')):\n"
            "    try:\n        decode_bytes(read_image_file(path), path)\n        raise SystemExit(f'{path} decoded')\n"
            "    except ImageError as exc:\n        assert 'more than the limit' in str(exc), exc\n"
            f"try:\n    read_image_file({str(sparse)!r}, 4 * 1024 ** 3)\nexcept ImageError as exc:\n"
            "    assert 'not an image' in str(exc), exc\n")
    assert _peak_rss_growth(code) < 200 * MIB


def test_special_and_oversized_files_get_a_reason_without_being_read(tmp_path):
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    (tmp_path / "large.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(2000))
    reasons = {}
    for name in ("fifo.png", "zero.png", "large.png", "absent.png"):
        with pytest.raises(ImageError) as raised:
            read_image_file(tmp_path / name, max_bytes=1000)
        reasons[name] = raised.value.reason
    assert reasons == {"fifo.png": "not a regular file (a FIFO)",
                       "zero.png": "not a regular file (a character device)",
                       "large.png": "file is 2,008 bytes, more than the limit of 1,000 (raise it with --max-file)",
                       "absent.png": "no such file"}


def test_analyze_refuses_special_files_and_forged_names_and_goes_on(tmp_path, model_seed0, service_images):
    """A /dev/zero link and a FIFO in the input folder, a FIFO named directly, and a file whose
    name holds a newline: each its one-line reason, the good image analysed, exit code 1, in
    bounded time (a hang would be the timeout)."""
    images = tmp_path / "images"
    images.mkdir()
    good = sorted(service_images.glob("*.png"))[0]
    (images / good.name).write_bytes(good.read_bytes())
    (images / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(images / "fifo.png")
    os.mkfifo(tmp_path / "named.png")
    (images / "forged\nfailed fake.png: score 0.0000.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    finished = subprocess.run([sys.executable, "-m", "trufor_trt", "analyze", str(images), str(tmp_path / "named.png"),
                               "--out", str(tmp_path / "out"), "--model", str(model_seed0), "--no-png"],
                              capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert finished.returncode == 1, finished.stdout + finished.stderr
    records = {Path(json.loads(line)["input"]).name: json.loads(line)
               for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()}
    assert records[good.name]["status"] == "ok"
    assert records["zero.png"]["reason"] == "not a regular file (a character device)"
    assert records["fifo.png"]["reason"] == records["named.png"]["reason"] == "not a regular file (a FIFO)"
    lines = finished.stderr.splitlines()  # the console's
    assert not any(line.startswith("failed fake.png") for line in lines)
    assert any("forged\\x0afailed fake.png" in line for line in lines), finished.stderr


def test_printable_escapes_every_control_character():
    assert printable("a\nb\r\x1b[2J\x7f\x85\u2028c") == "a\\x0ab\\x0d\\x1b[2J\\x7f\\x85\\u2028c"
    assert printable("été.png") == "été.png"


def test_names_that_differ_only_in_unicode_form_are_shown_apart():
    """NFC / NFD twins (one file each on Linux) never show as the same name twice."""
    composed = unicodedata.normalize("NFC", "café-한.png")
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed and printable(composed) == composed
    assert printable(decomposed) == "cafe\\u0301-\\u1112\\u1161\\u11ab.png"


def test_watch_refuses_links_and_special_files_and_clears_a_killed_copy(tmp_path, model_seed0, service_images):
    """A link (to a good image) and a FIFO in the inbox: each a failed record with its reason, moved
    to --failed as it is (the link's target untouched); the good image analysed and filed; a
    temporary copy a killed watch left in --done removed at start."""
    from trufor_trt.batch.analyze import AnalyzeOptions
    from trufor_trt.engine.onnxruntime_runner import OnnxRuntimeRunner
    from trufor_trt.service.watch import LINK_REASON, Watch, WatchOptions

    inbox, out, done, failed = (tmp_path / name for name in ("inbox", "out", "done", "failed"))
    for folder in (inbox, done):
        folder.mkdir()
    good = sorted(service_images.glob("*.png"))[0]
    target = tmp_path / "elsewhere.png"
    target.write_bytes(good.read_bytes())
    (inbox / "good.png").write_bytes(good.read_bytes())
    (inbox / "link.png").symlink_to(target)
    os.mkfifo(inbox / "fifo.png")
    stale = done / ".good.png.999999999.tmp"  # a copy whose writer (no such pid) was killed
    stale.write_bytes(b"half a copy")
    records, stop = [], threading.Event()
    options = WatchOptions(AnalyzeOptions(out_dir=out, write_png=False), done_dir=done, failed_dir=failed,
                           poll=0.2, settle=0.0)
    with OnnxRuntimeRunner(model_seed0) as runner:
        watch = Watch(inbox, runner, options, stop, on_record=records.append, on_notice=print)
        worker = threading.Thread(target=watch.run)
        worker.start()
        deadline = time.monotonic() + 120
        while len(records) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        worker.join(60)
    reasons = {Path(record.input).name: (record.status, record.reason) for record in records}
    assert reasons == {"good.png": ("ok", None), "link.png": ("error", LINK_REASON),
                       "fifo.png": ("error", "not a regular file (a FIFO)")}, reasons
    assert (failed / "link.png").is_symlink() and target.read_bytes() == good.read_bytes()
    assert (done / "good.png").is_file() and not stale.exists() and not any(inbox.iterdir())
