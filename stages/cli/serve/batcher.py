"""The server's batcher: requests for one adapter that arrive close together share forward
passes, run one at a time on a model thread of their own."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from stages.cli.serve.metrics import Metrics
from stages.lib.adapter import Classifier

log = logging.getLogger("qlora")


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
    own, so the next requests are tokenized while a forward pass runs (docs/serving.md), and only
    one because a fast tokenizer fails when called from two threads at once ("Already borrowed").
    A request's result is (class id, probability) per text.
    """

    def __init__(self, classifiers: Mapping[str, Classifier], max_batch_size: int, batch_wait_ms: float,
                 metrics: Metrics):
        self.classifiers, self.metrics = classifiers, metrics
        self.max_batch_size, self.batch_wait_ms = max_batch_size, batch_wait_ms
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self.active: str | None = None  # adapter set on the model; touched on the model thread only

    async def classify(self, adapter: str, texts: list[str]) -> list[tuple[int, float]]:
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
            deadline = jobs[0].arrived + self.batch_wait_ms / 1000
            while max(texts.values()) < self.max_batch_size:
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
        self.metrics.observe_batch(adapter, len(jobs), len(ids), self.max_batch_size)
        start = 0
        for j in jobs:
            if not j.future.done():
                j.future.set_result(results[start:start + len(j.ids)])
            start += len(j.ids)

    def predict(self, adapter: str, ids: list[list[int]]) -> list[tuple[int, float]]:
        """On the model thread: the predict CLI's path (longest-first batches, each padded to
        its longest text)."""
        classifier = self.classifiers[adapter]
        if self.active != adapter:
            classifier.model.set_adapter(adapter, inference_mode=True)  # also selects its head
            self.active = adapter
        label_id, score = classifier.top_labels(classifier.logits(ids, self.max_batch_size, desc="serve"))
        return list(zip(label_id.tolist(), score.tolist()))

    def shutdown(self) -> None:
        self.tokenizer_thread.shutdown(wait=True)
        self.model_thread.shutdown(wait=True)


# --- the app ------------------------------------------------------------------------------
