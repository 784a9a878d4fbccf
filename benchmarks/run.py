"""``python -m benchmarks.run``: our paths against release-style paths; prints the
table and writes ``results/benchmarks.md`` (atomically).

    python -m benchmarks.run [--quick] [--device auto|cpu|cuda] [--repeats N]
                             [--out results/benchmarks.md] [--with-reproduce | --no-reproduce]
                             [--threads N] [--in-process]

Each row runs in its own worker process (``--worker``), its paths interleaved, so its memory is measured
alone; ``--in-process`` runs everything in this process (faster; no worker start-up).
See docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from reclip_core.markdown import markdown_table

from . import harness
from .rows import MODES, ROW_KIND, run_row

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "results" / "benchmarks.md"
REPRODUCE_TARGET_S = 600.0

# (row id, label, timing key, target ratio)
RATIO_ROWS = [
    ("1a", "eval_voc", "forward", 2.0, "Evaluation forward, VOC size"),
    ("1b", "eval_ade", "forward", 4.0, "Evaluation forward, ADE size"),
    ("1c", "eval_voc", "step", 1.5, "Evaluation per image, whole step (resize, forward, upsampling, argmax, metrics; ours: what `evaluate_run` scores, the three heads with PD off and on; release-style: the ReCLIP++ head with PD + a prediction PNG), VOC size"),
    ("1d", "eval_ade", "step", 1.5, "Evaluation step per image as in 1c, ADE size"),
    ("1e", "eval_voc", "step", 1.5, "Evaluation step per image, ours scoring what the release scores (the ReCLIP++ head with PD), VOC size"),
    ("1f", "eval_ade", "step", 1.5, "Evaluation step per image as in 1e, ADE size"),
    ("2a", "train", "epoch", 3.0, "Training, one epoch"),
    ("2b", "train", "epoch", 3.0, "Training, one epoch, ours on cached CLIP features"),
    ("3", "hyp", "image", 2.0, "Hypotheses for one image"),
]
#: the path a row's "ours" column reads (default "ours")
OURS_PATH = {"1c": "ours_all", "1d": "ours_all", "2b": "ours_cached"}


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------
def _worker_main(spec: dict, out_path: Path) -> int:
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = harness_device(spec["device"])
    res = run_row(spec["row"], spec["mode"], device, repeats=spec.get("repeats"), amp=spec.get("amp"),
                  cache_dir=Path(spec["cache_dir"]))
    tag = spec.get("amp") or "fp32"
    for path, pres in res["paths"].items():
        output = pres.pop("output")
        if output is not None:
            out_file = Path(spec["cache_dir"]) / f"out_{spec['row']}_{path}_{tag}.pt"
            torch.save(output, out_file)
            pres["output_file"] = str(out_file)
    from reclip_core.atomic_io import atomic_write_json

    atomic_write_json(out_path, res)
    return 0


def harness_device(name: str) -> torch.device:
    from reclip_core.clip_loading import resolve_device

    return resolve_device(name)


def run_worker_subprocess(spec: dict, workdir: Path, timeout: float) -> dict:
    out = workdir / f"res_{spec['row']}_{spec.get('amp') or 'fp32'}.json"
    cmd = [sys.executable, "-m", "benchmarks.run", "--worker", json.dumps(spec), "--worker-out", str(out)]
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"benchmark worker {spec['row']} failed (rc={proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    res = json.loads(out.read_text())
    res["worker_seconds"] = time.perf_counter() - t0
    for pres in res["paths"].values():
        pres["output"] = torch.load(pres.pop("output_file"), map_location="cpu", weights_only=False) \
            if "output_file" in pres else None
    return res


# ---------------------------------------------------------------------------------------------
# Comparison of outputs (apples to apples)
# ---------------------------------------------------------------------------------------------
def same_output(a, b) -> Optional[str]:
    if a is None or b is None:
        return None
    if isinstance(a, torch.Tensor):
        if a.shape != b.shape:
            return "no (shape)"
        diff = float((a - b).abs().max())
        ok = torch.allclose(a, b, rtol=1e-4, atol=1e-4)
        return f"{'yes' if ok else 'NO'} (max abs diff {diff:.1e})"
    if isinstance(a, dict) and "confusion" in a:
        same_cm = torch.equal(a["confusion"], b["confusion"])
        logits = same_output(a["logits"], b["logits"])
        ok = same_cm and logits.startswith("yes")
        return f"{'yes' if ok else 'NO'} (PD confusion matrix {'equal' if same_cm else 'DIFFERS'}; logits {logits})"
    if isinstance(a, dict) and "hypothesis" in a:
        ok = a["hypothesis"] == b["hypothesis"]
        return f"{'yes' if ok else 'NO'} (hypothesis {a['hypothesis']})" if ok else \
            f"NO ({a['hypothesis']} vs {b['hypothesis']})"
    return None


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------
def _fmt_s(x: float) -> str:
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def _spread(st: dict) -> str:
    if st["n"] < 2:
        return f"n={st['n']}"
    s = f"{_fmt_s(st['min'])}–{_fmt_s(st['max'])}"
    if "q1" in st:
        s += f" (IQR {_fmt_s(st['q1'])}–{_fmt_s(st['q3'])})"
    return s + f", n={st['n']}"


def _mem(pres: dict) -> str:
    m = pres.get("memory")
    if not m or m.get("peak_mb") is None:
        return "n/a"
    return f"{m['peak_mb']:.0f} MB"


def _loads(pres: dict) -> str:
    vals = [f"{x:.1f}" for x in pres.get("load") or [] if x is not None]
    return "/".join(vals) if vals else "?"


def build_rows(results: Dict[Tuple[str, str], dict], amp_tags: List[str], reproduce: Optional[dict]) -> List[dict]:
    """Table rows from the row results ``results[(row, amp tag)]``. The ratio is the median over
    rounds of release-style time / ours time (both measured in the same round)."""
    rows = []
    for tag in amp_tags:
        suffix = "" if tag == "fp32" else f" [{tag} autocast]"
        for rid, row, key, target, label in RATIO_ROWS:
            res = results.get((row, tag))
            if res is None:
                continue
            ours_path = OURS_PATH.get(rid, "ours")
            ours, rel = res["paths"].get(ours_path), res["paths"].get("release")
            if ours is None or rel is None:
                continue
            so, sr = ours["stats"][key], rel["stats"][key]
            per_round = res["round_ratios"][ours_path][key]
            ratio = statistics.median(per_round)
            ex_o = ours["extra"]
            desc = label
            if row.startswith("eval"):
                desc += (f" (C={ex_o['classes']}, {ex_o['image'][0]}×{ex_o['image'][1]} image → "
                         f"{ex_o['input'][0]}×{ex_o['input'][1]} input)")
            elif row == "train":
                desc += (f" over N={ex_o['n_images']} images, crop {ex_o['crop']} (ours batch {ex_o['batch']}, "
                         f"release-style batch 1)")
                if "cache_build_seconds" in ex_o:
                    desc += f"; one-off cache build {_fmt_s(ex_o['cache_build_seconds'])} not included"
            elif row == "hyp":
                desc += (f" ({ex_o['image'][0]}×{ex_o['image'][1]}: {ex_o['windows_image']} windows of "
                         f"{ex_o['window']} px, stride {ex_o['stride']}, input {ex_o['input_size']}; ours batch "
                         f"{ex_o['batch']}, release-style 1")
                if ex_o["windows"] != ex_o["windows_image"]:
                    scale = ex_o["windows_image"] / ex_o["windows"]
                    desc += (f"; timed on the {ex_o['region'][0]}×{ex_o['region'][1]} top-left region = "
                             f"{ex_o['windows']} windows, both paths; per whole image ≈ "
                             f"{_fmt_s(so['median'] * scale)} vs {_fmt_s(sr['median'] * scale)}")
                desc += ")"
            ideal = ex_o.get("ideal_ratio") if key != "step" else None
            rows.append({
                "id": rid + ("" if tag == "fp32" else "-" + tag), "what": desc + suffix,
                "ours": _fmt_s(so["median"]), "release": _fmt_s(sr["median"]), "ratio": f"{ratio:.2f}×",
                "ideal": f"{ideal:.2f}×" if ideal else "—",
                "target": f"≥ {target:g}×" if target else "—",
                "result": ("met" if ratio >= target else "MISSED") if target else "(info)",
                "spread_ours": _spread(so), "spread_release": _spread(sr),
                "rounds": ", ".join(f"{r:.2f}" for r in per_round),
                "mem_ours": _mem(ours), "mem_release": _mem(rel),
                "same": same_output(ours.get("output"), rel.get("output")) or "—",
                "load": f"{_loads(ours)} / {_loads(rel)}",
            })
        for rid, row in (("4a", "eval_voc"), ("4b", "eval_ade")):
            res = results.get((row, tag))
            if res is None or "roofline" not in res["paths"]["ours"]["extra"]:
                continue
            ours = res["paths"]["ours"]
            ex = ours["extra"]
            flops = ex["flops_forward"]
            pairs = ex["roofline"]
            if not pairs:
                continue
            achieved = [flops / p["forward_s"] / 1e9 for p in pairs]
            matmul = [p["matmul_gflops"] for p in pairs]
            fracs = [a / m for a, m in zip(achieved, matmul)]
            frac = statistics.median(fracs)
            rows.append({
                "id": rid + ("" if tag == "fp32" else "-" + tag),
                "what": (f"Eval forward achieved GFLOP/s ({flops / 1e9:.1f} GFLOP analytic: dense ViT + logits + "
                         f"decoder, C={ex['classes']}, {ex['input'][0]}×{ex['input'][1]}) vs {ex.get('matmul_dtype', 'fp32')} 2048² matmul "
                         f"GFLOP/s measured right before each forward; ratio = median of the per-image ratios"
                         + suffix),
                "ours": f"{statistics.median(achieved):.1f} GFLOP/s",
                "release": f"matmul {statistics.median(matmul):.1f} GFLOP/s",
                "ratio": f"{100 * frac:.0f}%", "ideal": "—", "target": "≥ 50%",
                "result": "met" if frac >= 0.5 else "MISSED",
                "spread_ours": f"{min(achieved):.1f}–{max(achieved):.1f} GFLOP/s",
                "spread_release": f"{min(matmul):.1f}–{max(matmul):.1f} GFLOP/s",
                "rounds": ", ".join(f"{100 * f:.0f}%" for f in fracs),
                "mem_ours": _mem(ours), "mem_release": "—", "same": "—", "load": _loads(ours),
            })
    if reproduce is not None:
        wall = reproduce.get("seconds")
        ok = reproduce.get("returncode") == 0
        rows.append({
            "id": "5", "what": f"Toy `{reproduce['command']}` wall time (one run, fresh results tree: no cached runs, hypotheses or features)",
            "ours": _fmt_s(wall) if wall is not None else "n/a", "release": "—",
            "ratio": "—", "ideal": "—", "target": f"< {REPRODUCE_TARGET_S:.0f} s",
            "result": ("met" if wall < REPRODUCE_TARGET_S else "MISSED") if ok
            else f"FAILED (rc={reproduce.get('returncode')})",
            "spread_ours": "n=1", "spread_release": "—", "rounds": "—", "mem_ours": reproduce.get("peak_rss", "n/a"),
            "mem_release": "—", "same": "—", "load": reproduce.get("load", "?"),
        })
    return rows


COLUMNS = [("id", "#"), ("what", "row"), ("ours", "ours (median)"), ("release", "release-style (median)"),
           ("ratio", "ratio"), ("target", "target"), ("result", "met?"), ("ideal", "ideal (FLOP ratio)"),
           ("rounds", "ratio per round"), ("spread_ours", "spread ours"),
           ("spread_release", "spread release-style"), ("mem_ours", "peak mem ours"),
           ("mem_release", "peak mem release-style"), ("same", "same output"),
           ("load", "1-min load avg per run (ours / release-style)")]


def render_markdown(rows: List[dict], machine: dict, notes: List[str], command: str, total_s: float) -> str:
    lines = ["# Benchmarks: ours vs release-style", "",
             f"Written by `{command}` (benchmarks/run.py) — do not edit by hand. See docs/benchmarks.md.", "",
             "## Machine", ""]
    for k in ("date_utc", "cpu", "cores", "usable_cores", "threads", "device", "gpu", "torch", "open_clip", "python"):
        if k in machine:
            lines.append(f"- {k}: {machine[k]}")
    lines.append(f"- load average (1, 5, 15 min) at start: {machine.get('load_average')}; at end: "
                 f"{machine.get('load_average_end')}")
    lines.append(f"- total benchmark wall time: {total_s:.0f} s")
    lines += ["", "## Results", ""]
    lines += markdown_table([h for _, h in COLUMNS],
                            ([str(r.get(k, "")).replace("|", "/") for k, _ in COLUMNS] for r in rows))
    lines += ["", "## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def render_console(rows: List[dict]) -> str:
    keys = ["id", "ours", "release", "ratio", "target", "result", "ideal", "rounds", "mem_ours", "mem_release", "same"]
    out = []
    for r in rows:
        out.append(f"[{r['id']}] {r['what']}")
        out.append("     " + "  ".join(f"{k}={r[k]}" for k in keys[1:]))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# make reproduce
# ---------------------------------------------------------------------------------------------
def time_reproduce(command: List[str], timeout: float) -> dict:
    """Wall time of a *fresh* reproduction: the command writes into an empty temporary results
    tree (``RECLIP_RESULTS``), so nothing a previous run left (trained runs, hypotheses, feature
    caches) is reused and the committed ``results/`` stay untouched. The generated toy world under
    ``data/`` is reused like any download cache."""
    load0 = harness.load_average()
    tmp = tempfile.TemporaryDirectory(prefix="reclip-bench-reproduce-")
    env = dict(os.environ, RECLIP_RESULTS=tmp.name)
    wrapper = [sys.executable, "-c",
               "import resource,subprocess,sys;rc=subprocess.call(sys.argv[1:]);"
               "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr);"
               "sys.exit(rc)"] + command
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(wrapper, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        rc = proc.returncode
        err = proc.stderr
    except subprocess.TimeoutExpired:
        rc, err = "timeout", ""
    wall = time.perf_counter() - t0
    tmp.cleanup()
    peak = None
    for line in err.splitlines():
        if line.startswith("PEAK_RSS_KB"):
            peak = f"{int(line.split()[1]) / 1024:.0f} MB (largest child RSS)"
    load1 = harness.load_average()
    return {"command": " ".join(command), "seconds": wall, "returncode": rc, "peak_rss": peak or "n/a",
            "load": f"{load0[0]:.1f}→{load1[0]:.1f}" if load0 and load1 else "?",
            "stderr_tail": err[-2000:] if rc != 0 else ""}


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def plan(device: torch.device) -> List[Tuple[str, Optional[str]]]:
    specs = [(row, None) for row in ("eval_voc", "eval_ade", "train", "hyp")]
    if device.type == "cuda":
        specs += [(row, "bf16") for row in ("eval_voc", "eval_ade", "hyp")]
    return specs


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny CLIP and sizes (seconds); for tests and smoke runs")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per path (default per row)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="markdown table to write")
    rep = p.add_mutually_exclusive_group()
    rep.add_argument("--with-reproduce", dest="reproduce", action="store_true", default=None,
                     help="also time `make reproduce` (default in full mode)")
    rep.add_argument("--no-reproduce", dest="reproduce", action="store_false")
    p.add_argument("--reproduce-command", default="make reproduce", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None, help="torch threads in every worker (default: torch's)")
    p.add_argument("--in-process", action="store_true", help="no worker processes (faster start; rows share one process)")
    p.add_argument("--rows", default=None, help="comma-separated subset of eval_voc,eval_ade,train,hyp")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return _worker_main(json.loads(args.worker), Path(args.worker_out))
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = harness_device(args.device)
    mode = "quick" if args.quick else "full"
    machine = harness.machine_info(device)
    if args.threads is None:
        machine["threads"] = f"{torch.get_num_threads()} (torch default)"
    do_reproduce = (not args.quick) if args.reproduce is None else args.reproduce
    selected = None if args.rows is None else set(args.rows.split(","))
    if selected is not None and not selected <= set(ROW_KIND):
        raise SystemExit(f"--rows: unknown {sorted(selected - set(ROW_KIND))}; valid: {sorted(ROW_KIND)}")
    specs = [s for s in plan(device) if selected is None or s[0] in selected]
    print(f"benchmarks ({mode}, {device}, threads {torch.get_num_threads()}, load {machine['load_average']}): "
          f"{len(specs)} rows{' + make reproduce' if do_reproduce else ''}", flush=True)

    results: Dict[Tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory(prefix="reclip_bench_") as tmp:
        tmp = Path(tmp)
        clip = None
        for row, amp in specs:
            t0 = time.perf_counter()
            if args.in_process:
                if clip is None:
                    from .rows import load_model

                    clip = load_model(MODES[mode]["arch"], device)
                res = run_row(row, mode, device, repeats=args.repeats, amp=amp, cache_dir=tmp, clip=clip)
            else:
                spec = {"row": row, "mode": mode, "device": str(device), "repeats": args.repeats,
                        "amp": amp, "threads": args.threads, "cache_dir": str(tmp)}
                res = run_worker_subprocess(spec, tmp, timeout=1800)
            results[(row, amp or "fp32")] = res
            parts = []
            for path, pres in res["paths"].items():
                key = next(iter(pres["stats"]))
                parts.append(f"{path} {key} {_fmt_s(pres['stats'][key]['median'])}")
            print(f"  {row}{'/' + amp if amp else ''}: " + ", ".join(parts)
                  + f" ({time.perf_counter() - t0:.0f} s incl. setup)", flush=True)

    reproduce = None
    if do_reproduce:
        print(f"  timing `{args.reproduce_command}` ...", flush=True)
        reproduce = time_reproduce(args.reproduce_command.split(), timeout=1800)
        print(f"  {args.reproduce_command}: {reproduce['seconds']:.0f} s (rc={reproduce['returncode']})", flush=True)
        if reproduce["stderr_tail"]:
            print(reproduce["stderr_tail"], file=sys.stderr)

    amp_tags = ["fp32"] + (["bf16"] if device.type == "cuda" else [])
    rows = build_rows(results, amp_tags, reproduce)
    machine["load_average_end"] = harness.load_average()
    notes = notes_for(mode, results, args)
    command = "python -m benchmarks.run" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    text = render_markdown(rows, machine, notes, command.strip(), time.perf_counter() - t_start)
    print()
    print(render_console(rows))
    from reclip_core.atomic_io import atomic_write_text

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)
    print(f"\nwrote {out} ({time.perf_counter() - t_start:.0f} s)")
    return 0


def notes_for(mode: str, results: dict, args) -> List[str]:
    cfg = MODES[mode]
    notes = []
    if mode == "quick":
        notes.append("QUICK MODE: a tiny CLIP on tiny inputs checks that the harness runs; its timings are "
                     "dominated by Python overhead and say nothing about the method. Run without --quick.")
    notes += [
        f"Mode `{mode}`: CLIP `{Path(cfg['arch']).name}` with random weights (`torch.manual_seed(0)` before "
        "`load_clip(..., pretrained=None)`), the same weights for every path and row; ReCLIP++ heads seeded "
        "with `torch.manual_seed(1)`.",
        "Timing: each row runs in its own worker process; after one warm-up call per path (evaluation: the "
        "first image, run by ours, which computes its bias map there once for the input size and so runs "
        "every operation of the release-style forward at the same shapes; training: one "
        "optimiser step; hypotheses: a 2×2-window corner of the image) the paths run interleaved, one call "
        "each per round, the order alternating between rounds, so a change of load on the shared machine "
        "hits both alike. ours/release-style columns: medians; spread: min–max (IQR when n ≥ 4); ratio: "
        "the median over rounds of (release-style time / ours time) of the same round — the per-round "
        "ratios are listed. \"ideal (FLOP ratio)\": analytic FLOPs of the release-style path over ours "
        "(what removing the recomputation can give at 100 % efficiency; ≈ for training, whose backward is "
        "estimated).",
        "Peak memory: per path, over its first timed call, the process's peak resident set (VmHWM, reset "
        "through /proc/self/clear_refs after `malloc_trim`) above the resident set at the reset (model, "
        "inputs, the other paths' live state not counted); on CUDA `torch.cuda.max_memory_allocated` above "
        "the allocation at the reset." + (" `--in-process`: earlier rows ran in the same process." if
                                          args.in_process else ""),
        "Class text features: fixed, computed once per dataset outside every timed region with ONE template "
        "(\"a photo of a {}.\") instead of 85 (150 ADE classes × 85 templates take tens of minutes on 2 CPU "
        "cores); both paths use the same features, so the timed difference is the Reference-prompt path.",
        "Release-style paths (benchmarks/release_style.py) follow method.md: Reference-prompt features and "
        "the positional feature recomputed on every forward; one CLIP forward per hypothesis window; "
        "training at batch 1 with a Python loop over the hypothesis classes; a prediction PNG per "
        "evaluation image. tests/test_benchmarks.py checks that both paths compute the same numbers.",
        "Rows 1a/1b time the model forward only; rows 1c–1f the whole per-image evaluation step (1c/1d: "
        "ours scores the three heads with PD off and on, as `evaluate_run`; 1e/1f: only the ReCLIP++ head "
        "with PD, as the release). Row 4 "
        "divides the analytic FLOPs of our evaluation forward (dense ViT + logits + decoder conv; "
        "element-wise ops not counted) by each timed forward's time and compares with the fp32 2048² matmul "
        "rate measured right before that forward (the matmul burst runs outside every timed region).",
        "Training rows: the same N images, hypotheses, label-free views (the library's `TrainViews`, "
        "augmentation included in the timed epoch for both paths), Gumbel noise per image, SGD (lr 0.01, "
        "momentum 0.9, weight decay 5e-4); only the batching (ours: the library's training step on "
        "mini-batches) and, for 2b, the library's cache of frozen CLIP features of one fixed view per image "
        "(fewer augmentations: a documented trade-off; its one-off build time is given in the row) differ.",
        "A measured value that misses its target is printed as MISSED. The machine is shared (other jobs "
        "run); read the load average columns before trusting a ratio.",
    ]
    return notes


if __name__ == "__main__":
    raise SystemExit(main())
