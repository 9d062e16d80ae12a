"""serve: a real uvicorn server on loopback with two adapters on one base, over real HTTP.

The adapters are the session pipeline's export and a second one trained with other params
(lora.r 8, train.seed 7); both must give exactly what qlora-predict (stages.cli.predict) gives for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pandas as pd
import pytest
from helpers import LABELS, ROOT, Pipeline, error_message, run_stage

from stages.cli.predict import predict_texts
from stages.cli.serve.app import Limits, create_app, main
from stages.lib.adapter import load_adapter, load_adapters

LIMITS = Limits(max_batch_size=8, max_texts=16, max_text_chars=400, max_body_bytes=8192,
                batch_wait_ms=50)  # a long wait, so concurrent test requests surely meet
# Test texts of varied length; several run past tokenize.max_length (16), so truncation counts.
TEXTS = pd.read_csv(ROOT / "data" / "ag_news" / "test.csv")["text"].str.slice(0, 300).head(12).tolist()



@contextlib.contextmanager
def serving(server, sock: socket.socket) -> Iterator[int]:
    """Run a uvicorn server on `sock` in a thread; yield its port once it has started."""
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)

@pytest.fixture(scope="module")
def second_adapter(pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory,
                   write_params) -> Path:
    """The pipeline's tokenized data trained again with another rank and seed."""
    run = Pipeline(tmp_path_factory.mktemp("second"))
    for done in (run.tokenized, run.base):  # the first run's inputs to train
        done.parent.mkdir(parents=True, exist_ok=True)
        done.symlink_to(pipeline.root / done.relative_to(run.root), target_is_directory=True)
    write_params(run.params, {"lora.r": 8, "train.seed": 7})
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run.root)  # DVCLive looks for a git/DVC repo from the working directory
        assert run_stage("train", run.argv("train")) == 0
    return run.adapter


@pytest.fixture(scope="module")
def adapters(pipeline: Pipeline, second_adapter: Path) -> dict[str, Path]:
    return {"news": pipeline.export, "news-r8": second_adapter}


@pytest.fixture(scope="module")
def expected(adapters: dict[str, Path], pipeline: Pipeline) -> dict[str, pd.DataFrame]:
    """What the predict CLI's function gives for TEXTS, per adapter, each loaded on its own."""
    return {name: predict_texts(load_adapter(d, pipeline.base), TEXTS, batch_size=64)
            for name, d in adapters.items()}


@pytest.fixture(scope="module")
def url(adapters: dict[str, Path]) -> Iterator[str]:
    """The server, on a loopback socket bound before it starts (no free-port race)."""
    import uvicorn

    # no --base: the base is found where the adapters' pipeline.json says (the tiny model dir)
    app = create_app(load_adapters(adapters), LIMITS)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    with serving(server, sock) as port:
        yield f"http://127.0.0.1:{port}"
    sock.close()


def classify(url: str, adapter: str, texts: list[str]) -> httpx.Response:
    return httpx.post(f"{url}/v1/classify", json={"adapter": adapter, "texts": texts}, timeout=30)


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text output (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m and m.group(1) == want:
            return float(m.group(2))
    return 0.0


def check_results(results: list[dict], want: pd.DataFrame) -> None:
    assert [r["label"] for r in results] == want["label"].tolist()
    assert [r["label_id"] for r in results] == want["label_id"].tolist()
    assert max(abs(r["score"] - s) for r, s in zip(results, want["score"])) <= 1e-5


def test_healthz_lists_adapters(url: str) -> None:
    r = httpx.get(f"{url}/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "device": "cpu", "adapters": {"news": LABELS, "news-r8": LABELS}}


@pytest.mark.parametrize("adapter", ["news", "news-r8"])
def test_classify_matches_predict_cli(url: str, adapter: str, expected: dict[str, pd.DataFrame]) -> None:
    r = classify(url, adapter, TEXTS)
    assert r.status_code == 200, r.text
    assert r.json()["adapter"] == adapter
    check_results(r.json()["results"], expected[adapter])


def test_adapters_differ(url: str, expected: dict[str, pd.DataFrame]) -> None:
    """Each adapter keeps its own LoRA weights and head on the shared base."""
    a, b = (classify(url, name, TEXTS).json()["results"] for name in ("news", "news-r8"))
    assert max(abs(x["score"] - y["score"]) for x, y in zip(a, b)) > 1e-3
    assert not expected["news"]["score"].equals(expected["news-r8"]["score"])


def test_concurrent_requests_are_batched(url: str, expected: dict[str, pd.DataFrame]) -> None:
    """Concurrent requests, both adapters interleaved, share forward passes and each still gets
    its own texts' results."""
    jobs = [("news" if i % 2 else "news-r8", [i % 12, (i + 5) % 12]) for i in range(16)]

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            return await asyncio.gather(*(client.post("/v1/classify", json={
                "adapter": name, "texts": [TEXTS[i] for i in rows]}) for name, rows in jobs))

    before = httpx.get(f"{url}/metrics").text
    responses = asyncio.run(send_all())
    after = httpx.get(f"{url}/metrics").text
    for (name, rows), r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        check_results(r.json()["results"], expected[name].iloc[rows])
    for name in ("news", "news-r8"):
        delta = {m: metric(after, m, adapter=name) - metric(before, m, adapter=name)
                 for m in ("qlora_serve_texts_total", "qlora_serve_batches_total",
                           "qlora_serve_batch_requests_count", "qlora_serve_batch_requests_sum")}
        assert delta["qlora_serve_texts_total"] == 16
        assert delta["qlora_serve_batch_requests_sum"] == 8  # requests served
        assert delta["qlora_serve_batch_requests_count"] < 8  # in fewer model calls
        assert delta["qlora_serve_batches_total"] < 8
        assert metric(after, "qlora_serve_requests_total", adapter=name, status="200") >= 8


def chunked(body: bytes) -> Iterator[bytes]:
    """A body sent without Content-Length (chunked), to reach the streaming size guard."""
    for start in range(0, len(body), 1000):
        yield body[start:start + 1000]


def too_big() -> bytes:
    return json.dumps({"adapter": "news", "texts": ["word " * 60] * 40}).encode()


@pytest.mark.parametrize("content, status, message", [
    ('{"adapter": "nope", "texts": ["a"]}', 404, "unknown adapter 'nope' (loaded: news, news-r8)"),
    ('{"adapter": "news", "texts": []}', 422, "texts: empty list (send 1 to 16 texts)"),
    ('{"adapter": "news", "texts": ["a", 5]}', 422, "texts[1]: Input should be a valid string"),
    ('{"adapter": "news", "texts": ["a", " "]}', 422, "texts[1]: empty text"),
    ('{"adapter": "news", "texts": "a"}', 422, "texts: Input should be a valid array"),
    ('{"adapter": "news", "text": ["a"]}', 422, "texts: Field required (and 1 more)"),
    (json.dumps({"adapter": "news", "texts": ["a"] * 17}), 422, "texts: 17 texts; at most 16 per request"),
    (json.dumps({"adapter": "news", "texts": ["a", "b" * 401]}), 422, "texts[1]: 401 characters; at most 400"),
    ('{"adapter": "news", "texts": ["a"', 422, "request body: Invalid JSON: EOF while parsing a list at line 1 column 33"),
    ("", 422, "request body: Invalid JSON: EOF while parsing a value at line 1 column 0"),
    (too_big(), 413, f"request body is {len(too_big())} bytes; at most 8192"),
    (chunked(too_big()), 413, "request body exceeds 8192 bytes"),
], ids=["unknown-adapter", "no-texts", "non-string", "empty-text", "texts-not-list", "typo-key",
        "too-many-texts", "text-too-long", "malformed-json", "empty-body", "body-too-large",
        "chunked-body-too-large"])
def test_rejects_bad_requests(url: str, content, status: int, message: str) -> None:
    def count() -> float:  # requests answered with `status`, over all adapter labels
        return sum(float(n) for n in re.findall(rf'^qlora_serve_requests_total{{.*status="{status}"}} (\S+)$',
                                                httpx.get(f"{url}/metrics").text, re.M))

    before = count()
    r = httpx.post(f"{url}/v1/classify", content=content, timeout=30,
                   headers={"content-type": "application/json"})
    assert (r.status_code, r.json()) == (status, {"detail": message})
    assert count() == before + 1


def test_metrics_format(url: str) -> None:
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = re.findall(r"^# TYPE (\S+) (\S+)$", r.text, re.M)
    assert families == [("qlora_serve_requests_total", "counter"),
                        ("qlora_serve_client_disconnects_total", "counter"), ("qlora_serve_texts_total", "counter"),
                        ("qlora_serve_batches_total", "counter"),
                        ("qlora_serve_batch_size_texts", "histogram"),
                        ("qlora_serve_batch_requests", "histogram"),
                        ("qlora_serve_request_duration_seconds", "histogram")]
    # every sample line is `name{labels} number` (or `name number`)
    for line in r.text.splitlines():
        assert line.startswith("#") or re.fullmatch(r'[a-z_]+(\{([a-z_]+="[^"]*",?)+\})? [0-9.e+-]+', line), line


def test_cli_errors(tmp_path: Path, pipeline: Pipeline, capsys: pytest.CaptureFixture[str]) -> None:
    """Bad --adapter arguments and incompatible adapters fail in one line, before any model loads."""
    def incompatible(name: str, **changes) -> Path:
        copy = tmp_path / name
        shutil.copytree(pipeline.export, copy)
        meta = json.loads((copy / "pipeline.json").read_text())
        for key, value in changes.items():
            section, _, field = key.partition(".")
            if field:
                meta[section][field] = value
            else:
                meta[section] = value
        (copy / "pipeline.json").write_text(json.dumps(meta))
        return copy

    fp4 = incompatible("fp4", **{"quant.type": "fp4"})
    three = incompatible("three", labels=["a", "b", "c"])
    flipped = incompatible("flipped")
    with (flipped / "adapter_model.safetensors").open("ab") as f:
        f.write(b"\0")
    cases = [
        (["--adapter", "news"], "--adapter news: expected NAME=DIR with NAME made of letters, "
                                "digits, _ and - (e.g. news=models/export)"),
        (["--adapter", f"a.b={pipeline.export}"], f"--adapter a.b={pipeline.export}: expected NAME=DIR "
                                                  "with NAME made of letters, digits, _ and - (e.g. news=models/export)"),
        (["--adapter", f"a={pipeline.export}", "--adapter", f"a={pipeline.adapter}"],
         f"--adapter a={pipeline.adapter}: adapter name 'a' given twice"),
        (["--adapter", f"a={tmp_path / 'missing'}"], f"--adapter a={tmp_path / 'missing'}: adapter directory not found"),
        (["--adapter", f"a={pipeline.base}"], f"--adapter a={pipeline.base}: no adapter_model.safetensors"),
        (["--adapter", f"a={pipeline.export}", "--adapter", f"b={fp4}", "--adapter", f"c={three}"],
         f"--adapter b={fp4}: differs from adapter a: quant.type fp4 vs nf4 (adapters served together "
         "share one base model, quantization, modules_to_save and number of labels)"),
        (["--adapter", f"a={pipeline.export}", "--adapter", f"c={three}"],
         f"--adapter c={three}: differs from adapter a: 3 labels vs 4 (adapters served together "
         "share one base model, quantization, modules_to_save and number of labels)"),
        (["--adapter", f"a={pipeline.export}", "--adapter", f"b={flipped}"],
         f"{flipped / 'adapter_model.safetensors'}: corrupt or modified (sha256 differs from "
         f"{flipped / 'pipeline.json'}); rerun the stage that wrote it (dvc repro --force <stage>)"),
        (["--adapter", f"a={pipeline.export}", "--base", str(tmp_path / "nobase")],
         f"{tmp_path / 'nobase'}: base model not found (expected a directory; run `dvc repro`)"),
        (["--adapter", f"a={pipeline.export}", "--max-batch-size", "0"], "--max-batch-size: expected int >= 1, got 0"),
        (["--adapter", f"a={pipeline.export}", "--max-connections", "0"], "--max-connections: expected int >= 1, got 0"),
        (["--adapter", f"a={pipeline.export}", "--body-timeout-s", "0"], "--body-timeout-s: expected a number > 0, got 0.0"),
    ]
    for argv, message in cases:
        assert main(argv) == 1
        assert error_message(capsys.readouterr().err) == message


# --- slow, aborted and too many clients -------------------------------------------------------

STRICT = Limits(max_batch_size=8, max_texts=16, max_text_chars=400, max_body_bytes=8192,
                batch_wait_ms=5, body_timeout_s=1.0, max_connections=3)


@pytest.fixture
def strict_server(adapters: dict[str, Path], caplog: pytest.LogCaptureFixture) -> Iterator[tuple[str, int]]:
    """A server with a 1 s body timeout and room for 3 connections; its logs go to caplog."""
    import uvicorn

    from stages.cli.serve.app import server_config

    app = create_app(load_adapters(adapters), STRICT)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(server_config(app, STRICT, "127.0.0.1", 0, log_level="info"))
    errors = logging.getLogger("uvicorn.error")  # where uvicorn logs an application's traceback
    errors.addHandler(caplog.handler)  # after uvicorn configured its logging
    with serving(server, sock) as port:
        yield "127.0.0.1", port
    sock.close()
    errors.removeHandler(caplog.handler)


def partial_request(address: tuple[str, int], body_bytes: bytes, length: int = 100) -> socket.socket:
    """A classify request whose headers promise `length` bytes of body, of which `body_bytes` sent."""
    conn = socket.create_connection(address, timeout=10)
    conn.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % length + body_bytes)
    return conn


def metric_lines(address: tuple[str, int]) -> list[str]:
    text = httpx.get(f"http://{address[0]}:{address[1]}/metrics", timeout=10).text
    return [line for line in text.splitlines() if not line.startswith("#")]


def metric_values(address: tuple[str, int]) -> dict[str, float]:
    """Every sample of /metrics by its series (`name{labels}`), as a number."""
    return {series: float(value) for series, value in (line.rsplit(" ", 1) for line in metric_lines(address))}


def test_slow_body_gets_408_and_aborted_body_no_500(strict_server: tuple[str, int],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    slow = partial_request(strict_server, b"{")
    start = time.monotonic()
    answer = b""
    try:
        for _ in range(20):  # one byte every 0.3 s: never done within the 1 s timeout
            try:
                slow.sendall(b" ")
            except OSError:  # the server closed the connection after answering
                break
            slow.settimeout(0.3)
            try:
                answer += slow.recv(4096)
            except TimeoutError:
                continue
            if answer:
                break
        slow.settimeout(5)
        while not answer.endswith(b"}"):  # the rest of the answer, until the server closes
            more = slow.recv(4096)
            if not more:
                break
            answer += more
    finally:
        slow.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert answer.endswith(b'{"detail":"request body not received within 1 s"}'), answer
    assert time.monotonic() - start < 5

    deadline = time.monotonic() + 20
    for n in range(1, 4):  # clients that go away mid-body, one at a time (3 at once would hit max_connections)
        partial_request(strict_server, b'{"adapter": "ne').close()
        while metric_values(strict_server).get("qlora_serve_client_disconnects_total") != n:
            assert time.monotonic() < deadline, metric_lines(strict_server)
            time.sleep(0.05)
    lines = metric_lines(strict_server)
    assert metric_values(strict_server)['qlora_serve_requests_total{adapter="",status="408"}'] == 1
    assert not any('status="500"' in line for line in lines), lines
    tracebacks = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert tracebacks == [], [r.getMessage() for r in tracebacks]


def test_connections_beyond_the_bound_get_503(strict_server: tuple[str, int]) -> None:
    """max_connections idle connections are open: a request on one more gets 503 at once."""
    held = [socket.create_connection(strict_server, timeout=10) for _ in range(STRICT.max_connections)]
    try:
        time.sleep(0.5)  # let the server accept them all
        response = httpx.post(f"http://{strict_server[0]}:{strict_server[1]}/v1/classify",
                              json={"adapter": "news", "texts": ["hello"]}, timeout=10)
        assert response.status_code == 503
    finally:
        for conn in held:
            conn.close()
    deadline = time.monotonic() + 10  # once they are gone (timed out or closed), service resumes
    while True:
        response = httpx.post(f"http://{strict_server[0]}:{strict_server[1]}/v1/classify",
                              json={"adapter": "news", "texts": ["hello"]}, timeout=10)
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert response.status_code == 200
