"""evaluate: score the trained adapter on the test split.

Reads  data/tokenized (test split), models/base, models/adapter, params evaluate.batch_size,
       evaluate.merged, evaluate.compile, generate.* (causal-lm). The base is loaded with the
       task and quantization the adapter was trained under (pipeline.json); `merged` dequantizes
       it once and merges LoRA in.
Writes <metrics-out>/ (DVCLive): metrics.json and timing.json (seconds, samples/s: the one part
       that differs between identical runs). Classification: accuracy, macro- and weighted F1,
       per-class precision, recall and F1; plots/sklearn/confusion_matrix.json;
       plots/custom/per_class_f1.json. Language models: loss and perplexity per predicted token
       (masked-lm: on a fixed, seeded 15% mask); causal-lm also samples.json, the text generated
       from each of generate.prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dvclive import Live
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from stages.lib.data import load_tokenized
from stages.lib.io import TIMING_FILE, atomic_dir, run_main, write_json
from stages.lib.model import load_adapter, load_language_model, memory_hint, read_adapter_meta
from stages.lib.params import load_params
from stages.lib.tasks import Objective, describe

PARAMS = ("evaluate.batch_size", "evaluate.merged", "evaluate.compile", "generate.prompts",
          "generate.max_new_tokens", "generate.do_sample", "generate.temperature", "generate.top_k",
          "generate.seed")
SAMPLES_FILE = "samples.json"
log = logging.getLogger("qlora")


def score(labels: Sequence[int], predictions: Sequence[int], names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support."""
    ids = list(range(len(names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=ids, zero_division=0)
    return {"accuracy": float(accuracy_score(labels, predictions)),
            "f1_macro": float(f1_score(labels, predictions, labels=ids, average="macro", zero_division=0)),
            "f1_weighted": float(f1_score(labels, predictions, labels=ids, average="weighted", zero_division=0)),
            "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                                 "f1": float(f1[i]), "support": int(support[i])}
                          for i, name in enumerate(names)}}


def evaluate_language_model(p, blocks: list[list[int]], args: argparse.Namespace) -> None:
    """Loss and perplexity on the test blocks; causal-lm: samples from the fixed prompts."""
    lm = load_language_model(args.adapter, base_dir=args.base, merged=p["evaluate.merged"],
                             compile=p["evaluate.compile"])
    objective = Objective(dataclasses.asdict(lm.meta.task), lm.tokenizer)
    start = time.perf_counter()
    with memory_hint("evaluate.batch_size", p["evaluate.batch_size"]):
        examples = objective.examples(blocks, None, lm.tokenizer.pad_token_id, lm.device, scoring=True)
        metrics = objective.scores(lm.model, examples, None, p["evaluate.batch_size"], lm.device, lm.dtype,
                                   desc="evaluate")
    elapsed = time.perf_counter() - start
    metrics.update(test_blocks=len(blocks), block_tokens=len(blocks[0]))
    samples = None
    if lm.task == "causal-lm":
        settings = {k: p[f"generate.{k}"] for k in ("max_new_tokens", "do_sample", "temperature", "top_k", "seed")}
        texts = lm.generate(p["generate.prompts"], **settings)
        samples = {"settings": settings, "samples": [{"prompt": prompt, "text": text}
                                                     for prompt, text in zip(p["generate.prompts"], texts)]}
    with atomic_dir(args.metrics_out) as tmp:
        live = Live(str(tmp), dvcyaml=False, save_dvc_exp=False)
        live.summary = metrics
        live.end()
        write_json(tmp / TIMING_FILE, {"eval_time_s": round(elapsed, 2),
                                       "samples_per_s": round(len(blocks) / elapsed, 2)})
        if samples:
            write_json(tmp / SAMPLES_FILE, samples)
    log.info("evaluate: %d test blocks, %s", len(blocks), describe(metrics))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True)
    parser.add_argument("--data", required=True, help="tokenized dataset directory")
    parser.add_argument("--base", required=True, help="base model directory")
    parser.add_argument("--adapter", required=True, help="trained adapter directory")
    parser.add_argument("--metrics-out", required=True)
    args = parser.parse_args(argv)

    def work() -> None:
        p = load_params(args.params, PARAMS)
        data, _ = load_tokenized(Path(args.data))
        if read_adapter_meta(Path(args.adapter)).task_type != "classification":
            evaluate_language_model(p, data["test"][0], args)
            return
        classifier = load_adapter(args.adapter, base_dir=args.base, merged=p["evaluate.merged"],
                                  compile=p["evaluate.compile"])
        sequences, labels = data["test"]
        start = time.perf_counter()
        with memory_hint("evaluate.batch_size", p["evaluate.batch_size"]):
            predictions = classifier.logits(sequences, p["evaluate.batch_size"], desc="evaluate").argmax(-1)
        elapsed = time.perf_counter() - start
        names = classifier.labels
        metrics = score(labels, predictions.tolist(), names)
        metrics["test_samples"] = len(labels)
        timing = {"eval_time_s": round(elapsed, 2), "samples_per_s": round(len(labels) / elapsed, 2)}
        with atomic_dir(args.metrics_out) as tmp:
            live = Live(str(tmp), dvcyaml=False, save_dvc_exp=False)
            live.summary = metrics
            live.log_sklearn_plot("confusion_matrix", [names[i] for i in labels],
                                  [names[i] for i in predictions], name="confusion_matrix.json")
            live.log_plot("per_class_f1", [{"class": n, "f1": round(m["f1"], 4)}
                                           for n, m in metrics["per_class"].items()],
                          x="f1", y="class", template="bar_horizontal", title="Test F1 per class")
            live.end()
            write_json(tmp / TIMING_FILE, timing)
        log.info("evaluate: %d test rows, accuracy %.4f, macro-F1 %.4f, %.1f samples/s",
                 len(labels), metrics["accuracy"], metrics["f1_macro"], timing["samples_per_s"])

    return run_main(work)


if __name__ == "__main__":
    sys.exit(main())
