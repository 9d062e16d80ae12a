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

from dvclive import Live

from stages.lib.adapter import LanguageModel, load_adapter, load_language_model, read_adapter_meta
from stages.lib.answers import generate_answers, score_answers
from stages.lib.io import TIMING_FILE, atomic_dir, run_main, write_json
from stages.lib.params import load_params
from stages.lib.quantized import autocast, memory_hint
from stages.lib.tasks import Objective, format_scores, label_scores, per_class_scores
from stages.lib.tokenized import ChatTargets, load_tokenized

PARAMS = ("evaluate.batch_size", "evaluate.merged", "evaluate.compile", "generate.prompts",
          "generate.max_new_tokens", "generate.do_sample", "generate.temperature", "generate.top_k",
          "generate.seed")
SAMPLES_FILE = "samples.json"
log = logging.getLogger("qlora")


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
                            args: argparse.Namespace) -> None:
    """Loss and perplexity on the test blocks (sft: response tokens); causal-lm: samples from
    the fixed prompts; sft: exact match of answers to the test prompts."""
    lm = load_language_model(args.adapter, base_dir=args.base, merged=p["evaluate.merged"],
                             compile=p["evaluate.compile"])
    objective = Objective(lm.meta.task, lm.tokenizer)
    start = time.perf_counter()
    with memory_hint("evaluate.batch_size", p["evaluate.batch_size"]):
        examples = objective.examples(blocks, targets, lm.tokenizer.pad_token_id, lm.device, scoring=True)
        metrics = objective.scores(lm.model, examples, None, p["evaluate.batch_size"], lm.device, lm.dtype,
                                   desc="evaluate")
    elapsed = time.perf_counter() - start
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
        write_json(tmp / TIMING_FILE, {"eval_time_s": round(elapsed, 2),
                                       "samples_per_s": round(len(blocks) / elapsed, 2)})
        if samples:
            write_json(tmp / SAMPLES_FILE, samples)
    log.info("evaluate: %d test blocks, %s", len(blocks), format_scores(metrics))


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
            evaluate_language_model(p, *data["test"], args)
            return
        classifier = load_adapter(args.adapter, base_dir=args.base, merged=p["evaluate.merged"],
                                  compile=p["evaluate.compile"])
        sequences, labels = data["test"]
        start = time.perf_counter()
        with memory_hint("evaluate.batch_size", p["evaluate.batch_size"]):
            predictions = classifier.logits(sequences, p["evaluate.batch_size"], desc="evaluate").argmax(-1)
        elapsed = time.perf_counter() - start
        names = classifier.labels
        predicted = predictions.tolist()
        metrics = {**label_scores(labels, predicted, classes=range(len(names))),
                   "per_class": per_class_scores(labels, predicted, names)}
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
