"""serve: classify text over HTTP with one 4-bit base model and several LoRA adapters.

    qlora-serve --adapter news=models/export --adapter news-r8=other/export \
        [--base models/base] --host 127.0.0.1 --port 8000

POST /v1/classify  {"adapter": "news", "texts": ["...", ...]}
                   -> {"adapter": "news", "results": [{"label", "label_id", "score"}, ...]}
GET  /healthz      status, device and the loaded adapters with their labels
GET  /metrics      Prometheus text format: requests, texts, batches, batch sizes, latency

The base model is loaded once, quantized as the adapters' pipeline.json says, and every adapter
is attached to it with PEFT under its NAME, each with its own classification head
(modules_to_save keeps one copy per adapter). So all adapters must share the base weights, the
quantization, modules_to_save and the number of labels; label names, max_length and LoRA rank
may differ. Requests for one adapter that arrive within --batch-wait-ms of each other are merged
and run in forward passes of up to --max-batch-size texts, tokenized and padded exactly as
qlora-predict does, so the scores are the same. The batching is batcher.py's, the metrics
metrics.py's; this module holds the HTTP API, its request checks and the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import prometheus_client
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError
from starlette.requests import ClientDisconnect

from stages.cli.serve.batcher import Batcher
from stages.cli.serve.metrics import Metrics
from stages.lib.adapter import Classifier, load_adapters
from stages.lib.io import require_dir, run_main
from stages.lib.params import UserError

log = logging.getLogger("qlora")

# PEFT keeps adapters in torch ModuleDicts, whose keys cannot contain dots.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class Limits:
    """Per-request limits and batching settings of one server."""

    max_batch_size: int = 64  # texts per forward pass
    max_texts: int = 256  # texts per request
    max_text_chars: int = 10_000  # characters per text (tokenization truncates to max_length)
    max_body_bytes: int = 4 << 20  # bytes per request body
    batch_wait_ms: float = 5.0  # how long the first request of a batch waits for others
    body_timeout_s: float = 10.0  # a body not received within this gets 408 (slow clients)
    max_connections: int = 1000  # open connections and requests at once; beyond: 503 (uvicorn)

    def check(self) -> None:
        for name in ("max_batch_size", "max_texts", "max_text_chars", "max_body_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')}: expected int >= 1, got {getattr(self, name)}")
        if self.batch_wait_ms < 0:
            raise UserError(f"--batch-wait-ms: expected a number >= 0, got {self.batch_wait_ms}")
        if not self.body_timeout_s > 0:
            raise UserError(f"--body-timeout-s: expected a number > 0, got {self.body_timeout_s}")


# --- the command line ---------------------------------------------------------------------

def parse_adapter_specs(specs: Sequence[str]) -> dict[str, Path]:
    """`NAME=DIR` arguments as {name: directory}, in the order given."""
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or not directory or not ADAPTER_NAME.fullmatch(name):
            raise UserError(f"--adapter {spec}: expected NAME=DIR with NAME made of letters, "
                            "digits, _ and - (e.g. news=models/export)")
        if name in adapters:
            raise UserError(f"--adapter {spec}: adapter name {name!r} given twice")
        adapters[name] = Path(directory)
    return adapters


# --- API models and request checks --------------------------------------------------------

class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo such as "text" fails instead of being ignored
    adapter: StrictStr
    texts: list[StrictStr]


class Prediction(BaseModel):
    label: str
    label_id: int
    score: float  # probability of `label`, rounded to 6 decimals as predict prints it


class ClassifyResponse(BaseModel):
    adapter: str
    results: list[Prediction]


def request_error(error: ValidationError) -> str:
    """One line for a request that does not parse: where (`texts[2]`) and what."""
    first = error.errors(include_url=False)[0]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{where or 'request body'}: {first['msg']}{more}"


def text_problem(texts: list[str], limits: Limits) -> str | None:
    if not texts:
        return f"texts: empty list (send 1 to {limits.max_texts} texts)"
    if len(texts) > limits.max_texts:
        return f"texts: {len(texts)} texts; at most {limits.max_texts} per request"
    for i, text in enumerate(texts):
        if not text.strip():
            return f"texts[{i}]: empty text"
        if len(text) > limits.max_text_chars:
            return f"texts[{i}]: {len(text)} characters; at most {limits.max_text_chars}"
    return None


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, refused with 413 once past `limit` bytes: up front by Content-Length,
    and while streaming for chunked bodies that announce no length; with 408 when it has not all
    arrived within `timeout_s` (a client trickling bytes would hold its connection forever).
    A client that goes away meanwhile raises starlette's ClientDisconnect."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body is {declared} bytes; at most {limit}")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise HTTPException(413, f"request body exceeds {limit} bytes")
    except TimeoutError:
        raise HTTPException(408, f"request body not received within {timeout_s:g} s") from None
    return bytes(body)


# --- the app ------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type


def create_app(classifiers: Mapping[str, Classifier], limits: Limits = Limits()) -> FastAPI:
    """The HTTP API over loaded adapters (from `load_adapters`)."""
    metrics = Metrics()
    batcher = Batcher(classifiers, limits.max_batch_size, limits.batch_wait_ms, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.worker = asyncio.create_task(batcher.run(), name="batcher")
        yield
        app.state.worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await app.state.worker
        batcher.shutdown()

    app = FastAPI(title="qlora-serve", lifespan=lifespan)
    app.state.worker = None
    # The body is read by hand (to cap its size while streaming); the schema still goes in OpenAPI.
    request_schema = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": ClassifyRequest.model_json_schema()}}}}

    @app.post("/v1/classify", response_model=ClassifyResponse, openapi_extra=request_schema)
    async def classify(request: Request) -> ClassifyResponse:
        start, adapter = time.perf_counter(), ""
        try:
            try:
                body = ClassifyRequest.model_validate_json(
                    await read_body(request, limits.max_body_bytes, limits.body_timeout_s))
            except ValidationError as e:
                raise HTTPException(422, request_error(e)) from None
            if body.adapter not in classifiers:
                raise HTTPException(404, f"unknown adapter {body.adapter!r} (loaded: {', '.join(classifiers)})")
            adapter = body.adapter
            problem = text_problem(body.texts, limits)
            if problem:
                raise HTTPException(422, problem)
            results = await batcher.classify(adapter, body.texts)
        except HTTPException as e:
            metrics.observe_request(adapter, e.status_code)
            raise
        except ClientDisconnect:  # nobody to answer: no traceback, no 500
            metrics.client_disconnects.inc()
            return Response(status_code=499)  # nginx's "client closed request"; never sent
        except Exception:
            metrics.observe_request(adapter, 500)
            raise
        metrics.observe_request(adapter, 200, time.perf_counter() - start)
        labels = classifiers[adapter].labels
        # the probability rounded to 6 decimals, as qlora-predict writes it
        return ClassifyResponse(adapter=adapter, results=[Prediction(label=labels[i], label_id=i, score=round(p, 6))
                                                          for i, p in results])

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        alive = app.state.worker is not None and not app.state.worker.done()
        device = next(iter(classifiers.values())).device
        return JSONResponse(status_code=200 if alive else 503, content={
            "status": "ok" if alive else "batch worker stopped", "device": device_name(device),
            "adapters": {name: c.labels for name, c in classifiers.items()}})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=prometheus_client.CONTENT_TYPE_LATEST)

    return app


def server_config(app: FastAPI, limits: Limits, host: str, port: int, **kwargs: Any):
    """The uvicorn configuration of a server: the connection bound from `limits`."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, limit_concurrency=limits.max_connections,
                          **{"log_level": "info", **kwargs})


def main(argv: list[str] | None = None) -> int:
    defaults = Limits()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", action="append", required=True, metavar="NAME=DIR",
                        help="adapter directory (exported bundle or trained adapter) served as NAME; repeat")
    parser.add_argument("--base", help="base model directory (default: the one the adapters' pipeline.json names)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size, help="texts per forward pass")
    parser.add_argument("--max-texts", type=int, default=defaults.max_texts, help="texts per request")
    parser.add_argument("--max-text-chars", type=int, default=defaults.max_text_chars, help="characters per text")
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes, help="bytes per request body")
    parser.add_argument("--batch-wait-ms", type=float, default=defaults.batch_wait_ms,
                        help="how long a request waits for others to share its forward pass")
    parser.add_argument("--body-timeout-s", type=float, default=defaults.body_timeout_s,
                        help="seconds a request body may take to arrive (then 408)")
    parser.add_argument("--max-connections", type=int, default=defaults.max_connections,
                        help="connections and requests open at once (beyond: 503)")
    args = parser.parse_args(argv)

    return run_main(functools.partial(serve, args))


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    limits = Limits(args.max_batch_size, args.max_texts, args.max_text_chars, args.max_body_bytes,
                    args.batch_wait_ms, args.body_timeout_s, args.max_connections)
    limits.check()
    adapters = parse_adapter_specs(args.adapter)
    base_dir = require_dir(args.base, "base model") if args.base else None
    classifiers = load_adapters(adapters, base_dir)
    log.info("serve: %d adapter(s) on %s, http://%s:%d", len(classifiers),
             device_name(next(iter(classifiers.values())).device), args.host, args.port)
    uvicorn.Server(server_config(create_app(classifiers, limits), limits, args.host, args.port)).run()


if __name__ == "__main__":
    sys.exit(main())
