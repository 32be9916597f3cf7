"""p3o against TRL on identical work, in one invocation (see benchmarks/README.md).

For each pairing (rloo: p3o-v1 vs TRL RLOOTrainer k=2; grpo: p3o grpo vs TRL GRPOTrainer k=4;
ppo: p3o ppo vs TRL PPOTrainer) and size (~1M, ~10M parameters; smollm2: SmolLM2-135M-Instruct with
LoRA, by request), every repeat runs a short and a long job of each implementation (on smollm2, of
each implementation in float32 and in bf16), alternating which goes first. Each job is a fresh
process timed whole by this one, so start-up (imports, model loading) cancels in the marginal cost
per step:
    s/step = (t_long - t_short) / (n_long - n_short),   prompts/s = prompts_per_step / s/step,
with the median over repeats. Peak memory is the long job's ru_maxrss from os.wait4. Where a side
runs in two precisions, its faster one is compared.

    python benchmarks/vs_trl.py                      # rloo, grpo, ppo on 1m, 10m (~18 min on 2 idle cores, estimated)
    python benchmarks/vs_trl.py --quick              # a smoke run of every job
    python benchmarks/vs_trl.py --p3o_compile        # p3o also with --compile_sampling; each side's fastest compared
    python benchmarks/vs_trl.py --pairings rloo,grpo --sizes smollm2   # issue 19's real model (~50 min, estimated)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from itertools import product
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from task import asset_dir  # noqa: E402  (imports nothing heavy)

IMPLS = ("p3o", "trl")
PAIRINGS = ("rloo", "grpo", "ppo")
SIZES = ("1m", "10m", "smollm2")
UNSUPPORTED = {("ppo", "smollm2"): "ppo needs a reward model of the policy's shape, built for 1m and 10m only"}
# Each side's precisions per size (others: fp32 only). On the real model bf16 is each library's
# faster setting on this CPU, or not: both are run and each side's best is compared.
PRECISIONS = {"smollm2": ("fp32", "bf16")}
# Prompts-per-second ratio p3o/TRL that each (pairing, size) should reach (none given: no target).
SPEED_TARGETS = {("rloo", "1m"): 1.3, ("rloo", "10m"): 1.15, ("ppo", "1m"): 1.5, ("ppo", "10m"): 1.5,
                 ("rloo", "smollm2"): 2.0}
MEMORY_TARGETS = {"smollm2": 0.8}  # p3o peak RSS over TRL's; at most 1.0 elsewhere
STEP_TARGETS = {("rloo", "smollm2"): 3.0}  # issue 19: p3o's step at most 3 s on 2 cores
LABELS = {"rloo": "p3o-v1 vs TRL RLOO (k=2)", "grpo": "p3o grpo vs TRL GRPO (k=4)", "ppo": "p3o ppo vs TRL PPO"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairings", default="rloo,grpo,ppo", help="Comma-separated: rloo, grpo, ppo.")
    p.add_argument("--sizes", default="1m,10m",
                   help="Comma-separated: 1m, 10m, smollm2 (benchmarks/task.py; smollm2 runs rloo and grpo only).")
    p.add_argument("--repeats", type=int, default=3, help="Alternating repeats; the median is reported.")
    p.add_argument("--short_steps", type=int, default=2, help="Steps of the short job.")
    p.add_argument("--long_steps", default="1m:42,10m:22,smollm2:6",
                   help="Steps of the long job, per size (size:steps,...); the extra steps over --short_steps "
                        "are what is measured.")
    p.add_argument("--pairs", default="1m:16,10m:16,smollm2:8",
                   help="Prompts per step, per size (size:n,...) or one number for every size; each prompt gets "
                        "its group of responses (rloo 2, grpo 4, ppo 1).")
    p.add_argument("--new_tokens", type=int, default=32, help="Maximum new tokens per response.")
    p.add_argument("--grad_accum", type=int, default=1, help="Micro-batches per optimizer step, both sides.")
    p.add_argument("--lr", type=float, default=1e-4, help="Learning rate, both sides (constant schedule).")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every job.")
    p.add_argument("--max_other_load", type=float, default=0.15,
                   help="A job during which other processes used more cores than this on average is rerun.")
    p.add_argument("--retries", type=int, default=2, help="Reruns of a disturbed job before keeping it anyway.")
    p.add_argument("--p3o_compile", action="store_true",
                   help="Also run p3o with --compile_sampling in each precision; each side's fastest configuration "
                        "is compared. An untimed job per compiled configuration first fills inductor's on-disk "
                        "cache, so the timed short and long jobs load the same compiled kernels and that start-up "
                        "cancels in the marginal step; the warm-up job's log shows the cold compilation.")
    p.add_argument("--idle_wait", type=float, default=300,
                   help="Seconds to wait, before each job, for other processes to leave the CPU idle.")
    p.add_argument("--no_warmup", action="store_true", help="Skip the untimed first job of each implementation.")
    p.add_argument("--quick", action="store_true",
                   help="Smoke run: 1 repeat, 1 vs 3 steps (smollm2: 1 vs 2), 4 prompts, 8 new tokens; "
                        "numbers mean nothing.")
    p.add_argument("--out_dir", default=str(HERE.parent / "runs" / "bench"))
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.short_steps, args.new_tokens = 1, 1, 8
        args.long_steps, args.pairs = "1m:3,10m:3,smollm2:2", "4"
    args.pairings, args.sizes = args.pairings.split(","), args.sizes.split(",")
    for name, given, known in (("--pairings", args.pairings, PAIRINGS), ("--sizes", args.sizes, SIZES)):
        if set(given) - set(known):
            p.error(f"{name}: unknown {', '.join(sorted(set(given) - set(known)))}; choose from {', '.join(known)}")
    if not jobs(args):
        p.error("no pairing runs on these sizes: " + "; ".join(UNSUPPORTED.values()))
    args.long_steps, args.pairs = per_size(p, "--long_steps", args.long_steps), per_size(p, "--pairs", args.pairs)
    for size in args.sizes:
        if size not in args.pairs:
            p.error(f"--pairs gives no number for {size}")
        if args.long_steps.get(size, 0) <= args.short_steps:
            p.error(f"--long_steps for {size} must exceed --short_steps {args.short_steps}")
    return args


def per_size(p, flag: str, text: str) -> dict:
    """'size:n,...' -> {size: n}; a bare number applies to every size."""
    try:
        if ":" not in text:
            return dict.fromkeys(SIZES, int(text))
        return {k: int(v) for k, v in (item.split(":") for item in text.split(","))}
    except ValueError:
        p.error(f"{flag} takes size:n,... or one number, not {text!r}")


def jobs(args) -> list[tuple[str, str]]:
    """The (pairing, size) cells to measure, in order; the unsupported ones are left out."""
    return [(pairing, size) for pairing in args.pairings for size in args.sizes if (pairing, size) not in UNSUPPORTED]


def variants(size: str, p3o_compile: bool = False) -> list[tuple[str, str]]:
    """(implementation, precision) of every job series on `size`; with `p3o_compile`, p3o runs each
    precision also with --compile_sampling ("fp32+compile")."""
    precisions = PRECISIONS.get(size, ("fp32",))
    compiled = [("p3o", f"{precision}+compile") for precision in precisions] if p3o_compile else []
    return [(impl, precision) for impl in IMPLS for precision in precisions] + compiled


def job_env(threads: int) -> dict:
    """The same thread pools and offline settings for every job."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
            "PYTHONHASHSEED": "0"}


def run_job(args, variant: tuple[str, str], pairing: str, size: str, steps: int, tag: str) -> dict:
    """`spawn`, again (up to --retries times) while other processes took CPU time during the job."""
    for attempt in range(args.retries + 1):
        wait_for_idle(args.max_other_load, args.idle_wait)
        result = spawn(args, variant, pairing, size, steps, tag)
        if result["other_load_cores"] <= args.max_other_load:
            break
        print(f"    disturbed by other processes (attempt {attempt + 1})", flush=True)
    return result


def spawn(args, variant: tuple[str, str], pairing: str, size: str, steps: int, tag: str) -> dict:
    """One run_one.py process: wall time of the whole process, its peak RSS, and its own summary."""
    impl, precision = variant
    logs = Path(args.out_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    name = f"{pairing}-{size}-{impl}-{precision}-{steps}steps-{tag}"
    summary = logs / f"{name}.json"
    dtype, _, compiled = precision.partition("+")
    cmd = [sys.executable, str(HERE / "run_one.py"), "--impl", impl, "--pairing", pairing, "--size", size,
           "--precision", dtype, *(["--compile_sampling"] if compiled else []),
           "--steps", str(steps), "--pairs", str(args.pairs[size]),
           "--new_tokens", str(args.new_tokens),
           "--grad_accum", str(args.grad_accum), "--lr", str(args.lr), "--threads", str(args.threads),
           "--out", str(summary)]
    with open(logs / f"{name}.log", "w") as log:
        busy_before, start = busy_cpu_seconds(), time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=job_env(args.threads))
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child alone
        wall, busy = time.perf_counter() - start, busy_cpu_seconds() - busy_before
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{name} failed (exit {proc.returncode}); see {logs / (name + '.log')}")
    result = json.loads(summary.read_text())
    if result["steps_run"] != steps:
        raise SystemExit(f"{name} ran {result['steps_run']} steps, not {steps}")
    # CPU time the rest of the machine used meanwhile: other work on 2 cores distorts the timing badly.
    foreign = max(0.0, busy - usage.ru_utime - usage.ru_stime) / wall
    print(f"  {name:44s} {wall:7.2f} s  {usage.ru_maxrss / 1024:7.1f} MiB  "
          f"mean response length {result['mean_response_length']:4.1f}  other load {foreign:4.2f} cores", flush=True)
    return {**result, "wall_seconds": wall, "max_rss_kib": usage.ru_maxrss, "other_load_cores": foreign}


def wait_for_idle(max_load: float, patience: float) -> None:
    """Start no job while other processes keep the CPU busy (up to `patience` seconds): on 2 cores,
    one busy core elsewhere slowed a 2-thread job here by up to 50x."""
    deadline = time.monotonic() + patience
    while True:
        before = busy_cpu_seconds()
        time.sleep(1.0)
        if busy_cpu_seconds() - before <= max_load or time.monotonic() > deadline:
            return
        print("    waiting for the machine to become idle", flush=True)
        time.sleep(10)


def busy_cpu_seconds() -> float:
    """Non-idle CPU seconds of the whole machine since boot, from /proc/stat (Linux)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def measure(args, pairing: str, size: str) -> dict:
    """Short and long jobs of every variant (implementation, precision), the order reversed in every
    other repeat so that drift of the machine hits all of them alike, `repeats` times."""
    short, long = args.short_steps, args.long_steps[size]
    order = variants(size, args.p3o_compile)
    for v in order:  # compiled kernels cached on disk before timing: every timed job then loads them alike
        if v[1].endswith("+compile"):
            run_job(args, v, pairing, size, short, "warm-up")
    runs = {v: [] for v in order}
    for rep in range(args.repeats):
        for v in order if rep % 2 == 0 else order[::-1]:
            runs[v].append([run_job(args, v, pairing, size, n, f"r{rep}") for n in (short, long)])
    return {v: summarise(runs[v], long - short, args.pairs[size]) for v in order}


def summarise(pairs: list[list[dict]], extra_steps: int, pairs_per_step: int) -> dict:
    per_step = [(lo["wall_seconds"] - sh["wall_seconds"]) / extra_steps for sh, lo in pairs]
    in_process = [(lo["train_seconds"] - sh["train_seconds"]) / extra_steps for sh, lo in pairs]
    s_per_step = statistics.median(per_step)
    return {
        "s_per_step": s_per_step, "s_per_step_repeats": per_step,
        "pairs_per_s": pairs_per_step / s_per_step if s_per_step > 0 else float("nan"),
        "s_per_step_in_process": statistics.median(in_process),  # a cross-check: should agree closely
        "peak_rss_mib": statistics.median(lo["max_rss_kib"] for _, lo in pairs) / 1024,
        "max_other_load_cores": max(r["other_load_cores"] for p in pairs for r in p),
        "mean_response_length": statistics.mean(r["mean_response_length"] for p in pairs for r in p),
        "runs": pairs,
    }


def best(summaries: dict, impl: str) -> tuple[str, dict]:
    """The implementation's fastest precision: (precision, its summary). A non-positive s/step (noise
    swamped the extra steps) never wins over a measured one."""
    mine = {precision: s for (name, precision), s in summaries.items() if name == impl}
    return min(mine.items(), key=lambda item: (item[1]["s_per_step"] <= 0, item[1]["s_per_step"]))


def compare(pairing: str, size: str, params: int, summaries: dict) -> dict:
    """Each side's best configuration against the other's, with the targets checked."""
    (p3o_prec, p3o), (trl_prec, trl) = best(summaries, "p3o"), best(summaries, "trl")
    measurable = p3o["s_per_step"] > 0 and trl["s_per_step"] > 0  # not when noise swamps the extra steps
    speed = trl["s_per_step"] / p3o["s_per_step"] if measurable else None  # = p3o prompts/s over TRL's
    memory = p3o["peak_rss_mib"] / trl["peak_rss_mib"]
    target, memory_target = SPEED_TARGETS.get((pairing, size)), MEMORY_TARGETS.get(size, 1.0)
    step_target = STEP_TARGETS.get((pairing, size))
    return {"pairing": pairing, "size": size, "params": params, "speed_ratio": speed, "memory_ratio": memory,
            "speed_target": target, "speed_ok": bool(speed and target and speed >= target) if target else None,
            "memory_target": memory_target, "memory_ok": memory <= memory_target,
            "step_target": step_target, "step_ok": 0 < p3o["s_per_step"] <= step_target if step_target else None,
            "p3o_precision": p3o_prec, "trl_precision": trl_prec, "p3o": p3o, "trl": trl,
            "configs": {f"{impl}-{precision}": s for (impl, precision), s in summaries.items()}}


def table(rows: list[dict]) -> str:
    head = ("| pairing | size | params | precision p3o / TRL | p3o s/step | TRL s/step | speed p3o/TRL (prompts/s) | "
            "p3o peak RSS | TRL peak RSS | memory p3o/TRL | resp. len p3o/TRL | speed target | memory target |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        p3o, trl = r["p3o"], r["trl"]
        speed = f"{r['speed_ratio']:.2f}x" if r["speed_ratio"] else "n/a (noise)"
        lines.append(
            f"| {LABELS[r['pairing']]} | {r['size']} | {r['params']:,} | {r['p3o_precision']} / {r['trl_precision']} | "
            f"{p3o['s_per_step']:.3f} | {trl['s_per_step']:.3f} | {speed} | {p3o['peak_rss_mib']:.0f} MiB | "
            f"{trl['peak_rss_mib']:.0f} MiB | {r['memory_ratio']:.2f} | {p3o['mean_response_length']:.1f} / "
            f"{trl['mean_response_length']:.1f} | {verdict('>=', r['speed_target'], r['speed_ok'], 'x')} | "
            f"{verdict('<=', r['memory_target'], r['memory_ok'])} |")
    lines += step_notes(rows) + configurations(rows)
    busy = max(s["max_other_load_cores"] for r in rows for s in r["configs"].values())
    lines.append(f"\nOther processes used up to {busy:.2f} cores during a job"
                 + (": the timings are distorted; rerun on an idle machine." if busy > 0.1 else "."))
    return "\n".join(lines)


def verdict(sign: str, target, ok, unit: str = "") -> str:
    return "none" if target is None else f"{sign} {target}{unit}: {'yes' if ok else 'NO'}"


def step_notes(rows: list[dict]) -> list[str]:
    """p3o's absolute step time where the issue sets one (its best precision)."""
    return [f"\np3o's step, {LABELS[r['pairing']]} on {r['size']} ({r['p3o_precision']}): {r['p3o']['s_per_step']:.2f} s; "
            f"{verdict('<=', r['step_target'], r['step_ok'], ' s')}" for r in rows if r["step_target"]]


def configurations(rows: list[dict]) -> list[str]:
    """Every precision of each side, where a size runs more than one (the table above keeps each side's best)."""
    rows = [r for r in rows if len(r["configs"]) > len(IMPLS)]
    if not rows:
        return []
    lines = ["", "Every configuration (each side's fastest is compared above):", "",
             "| pairing | size | implementation | precision | s/step | prompts/s | peak RSS | resp. len |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for name, s in r["configs"].items():
            impl, precision = name.split("-")
            lines.append(f"| {LABELS[r['pairing']]} | {r['size']} | {impl} | {precision} | {s['s_per_step']:.3f} | "
                         f"{s['pairs_per_s']:.2f} | {s['peak_rss_mib']:.0f} MiB | {s['mean_response_length']:.1f} |")
    return lines


def settings(args) -> dict:
    return {"prompts_per_step": args.pairs, "precisions": PRECISIONS, "new_tokens": args.new_tokens, "grad_accum": args.grad_accum,
            "learning_rate": args.lr, "beta": 0.05, "threads": args.threads, "repeats": args.repeats,
            "short_steps": args.short_steps, "long_steps": args.long_steps, "quick": args.quick,
            "p3o_compile": args.p3o_compile,
            "max_other_load": args.max_other_load, "retries": args.retries, "idle_wait": args.idle_wait,
            "versions": {pkg: version(pkg) for pkg in ("p3o", "trl", "torch", "transformers", "accelerate")},
            "commit": commit()}


def commit() -> str:
    """The p3o commit measured, marked +dirty when src/ has uncommitted changes."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=HERE.parent, capture_output=True, text=True, check=False)

    dirty = git("diff", "--quiet", "HEAD", "--", "src").returncode != 0
    return git("rev-parse", "--short", "HEAD").stdout.strip() + ("+dirty" if dirty else "")


def prepare(args) -> dict:
    """Build (or find) every size's assets once, outside every timing; a failure (e.g. smollm2's
    checkpoint not fetched) ends the run with task.py's own one-line reason."""
    proc = subprocess.run([sys.executable, str(HERE / "task.py"), *args.sizes], env=job_env(args.threads),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    if proc.returncode:
        lines = proc.stderr.strip().splitlines()
        raise SystemExit(lines[-1] if lines else f"benchmarks/task.py failed (exit {proc.returncode})")
    return {s: json.loads((asset_dir(s) / "info.json").read_text()) for s in args.sizes}


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    infos = prepare(args)
    cells = jobs(args)
    for pairing, size in sorted(set(product(args.pairings, args.sizes)) - set(cells)):
        print(f"skipped: {pairing} on {size} ({UNSUPPORTED[pairing, size]})")
    if not args.no_warmup:  # the first process after a while pays for a cold disk cache: keep it out
        print("warm-up (untimed)")
        pairing, size = cells[0]
        for impl in IMPLS:
            run_job(args, (impl, "fp32"), pairing, size, 1, "warmup")
    rows = []
    for pairing, size in cells:
        print(f"{LABELS[pairing]}, {size} ({infos[size]['policy_params']:,} parameters)")
        rows.append(compare(pairing, size, infos[size]["policy_params"], measure(args, pairing, size)))
    report = table(rows)
    print("\n" + report)
    stem = "vs_trl-quick" if args.quick else "vs_trl"
    (out / f"{stem}.json").write_text(json.dumps({"settings": settings(args), "results": rows}, indent=1))
    (out / f"{stem}.md").write_text(f"# p3o vs TRL\n\nSettings: {json.dumps(settings(args))}\n\n{report}\n")
    print(f"\nwritten: {out / (stem + '.json')}, {out / (stem + '.md')}")


if __name__ == "__main__":
    main()
