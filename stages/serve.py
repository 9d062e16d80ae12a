"""serve: classify text over HTTP with one 4-bit base model and several LoRA adapters.

    python -m stages.serve --adapter news=models/export --adapter news-r8=other/export \
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
`python -m stages.predict` does, so the scores are the same.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.requests import ClientDisconnect
from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError

from stages.lib.io import require_dir, run_main
from stages.lib.adapter import ADAPTER_META_FILE, ADAPTER_WEIGHTS, AdapterMeta
from stages.lib.model import (Classifier, compute_setup, load_base, load_tokenizer,
                              read_adapter_meta, resolve_adapter_base)
from stages.lib.params import UserError

log = logging.getLogger("qlora")

# PEFT keeps adapters in torch ModuleDicts, whose keys cannot contain dots.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


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


# --- loading: one base, many adapters ------------------------------------------------------

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


def differences(meta: AdapterMeta, ref: AdapterMeta) -> list[str]:
    """What keeps two adapters from sharing one loaded base model. The base is compared by its
    files' hashes, since one name (a hub id, a directory) can hold other weights at another time."""
    found = []
    if meta.base.sha256 != ref.base.sha256:
        mine, theirs = meta.base.name_or_path, ref.base.name_or_path
        found.append(f"base model {mine} vs {theirs}" if mine != theirs
                     else f"base model {mine} with other weights (sha256)")
    for key in ("type", "double_quant", "compute_dtype"):
        if getattr(meta.quant, key) != getattr(ref.quant, key):
            found.append(f"quant.{key} {getattr(meta.quant, key)} vs {getattr(ref.quant, key)}")
    if len(meta.labels) != len(ref.labels):
        found.append(f"{len(meta.labels)} labels vs {len(ref.labels)}")
    if sorted(meta.modules_to_save) != sorted(ref.modules_to_save):  # decides what stays unquantized
        found.append(f"modules_to_save {meta.modules_to_save} vs {ref.modules_to_save}")
    return found


def check_compatible(adapters: Mapping[str, Path], metas: Mapping[str, AdapterMeta]) -> None:
    first = next(iter(metas))
    for name, meta in metas.items():
        found = differences(meta, metas[first])
        if found:
            raise UserError(f"--adapter {name}={adapters[name]}: differs from adapter {first}: "
                            f"{'; '.join(found)} (adapters served together share one base "
                            "model, quantization, modules_to_save and number of labels)")


def load_adapters(adapters: Mapping[str, Path], base_dir: Path | None = None) -> dict[str, Classifier]:
    """Load the base once and attach every adapter to it; one Classifier per adapter, all
    sharing one PeftModel (switch with `model.set_adapter(name)` before a forward pass)."""
    from peft import PeftModel
    from safetensors import SafetensorError

    metas = {name: read_adapter_meta(d, f"--adapter {name}={d}") for name, d in adapters.items()}
    for name, meta in metas.items():
        if meta.task_type != "classification":
            raise UserError(f"--adapter {name}={adapters[name]}: a {meta.task_type} adapter; the "
                            "server labels text with classification adapters only")
    check_compatible(adapters, metas)  # before the slow model load
    first = next(iter(adapters))
    meta = metas[first]
    if base_dir is None:
        base_dir = resolve_adapter_base(meta.base, adapters[first] / ADAPTER_META_FILE)
    device, dtype = compute_setup(meta.quant.compute_dtype)
    model = load_base(Path(base_dir), meta.labels, meta.quant_dict(), meta.modules_to_save, device, dtype)
    for name, directory in adapters.items():
        try:
            if isinstance(model, PeftModel):
                model.load_adapter(directory, adapter_name=name, is_trainable=False)
            else:
                model = PeftModel.from_pretrained(model, directory, adapter_name=name, is_trainable=False)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise UserError(f"--adapter {name}={directory}: {ADAPTER_WEIGHTS} is corrupt or "
                            f"does not match the base model ({str(e).splitlines()[0][:200]})") from None
        log.info("serve: adapter %s <- %s (r=%s, labels %s)", name, directory,
                 metas[name].lora.r, ", ".join(metas[name].labels))
    model.eval()
    return {name: Classifier(model, load_tokenizer(d), metas[name], device, dtype)
            for name, d in adapters.items()}


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


def top_labels(classifier: Classifier, logits: np.ndarray) -> list[Prediction]:
    """The most likely label of each row, computed as stages.predict.predict_texts does."""
    score, label_id = torch.from_numpy(logits).softmax(-1).max(-1)
    return [Prediction(label=classifier.labels[i], label_id=i, score=round(s, 6))
            for i, s in zip(label_id.tolist(), score.tolist())]


def describe(error: ValidationError) -> str:
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


# --- metrics ------------------------------------------------------------------------------

class Histogram:
    """Cumulative bucket counts, sum and count, as a Prometheus histogram reports them."""

    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(bounds)
        self.counts = [0] * len(self.bounds)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str, labels: str) -> list[str]:
        buckets = [*zip(self.bounds, self.counts), ("+Inf", self.count)]
        return ([f'{name}_bucket{{{labels},le="{bound}"}} {n}' for bound, n in buckets]
                + [f"{name}_sum{{{labels}}} {self.sum}", f"{name}_count{{{labels}}} {self.count}"])


class Metrics:
    """Counters and histograms in the Prometheus text format. Only the event loop thread
    updates them, so they need no lock."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.client_disconnects = 0  # clients gone before their answer: not requests, not errors
        self.texts: Counter[str] = Counter()
        self.batches: Counter[str] = Counter()
        self.batch_texts = defaultdict(lambda: Histogram(SIZE_BUCKETS))
        self.batch_requests = defaultdict(lambda: Histogram(SIZE_BUCKETS))
        self.latency = defaultdict(lambda: Histogram(LATENCY_BUCKETS_S))

    def observe_batch(self, adapter: str, requests: int, texts: int, max_batch_size: int) -> None:
        """One model call: `texts` from `requests` requests, in forward passes of at most
        max_batch_size texts (as predict_logits cuts them)."""
        self.texts[adapter] += texts
        self.batch_requests[adapter].observe(requests)
        for start in range(0, texts, max_batch_size):
            self.batches[adapter] += 1
            self.batch_texts[adapter].observe(min(max_batch_size, texts - start))

    def render(self) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help_: str, rows: list[str]) -> None:
            out.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *rows])

        family("qlora_serve_requests_total", "counter", "Classify requests by adapter and HTTP status "
               "(adapter is empty when the request named no loaded adapter).",
               [f'qlora_serve_requests_total{{adapter="{a}",status="{s}"}} {n}'
                for (a, s), n in sorted(self.requests.items())])
        family("qlora_serve_client_disconnects_total", "counter", "Classify requests whose client "
               "disconnected before its body was read (no answer sent; not counted in requests).",
               [f"qlora_serve_client_disconnects_total {self.client_disconnects}"])
        family("qlora_serve_texts_total", "counter", "Texts classified.",
               [f'qlora_serve_texts_total{{adapter="{a}"}} {n}' for a, n in sorted(self.texts.items())])
        family("qlora_serve_batches_total", "counter", "Forward passes run.",
               [f'qlora_serve_batches_total{{adapter="{a}"}} {n}' for a, n in sorted(self.batches.items())])
        for name, kind, help_, hists in (
                ("qlora_serve_batch_size_texts", "histogram", "Texts per forward pass.", self.batch_texts),
                ("qlora_serve_batch_requests", "histogram", "Requests merged into one model call.",
                 self.batch_requests),
                ("qlora_serve_request_duration_seconds", "histogram",
                 "Latency of successful classify requests, body read to response.", self.latency)):
            family(name, kind, help_, [line for a, h in sorted(hists.items())
                                       for line in h.lines(name, f'adapter="{a}"')])
        return "\n".join(out) + "\n"


# --- batching -----------------------------------------------------------------------------

@dataclass
class Job:
    adapter: str
    ids: list[list[int]]  # token ids of the request's texts
    future: asyncio.Future
    arrived: float  # event loop time it was queued


class Batcher:
    """Merges queued requests per adapter and runs them on one model thread.

    PEFT switches adapters by setting state on the shared model, and torch modules are not
    thread-safe, so exactly one forward pass runs at a time, on a dedicated thread that leaves
    the event loop free to accept and validate requests meanwhile. Tokenizing has a thread of its
    own: the next requests are tokenized while a forward pass runs (on a GPU, tokenizing 64 texts
    took a third as long as the forward pass), and one thread because a fast tokenizer fails
    when called from two threads at once ("Already borrowed").
    """

    def __init__(self, classifiers: Mapping[str, Classifier], limits: Limits, metrics: Metrics):
        self.classifiers, self.limits, self.metrics = classifiers, limits, metrics
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self.active: str | None = None  # adapter set on the model; touched on the model thread only

    async def classify(self, adapter: str, texts: list[str]) -> list[Prediction]:
        loop = asyncio.get_running_loop()
        # Per text, so the ids are those the predict CLI gets, however requests are merged.
        ids = await loop.run_in_executor(self.tokenizer_thread, self.classifiers[adapter].encode, texts)
        job = Job(adapter, ids, loop.create_future(), loop.time())
        self.queue.put_nowait(job)
        return await job.future

    async def run(self) -> None:
        """The one worker: take the oldest queued job, add what arrives within the wait after it
        (until some adapter has a full batch), then one model call per adapter, oldest first."""
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            texts = Counter({jobs[0].adapter: len(jobs[0].ids)})
            # Measured from the job's arrival: after a long forward pass, the requests that queued
            # meanwhile go at once instead of waiting again.
            deadline = jobs[0].arrived + self.limits.batch_wait_ms / 1000
            while max(texts.values()) < self.limits.max_batch_size:
                if self.queue.empty():
                    try:
                        job = await asyncio.wait_for(self.queue.get(), deadline - loop.time())
                    except asyncio.TimeoutError:
                        break
                else:
                    job = self.queue.get_nowait()
                jobs.append(job)
                texts[job.adapter] += len(job.ids)
            for adapter in texts:  # insertion order: the adapter of the oldest job first
                # a request whose client went away has a cancelled future: skip its texts
                group = [j for j in jobs if j.adapter == adapter and not j.future.done()]
                if group:
                    await self.run_group(adapter, group)

    async def run_group(self, adapter: str, jobs: list[Job]) -> None:
        ids = [seq for j in jobs for seq in j.ids]
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self.model_thread, self.predict, adapter, ids)
        except Exception as e:  # a bug: fail these requests (500), keep serving the rest
            log.exception("serve: forward pass failed for adapter %s", adapter)
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(e)
            return
        self.metrics.observe_batch(adapter, len(jobs), len(ids), self.limits.max_batch_size)
        start = 0
        for j in jobs:
            if not j.future.done():
                j.future.set_result(results[start:start + len(j.ids)])
            start += len(j.ids)

    def predict(self, adapter: str, ids: list[list[int]]) -> list[Prediction]:
        """On the model thread: the predict CLI's path (longest-first batches, each padded to
        its longest text)."""
        classifier = self.classifiers[adapter]
        if self.active != adapter:
            classifier.model.set_adapter(adapter, inference_mode=True)  # also selects its head
            self.active = adapter
        return top_labels(classifier, classifier.logits(ids, self.limits.max_batch_size, desc="serve"))

    def shutdown(self) -> None:
        self.tokenizer_thread.shutdown(wait=True)
        self.model_thread.shutdown(wait=True)


# --- the app ------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type


def create_app(classifiers: Mapping[str, Classifier], limits: Limits = Limits()) -> FastAPI:
    """The HTTP API over loaded adapters (from `load_adapters`)."""
    metrics = Metrics()
    batcher = Batcher(classifiers, limits, metrics)
    worker: asyncio.Task | None = None

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        nonlocal worker
        worker = asyncio.create_task(batcher.run(), name="batcher")
        yield
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
        batcher.shutdown()

    app = FastAPI(title="qlora-serve", lifespan=lifespan)
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
                raise HTTPException(422, describe(e)) from None
            if body.adapter not in classifiers:
                raise HTTPException(404, f"unknown adapter {body.adapter!r} (loaded: {', '.join(classifiers)})")
            adapter = body.adapter
            problem = text_problem(body.texts, limits)
            if problem:
                raise HTTPException(422, problem)
            results = await batcher.classify(adapter, body.texts)
        except HTTPException as e:
            metrics.requests[adapter, e.status_code] += 1
            raise
        except ClientDisconnect:  # nobody to answer: no traceback, no 500
            metrics.client_disconnects += 1
            return Response(status_code=499)  # nginx's "client closed request"; never sent
        except Exception:
            metrics.requests[adapter, 500] += 1
            raise
        metrics.requests[adapter, 200] += 1
        metrics.latency[adapter].observe(time.perf_counter() - start)
        return ClassifyResponse(adapter=adapter, results=results)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        alive = worker is not None and not worker.done()
        device = next(iter(classifiers.values())).device
        return JSONResponse(status_code=200 if alive else 503, content={
            "status": "ok" if alive else "batch worker stopped", "device": device_name(device),
            "adapters": {name: c.labels for name, c in classifiers.items()}})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

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

    def work() -> None:
        import uvicorn

        limits = Limits(args.max_batch_size, args.max_texts, args.max_text_chars,
                        args.max_body_bytes, args.batch_wait_ms, args.body_timeout_s, args.max_connections)
        limits.check()
        adapters = parse_adapter_specs(args.adapter)
        base_dir = require_dir(args.base, "base model") if args.base else None
        classifiers = load_adapters(adapters, base_dir)
        log.info("serve: %d adapter(s) on %s, http://%s:%d", len(classifiers),
                 device_name(next(iter(classifiers.values())).device), args.host, args.port)
        uvicorn.Server(server_config(create_app(classifiers, limits), limits, args.host, args.port)).run()

    return run_main(work)


if __name__ == "__main__":
    sys.exit(main())
