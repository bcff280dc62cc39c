"""`trufor-trt serve`: a real server on a loopback port, a real HTTP client, against `analyze`."""

import base64
import hashlib
import io
import json
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from typer.testing import CliRunner

from trufor_trt.cli import app

from conftest import BreaksAfter, cli_process, free_port, stop_process

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (the dev extra)")
pytest.importorskip("starlette", reason="serve needs the serve extra")

TIMEOUT = 120  # seconds any one request may take on a 2-core machine, queueing included
START_TIMEOUT = 120
MAX_QUEUE = 2
MAX_BODY = "2M"
TOKEN = "test-token-0123456789"


def _wait_ready(url: str, process, headers=None) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited while starting"
        try:
            if httpx.get(url + "/readyz", headers=headers, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not ready within {START_TIMEOUT} s")


def _start(model, log, *extra):
    port = free_port()
    process = cli_process(log, "serve", "--model", str(model), "--backend", "onnxruntime",
                          "--port", str(port), *extra)
    return process, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server(model_seed0, tmp_path_factory):
    """One server for the module: at most MAX_QUEUE requests waiting, bodies up to MAX_BODY."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    process, url = _start(model_seed0, log, "--max-queue", str(MAX_QUEUE), "--max-body", MAX_BODY)
    try:
        _wait_ready(url, process)
        yield url
    finally:
        stop_process(process)


def _npz_arrays(data: bytes) -> dict:
    with np.load(io.BytesIO(data), allow_pickle=False) as saved:
        return {key: saved[key] for key in saved.files}


def test_answers_equal_analyze_outputs_exactly(server, service_images, analyzed_service_images):
    for image in sorted(service_images.iterdir()):
        response = httpx.post(server + "/v1/analyze?outputs=map", content=image.read_bytes(), timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        answer = response.json()
        written = (analyzed_service_images / f"{image.name}.npz").read_bytes()
        assert base64.b64decode(answer["npz"]) == written, image.name  # map, conf, provenance: all
        saved = _npz_arrays(written)
        assert answer["score"] == float(saved["score"])
        assert [answer["height"], answer["width"]] == saved["imgsize"].tolist()
        assert (answer["backend"], answer["precision"]) == ("onnxruntime", "fp32")
        assert answer["times_ms"]["inference"] > 0


def test_multipart_upload_answers_like_a_raw_body(server, service_images, analyzed_service_images):
    image = sorted(service_images.iterdir())[0]
    response = httpx.post(server + "/v1/analyze", files={"image": (image.name, image.read_bytes())},
                          timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    assert "npz" not in response.json()
    assert response.json()["official"] is False  # a seeded checkpoint, said in the plain answer too (issue 41)
    saved = _npz_arrays((analyzed_service_images / f"{image.name}.npz").read_bytes())
    assert response.json()["score"] == float(saved["score"])
    wrong_field = httpx.post(server + "/v1/analyze", files={"file": ("x.png", image.read_bytes())}, timeout=TIMEOUT)
    assert wrong_field.status_code == 422 and '"image"' in wrong_field.json()["error"]


def _png_header_claiming(width: int, height: int) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def _tiny_png() -> bytes:
    import cv2

    return cv2.imencode(".png", np.zeros((10, 10, 3), np.uint8))[1].tobytes()


def test_bad_bodies_get_their_status_and_reason_and_the_server_stays_ready(server, service_images):
    jpeg = (service_images / "pristine1.jpg").read_bytes()
    cases = {"empty": (b"", 422, "empty"),
             "text": (b"hello, this is not an image", 422, "not an image"),
             "truncated JPEG": (jpeg[: len(jpeg) // 2], 422, "truncated"),
             "10x10": (_tiny_png(), 422, "smaller than the network's minimum"),
             "60000x60000 header": (_png_header_claiming(60000, 60000), 422, "more than the limit"),
             "over --max-body": (b"\0" * (3 << 20), 413, "over the limit")}
    for name, (body, status, reason) in cases.items():
        response = httpx.post(server + "/v1/analyze", content=body, timeout=TIMEOUT)
        assert response.status_code == status, (name, response.text)
        assert reason in response.json()["error"], (name, response.json())
        assert httpx.get(server + "/readyz", timeout=10).status_code == 200, name
    assert httpx.get(server + "/healthz", timeout=10).json() == {"status": "up"}


def _client(url: str, images: list, answers: list) -> None:
    with httpx.Client(timeout=TIMEOUT) as client:
        for image in images:
            started = time.perf_counter()
            response = client.post(url + "/v1/analyze", content=image.read_bytes())
            answers.append((image.name, response.status_code, response.json(), response.headers,
                            time.perf_counter() - started))


def test_concurrent_clients_are_each_answered_200_or_503_with_their_own_result(
        server, service_images, analyzed_service_images):
    images = sorted(service_images.iterdir())
    expected = {image.name: float(_npz_arrays((analyzed_service_images / f"{image.name}.npz").read_bytes())["score"])
                for image in images}
    answers = []
    clients = [threading.Thread(target=_client, args=(server, [images[index]] * 5, answers))
               for index in range(8)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(8 * 5 * TIMEOUT)
    assert not any(client.is_alive() for client in clients)
    assert len(answers) == 40  # none lost
    statuses = [status for _, status, _, _, _ in answers]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= MAX_QUEUE + 1 and 503 in statuses
    for name, status, body, headers, _ in answers:
        if status == 200:
            assert body["score"] == expected[name], name  # nobody got another client's answer
        else:
            assert int(headers["retry-after"]) >= 1 and "busy" in body["error"]
    latencies = sorted(seconds for _, status, _, _, seconds in answers if status == 200)
    print(f"8 clients x 5 requests: {statuses.count(200)} answered 200, {statuses.count(503)} 503; "
          f"latency p50 {np.percentile(latencies, 50):.2f} s, p99 {np.percentile(latencies, 99):.2f} s")


def test_metrics_parse_as_prometheus_text(server, service_images):
    from prometheus_client.parser import text_string_to_metric_families

    image = sorted(service_images.iterdir())[0].read_bytes()
    assert httpx.post(server + "/v1/analyze", content=image, timeout=TIMEOUT).status_code == 200
    response = httpx.get(server + "/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    assert {"trufor_images", "trufor_requests_rejected", "trufor_stage_seconds", "trufor_request_seconds",
            "trufor_queue_length", "trufor_engine_info"} <= set(families)
    info = families["trufor_engine_info"].samples[0]
    assert info.labels["backend"] == "onnxruntime" and info.labels["precision"] == "fp32"
    analysed = next(sample.value for sample in families["trufor_images"].samples
                    if sample.name == "trufor_images_total" and sample.labels["outcome"] == "analysed")
    inference = next(sample.value for sample in families["trufor_stage_seconds"].samples
                     if sample.name == "trufor_stage_seconds_count" and sample.labels["stage"] == "inference")
    assert analysed >= 1 and inference == analysed


def test_binding_beyond_loopback_needs_a_token(model_seed0):
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--model", str(model_seed0)],
                                env={"TRUFOR_TRT_TOKEN": ""})
    assert result.exit_code == 2 and "--token" in result.output


def test_token_is_checked_on_every_route_but_healthz_and_sigterm_finishes_the_request_in_hand(
        model_seed0, service_images, analyzed_service_images, tmp_path):
    """Also: with --out, what analyze writes, named by the image's SHA-256."""
    out = tmp_path / "out"
    process, url = _start(model_seed0, tmp_path / "serve.log", "--token", TOKEN, "--out", str(out))
    good = {"Authorization": f"Bearer {TOKEN}"}
    try:
        _wait_ready(url, process, headers=good)
        assert httpx.get(url + "/healthz", timeout=10).status_code == 200
        for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            for method, route in (("GET", "/readyz"), ("GET", "/metrics"), ("POST", "/v1/analyze")):
                response = httpx.request(method, url + route, headers=headers, content=b"x", timeout=10)
                assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        answers = []
        in_hand = threading.Thread(target=lambda: answers.append(httpx.post(
            url + "/v1/analyze", headers=good, content=(service_images / "tampered2.png").read_bytes(),
            timeout=TIMEOUT)))
        in_hand.start()
        time.sleep(0.5)  # the request is in hand when the signal comes
    finally:
        code = stop_process(process)
    in_hand.join(TIMEOUT)
    assert code == 0, (tmp_path / "serve.log").read_text()
    assert answers and answers[0].status_code == 200, answers
    image = (service_images / "tampered2.png").read_bytes()
    name = hashlib.sha256(image).hexdigest()
    for suffix in (".npz", ".heatmap.png", ".conf.png", ".overlay.png"):
        assert (out / f"{name}{suffix}").read_bytes() == \
            (analyzed_service_images / f"tampered2.png{suffix}").read_bytes(), suffix
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [record["status"] for record in records] == ["ok"] and (out / "results.csv").is_file()


def test_a_broken_runner_turns_every_route_away_and_stops_the_server(model_seed0, service_images):
    from starlette.testclient import TestClient

    from trufor_trt.batch.analyze import AnalyzeOptions
    from trufor_trt.engine.onnxruntime_runner import OnnxRuntimeRunner
    from trufor_trt.service.http_app import ServeSettings, create_app

    runner = BreaksAfter(OnnxRuntimeRunner(model_seed0), images=1)  # the warm-up's image
    runner.load()
    app = create_app(runner, ServeSettings(AnalyzeOptions(out_dir=None)))
    stops = []
    app.state.service.stop_server = lambda: stops.append("stop")  # what uvicorn's server is told
    image = (service_images / "tampered2.png").read_bytes()
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert client.get("/readyz").status_code == 200
        for _ in range(2):  # the request that met the failure, then one after it
            answer = client.post("/v1/analyze", content=image)
            assert answer.status_code == 503
            assert answer.json()["error"] == "the runner failed: GPU 0 fell off the bus"
        assert client.get("/healthz").status_code == 503 and client.get("/readyz").status_code == 503
    assert stops == ["stop"]
