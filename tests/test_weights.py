"""`trufor-trt weights`: the authors' archive fetched from a local HTTP server (127.0.0.1) that
serves a zip made here in the official layout (the seed-0 checkpoint as weights/trufor.pth.tar),
then `analyze` with the default checkpoint. Broken downloads, wrong archives, an unreachable host."""

import hashlib
import http.server
import io
import threading
import zipfile

import pytest
from typer.testing import CliRunner

from trufor_trt.cli import app

from conftest import free_port, shared_crop


def _zip_of(members: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


class _Archives(http.server.BaseHTTPRequestHandler):
    """GET /NAME: the server's file NAME, honouring `Range: bytes=N-`; a name in `truncate_once`
    is cut off half way the first time it is asked for (a connection that broke)."""

    files: dict = {}
    truncate_once: set = set()
    requests: list = []
    timeout = 10

    def do_GET(self):  # noqa: N802 (http.server's name)
        name = self.path.lstrip("/")
        self.requests.append((name, self.headers.get("Range")))
        if name not in self.files:
            self.send_error(404)
            return
        data, start = self.files[name], 0
        if self.headers.get("Range", "").startswith("bytes="):
            start = int(self.headers["Range"][6:].split("-")[0])
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if name in self.truncate_once:
            self.truncate_once.discard(name)
            self.wfile.write(data[start:start + (len(data) - start) // 2])
            self.close_connection = True
            return
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def authors_zip(checkpoint_seed0) -> bytes:
    return _zip_of({"weights/trufor.pth.tar": checkpoint_seed0.read_bytes()})


@pytest.fixture
def server(authors_zip):
    """The archives server on 127.0.0.1, stopped after the test whatever happens."""
    _Archives.files = {"TruFor_weights.zip": authors_zip,
                       "no_checkpoint.zip": _zip_of({"weights/readme.txt": b"no weights here"}),
                       "not_a_checkpoint.zip": _zip_of({"weights/trufor.pth.tar": b"\x00" * 4096})}
    _Archives.truncate_once, _Archives.requests = set(), []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Archives)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture
def data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TRUFOR_TRT_DATA", str(tmp_path / "data"))
    return tmp_path / "data"


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _download(url: str, md5: str, *extra: str):
    return CliRunner().invoke(app, ["weights", "download", "--url", url, "--md5", md5, "--timeout", "10", *extra])


def test_download_then_analyze_with_the_default_checkpoint(server, authors_zip, data_folder, checkpoint_seed0,
                                                          tmp_path):
    result = _download(f"{server}/TruFor_weights.zip", _md5(authors_zip), "--accept-license")
    assert result.exit_code == 0, result.output
    assert "non-profit" in result.output and "not the official trufor.pth.tar" in result.output
    stored = data_folder / "weights" / "trufor.pth.tar"
    assert stored.read_bytes() == checkpoint_seed0.read_bytes() and not list(stored.parent.glob("*.part"))
    where = CliRunner().invoke(app, ["weights", "path"])
    assert where.exit_code == 0 and str(stored) in where.output
    assert f"weights: {stored} (not the official trufor.pth.tar)" in CliRunner().invoke(app, ["doctor"]).output
    image = shared_crop(tmp_path / "photo.png", 0)
    analyzed = CliRunner().invoke(app, ["analyze", str(image), "--out", str(tmp_path / "out"), "--backend", "torch",
                                        "--device", "cpu", "--no-png"])
    assert analyzed.exit_code == 0, analyzed.output
    assert f"weights: {stored}" in analyzed.output and (tmp_path / "out" / f"{image.name}.npz").is_file()


def test_a_download_that_broke_off_is_resumed_by_the_same_command(server, authors_zip, data_folder):
    _Archives.truncate_once = {"TruFor_weights.zip"}
    url = f"{server}/TruFor_weights.zip"
    broken = _download(url, _md5(authors_zip), "--accept-license")
    assert broken.exit_code == 2 and "broke off" in broken.output and "again to resume" in broken.output
    assert not (data_folder / "weights" / "trufor.pth.tar").exists()
    resumed = _download(url, _md5(authors_zip), "--accept-license")
    assert resumed.exit_code == 0, resumed.output
    half = len(authors_zip) // 2
    assert _Archives.requests == [("TruFor_weights.zip", None), ("TruFor_weights.zip", f"bytes={half}-")]
    assert "resuming after" in resumed.output


@pytest.mark.parametrize("name, md5, reason", [
    ("TruFor_weights.zip", "0" * 32, "not the authors' archive"),
    ("no_checkpoint.zip", None, "holds no trufor.pth.tar"),
    ("not_a_checkpoint.zip", None, "not a TruFor checkpoint"),
])
def test_a_wrong_archive_is_refused_and_nothing_is_stored(server, data_folder, name, md5, reason):
    result = _download(f"{server}/{name}", md5 or _md5(_Archives.files[name]), "--accept-license")
    assert result.exit_code == 2 and reason in result.output, result.output
    assert not list((data_folder / "weights").iterdir())  # no checkpoint, no archive left to resume


def test_an_unreachable_host_says_so_with_the_manual_steps(data_folder):
    result = _download(f"http://127.0.0.1:{free_port()}/TruFor_weights.zip", "0" * 32, "--accept-license")
    assert result.exit_code == 2 and "cannot be reached" in result.output
    assert "weights add TruFor_weights.zip" in result.output


def test_nothing_is_downloaded_until_the_licence_is_accepted(server, data_folder):
    result = _download(f"{server}/TruFor_weights.zip", "0" * 32)
    assert result.exit_code == 2 and "licence was not accepted" in result.output and _Archives.requests == []


def test_weights_add_stores_a_zip_downloaded_by_hand(authors_zip, data_folder, tmp_path, checkpoint_seed0):
    (tmp_path / "TruFor_weights.zip").write_bytes(authors_zip)
    result = CliRunner().invoke(app, ["weights", "add", str(tmp_path / "TruFor_weights.zip")])
    assert result.exit_code == 0, result.output
    assert (data_folder / "weights" / "trufor.pth.tar").read_bytes() == checkpoint_seed0.read_bytes()


def test_without_weights_or_a_checkpoint_analyze_says_where_weights_come_from(data_folder, tmp_path):
    image = shared_crop(tmp_path / "photo.png", 0)
    result = CliRunner().invoke(app, ["analyze", str(image), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "trufor-trt weights download" in result.output and "--random-weights" in result.output
    where = CliRunner().invoke(app, ["weights", "path"])
    assert where.exit_code == 1 and "not downloaded yet" in where.output
    assert "not downloaded yet: trufor-trt weights download" in CliRunner().invoke(app, ["doctor"]).output
