"""evaluate: score the trained adapter on the test split.

Reads  data/tokenized (test split), models/base, models/adapter, params evaluate.batch_size,
       evaluate.merged, evaluate.compile, evaluate.device, generate.* (causal-lm). The base is
       loaded with the task and quantization the adapter was trained under (pipeline.json);
       `merged` dequantizes it once and merges LoRA in. evaluate.device `auto` claims a free GPU
       (lib.devices).
Writes <metrics-out>/ (DVCLive): metrics.json and timing.json (the one part that differs between
       identical runs: warm-up seconds, then steady-state samples/s, and tokens/s for language
       models: lib.throughput). Classification: accuracy, macro- and weighted F1,
       per-class precision, recall and F1; plots/sklearn/confusion_matrix.json;
       plots/custom/per_class_f1.json. Language models: loss and perplexity per predicted token
       (masked-lm: on a fixed, seeded 15% mask); causal-lm also samples.json, the text generated
       from each of generate.prompts. sft: loss and perplexity on the response tokens, and
       exact_match of greedy answers (generate.max_new_tokens, stopping at eos) to the test
       prompts rendered with the chat template; samples.json holds every prompt, reference and
       answer (lib.answers).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from dvclive import Live

from stages import STARTED
from stages.lib.adapter import LanguageModel, load_adapter, load_language_model
from stages.lib.adapter_meta import read_adapter_meta
from stages.lib.answers import generate_answers, score_answers
from stages.lib.compiling import EVAL_COMPILE_S, EVAL_SAVED_S, decide_compile
from stages.lib.devices import select_device
from stages.lib.io import TIMING_FILE, atomic_dir, run_main, write_json
from stages.lib.params import load_params
from stages.lib.quantized import autocast, memory_hint
from stages.lib.sources import parameter_count
from stages.lib.tasks import Objective, format_scores, label_scores, per_class_scores
from stages.lib.throughput import EVAL_WARMUP_BATCHES, Throughput, describe
from stages.lib.tokenized import ChatTargets, load_tokenized

PARAMS = ("evaluate.batch_size", "evaluate.merged", "evaluate.compile", "evaluate.device", "generate.prompts",
          "generate.max_new_tokens", "generate.do_sample", "generate.temperature", "generate.top_k",
          "generate.seed")
SAMPLES_FILE = "samples.json"
log = logging.getLogger("qlora")


def should_compile(p, sequences: list[list[int]], base: str) -> bool:
    """evaluate.compile, with auto decided by the test split's tokens (lib.compiling); logged."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as lib.quantized picks it
    tokens = sum(len(s) for s in sequences)
    decision = decide_compile("evaluate.compile", p["evaluate.compile"], device, tokens,
                              parameter_count(base) if device.type == "cuda" else 0,
                              EVAL_COMPILE_S, EVAL_SAVED_S)
    log.info(decision.reason)
    return decision.compile


def timing(throughput: Throughput, elapsed: float, with_tokens: bool) -> dict[str, float | None]:
    """timing.json: the scoring loop's seconds, warm-up (load, compile, first batches), the
    steady-state rate after it, and the seconds from the process's start to the first batch."""
    return {"eval_time_s": round(elapsed, 2), **throughput.report(with_tokens),
            "first_batch_s": throughput.first_unit_s(STARTED)}


def answer_test_prompts(lm: LanguageModel, targets: ChatTargets, p) -> tuple[float, dict]:
    """Exact match of greedy answers to the test conversations' prompts, and the samples."""
    conversations = [json.loads(c) for c in targets.conversations]

    def answer(prompts):
        with autocast(lm.device, lm.dtype):
            return generate_answers(lm.model, lm.tokenizer, prompts, p["generate.max_new_tokens"],
                                    p["evaluate.batch_size"])

    with memory_hint("evaluate.batch_size", p["evaluate.batch_size"]):
        score, records = score_answers(conversations, answer)
    return score, {"settings": {"max_new_tokens": p["generate.max_new_tokens"], "do_sample": False},
                   "samples": records}


def evaluate_language_model(p, blocks: list[list[int]], targets: ChatTargets | None,
                            args: argparse.Namespace, started: float) -> None:
    """Loss and perplexity on the test blocks (sft: response tokens); causal-lm: samples from
    the fixed prompts; sft: exact match of answers to the test prompts."""
    lm = load_language_model(args.adapter, base_dir=args.base, merged=p["evaluate.merged"],
                             compile=should_compile(p, blocks, args.base))
    objective = Objective(lm.meta.task, lm.tokenizer)
    throughput = Throughput(lm.device, EVAL_WARMUP_BATCHES, started)
    start = time.perf_counter()
    with memory_hint("evaluate.batch_size", p["evaluate.batch_size"]):
        examples = objective.examples(blocks, targets, lm.tokenizer.pad_token_id, lm.device, scoring=True)
        metrics = objective.scores(lm.model, examples, None, p["evaluate.batch_size"], lm.device, lm.dtype,
                                   desc="evaluate", on_batch=throughput.done)
    elapsed = time.perf_counter() - start  # scoring syncs every batch (.item())
    speed = timing(throughput, elapsed, with_tokens=True)
    if lm.task == "sft":
        metrics["exact_match"], samples = answer_test_prompts(lm, targets, p)
        metrics.update(test_examples=len(blocks), test_tokens=sum(map(len, blocks)))
    else:
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
        write_json(tmp / TIMING_FILE, speed)
        if samples:
            write_json(tmp / SAMPLES_FILE, samples)
    log.info("evaluate: %d test blocks, %s; %s", len(blocks), format_scores(metrics), describe(speed))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True)
    parser.add_argument("--data", required=True, help="tokenized dataset directory")
    parser.add_argument("--base", required=True, help="base model directory")
    parser.add_argument("--adapter", required=True, help="trained adapter directory")
    parser.add_argument("--metrics-out", required=True)
    args = parser.parse_args(argv)

    def work() -> None:
        started = time.perf_counter()  # warm-up counts from here: loading, compiling, first batches
        p = load_params(args.params, PARAMS)
        data, _ = load_tokenized(Path(args.data))
        select_device("evaluate.device", p["evaluate.device"])  # before anything touches CUDA
        if read_adapter_meta(Path(args.adapter)).task_type != "classification":
            evaluate_language_model(p, *data["test"], args, started)
            return
        sequences, labels = data["test"]
        classifier = load_adapter(args.adapter, base_dir=args.base, merged=p["evaluate.merged"],
                                  compile=should_compile(p, sequences, args.base))
        throughput = Throughput(classifier.device, EVAL_WARMUP_BATCHES, started)
        start = time.perf_counter()
        with memory_hint("evaluate.batch_size", p["evaluate.batch_size"]):
            predictions = classifier.logits(sequences, p["evaluate.batch_size"], desc="evaluate",
                                            on_batch=throughput.done).argmax(-1)
        elapsed = time.perf_counter() - start  # the logits came back to the host: synchronized
        names = classifier.labels
        predicted = predictions.tolist()
        metrics = {**label_scores(labels, predicted, classes=range(len(names))),
                   "per_class": per_class_scores(labels, predicted, names)}
        metrics["test_samples"] = len(labels)
        speed = timing(throughput, elapsed, with_tokens=False)
        with atomic_dir(args.metrics_out) as tmp:
            live = Live(str(tmp), dvcyaml=False, save_dvc_exp=False)
            live.summary = metrics
            live.log_sklearn_plot("confusion_matrix", [names[i] for i in labels],
                                  [names[i] for i in predictions], name="confusion_matrix.json")
            live.log_plot("per_class_f1", [{"class": n, "f1": round(m["f1"], 4)}
                                           for n, m in metrics["per_class"].items()],
                          x="f1", y="class", template="bar_horizontal", title="Test F1 per class")
            live.end()
            write_json(tmp / TIMING_FILE, speed)
        log.info("evaluate: %d test rows, accuracy %.4f, macro-F1 %.4f; %s",
                 len(labels), metrics["accuracy"], metrics["f1_macro"], describe(speed))

    return run_main(work)


if __name__ == "__main__":
    sys.exit(main())
