"""p3o against TRL on identical work, in one invocation (see benchmarks/README.md).

For each pairing (rloo: p3o-v1 vs TRL RLOOTrainer k=2; ppo: p3o ppo vs TRL PPOTrainer) and size
(~1M, ~10M parameters), every repeat runs a short and a long job of each implementation, the two
implementations alternating which goes first. Each job is a fresh process timed whole by this
one, so start-up (imports, model loading) cancels in the marginal cost per step:
    s/step = (t_long - t_short) / (n_long - n_short),   pairs/s = pairs_per_step / s/step,
with the median over repeats. Peak memory is the long job's ru_maxrss from os.wait4.

    python benchmarks/vs_trl.py              # the full run (~11 min on 2 idle cores)
    python benchmarks/vs_trl.py --quick      # a smoke run of every job (~1.5 min)
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from task import asset_dir  # noqa: E402  (imports nothing heavy)

IMPLS = ("p3o", "trl")
# Pairs-per-second ratio p3o/TRL that each (pairing, size) should reach; memory: p3o <= TRL everywhere.
SPEED_TARGETS = {("rloo", "1m"): 1.3, ("rloo", "10m"): 1.15, ("ppo", "1m"): 1.5, ("ppo", "10m"): 1.5}
LABELS = {"rloo": "p3o-v1 vs TRL RLOO (k=2)", "ppo": "p3o ppo vs TRL PPO"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairings", default="rloo,ppo", help="Comma-separated: rloo, ppo.")
    p.add_argument("--sizes", default="1m,10m", help="Comma-separated: 1m, 10m (benchmarks/task.py).")
    p.add_argument("--repeats", type=int, default=3, help="Alternating repeats; the median is reported.")
    p.add_argument("--short_steps", type=int, default=2, help="Steps of the short job.")
    p.add_argument("--long_steps", default="1m:42,10m:22",
                   help="Steps of the long job, per size (size:steps,...); the extra steps over --short_steps "
                        "are what is measured.")
    p.add_argument("--pairs", type=int, default=16, help="Prompts per step (a pair of responses each for rloo).")
    p.add_argument("--new_tokens", type=int, default=32, help="Maximum new tokens per response.")
    p.add_argument("--grad_accum", type=int, default=1, help="Micro-batches per optimizer step, both sides.")
    p.add_argument("--lr", type=float, default=1e-4, help="Learning rate, both sides (constant schedule).")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every job.")
    p.add_argument("--max_other_load", type=float, default=0.15,
                   help="A job during which other processes used more cores than this on average is rerun.")
    p.add_argument("--retries", type=int, default=2, help="Reruns of a disturbed job before keeping it anyway.")
    p.add_argument("--idle_wait", type=float, default=300,
                   help="Seconds to wait, before each job, for other processes to leave the CPU idle.")
    p.add_argument("--no_warmup", action="store_true", help="Skip the untimed first job of each implementation.")
    p.add_argument("--quick", action="store_true",
                   help="Smoke run: 1 repeat, 1 vs 3 steps, 4 pairs, 8 new tokens; numbers mean nothing.")
    p.add_argument("--out_dir", default=str(HERE.parent / "runs" / "bench"))
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.short_steps, args.long_steps, args.pairs, args.new_tokens = 1, 1, "1m:3,10m:3", 4, 8
    args.pairings, args.sizes = args.pairings.split(","), args.sizes.split(",")
    args.long_steps = {k: int(v) for k, v in (item.split(":") for item in args.long_steps.split(","))}
    for size in args.sizes:
        if args.long_steps.get(size, 0) <= args.short_steps:
            p.error(f"--long_steps for {size} must exceed --short_steps {args.short_steps}")
    return args


def job_env(threads: int) -> dict:
    """The same thread pools and offline settings for every job."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
            "PYTHONHASHSEED": "0"}


def run_job(args, impl: str, pairing: str, size: str, steps: int, tag: str) -> dict:
    """`spawn`, again (up to --retries times) while other processes took CPU time during the job."""
    for attempt in range(args.retries + 1):
        wait_for_idle(args.max_other_load, args.idle_wait)
        result = spawn(args, impl, pairing, size, steps, tag)
        if result["other_load_cores"] <= args.max_other_load:
            break
        print(f"    disturbed by other processes (attempt {attempt + 1})", flush=True)
    return result


def spawn(args, impl: str, pairing: str, size: str, steps: int, tag: str) -> dict:
    """One run_one.py process: wall time of the whole process, its peak RSS, and its own summary."""
    logs = Path(args.out_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    name = f"{pairing}-{size}-{impl}-{steps}steps-{tag}"
    summary = logs / f"{name}.json"
    cmd = [sys.executable, str(HERE / "run_one.py"), "--impl", impl, "--pairing", pairing, "--size", size,
           "--steps", str(steps), "--pairs", str(args.pairs), "--new_tokens", str(args.new_tokens),
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
    print(f"  {name:34s} {wall:7.2f} s  {usage.ru_maxrss / 1024:7.1f} MiB  "
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
    """Short and long jobs of both implementations, alternating which goes first, `repeats` times."""
    short, long = args.short_steps, args.long_steps[size]
    runs = {impl: [] for impl in IMPLS}
    for rep in range(args.repeats):
        for impl in IMPLS if rep % 2 == 0 else IMPLS[::-1]:
            pair = [run_job(args, impl, pairing, size, n, f"r{rep}") for n in (short, long)]
            runs[impl].append(pair)
    return {impl: summarise(runs[impl], long - short, args.pairs) for impl in IMPLS}


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


def compare(pairing: str, size: str, params: int, result: dict) -> dict:
    p3o, trl = result["p3o"], result["trl"]
    measurable = p3o["s_per_step"] > 0 and trl["s_per_step"] > 0  # not when noise swamps the extra steps
    speed = trl["s_per_step"] / p3o["s_per_step"] if measurable else None  # = p3o pairs/s over TRL pairs/s
    memory = p3o["peak_rss_mib"] / trl["peak_rss_mib"]
    target = SPEED_TARGETS.get((pairing, size))
    return {"pairing": pairing, "size": size, "params": params, "speed_ratio": speed, "memory_ratio": memory,
            "speed_target": target, "speed_ok": bool(speed and target and speed >= target),
            "memory_ok": memory <= 1.0, **result}


def table(rows: list[dict]) -> str:
    head = ("| pairing | size | params | p3o s/step | TRL s/step | speed p3o/TRL (pairs/s) | p3o peak RSS | "
            "TRL peak RSS | memory p3o/TRL | resp. len p3o/TRL | speed target | memory target |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        p3o, trl = r["p3o"], r["trl"]
        speed = f"{r['speed_ratio']:.2f}x" if r["speed_ratio"] else "n/a (noise)"
        lines.append(
            f"| {LABELS[r['pairing']]} | {r['size']} | {r['params']:,} | {p3o['s_per_step']:.3f} | "
            f"{trl['s_per_step']:.3f} | {speed} | {p3o['peak_rss_mib']:.0f} MiB | "
            f"{trl['peak_rss_mib']:.0f} MiB | {r['memory_ratio']:.2f} | {p3o['mean_response_length']:.1f} / "
            f"{trl['mean_response_length']:.1f} | >= {r['speed_target']}x: {'yes' if r['speed_ok'] else 'NO'} | "
            f"<= 1: {'yes' if r['memory_ok'] else 'NO'} |")
    busy = max(r[impl]["max_other_load_cores"] for r in rows for impl in IMPLS)
    lines.append(f"\nOther processes used up to {busy:.2f} cores during a job"
                 + (": the timings are distorted; rerun on an idle machine." if busy > 0.1 else "."))
    return "\n".join(lines)


def settings(args) -> dict:
    return {"pairs_per_step": args.pairs, "new_tokens": args.new_tokens, "grad_accum": args.grad_accum,
            "learning_rate": args.lr, "beta": 0.05, "threads": args.threads, "repeats": args.repeats,
            "short_steps": args.short_steps, "long_steps": args.long_steps, "quick": args.quick,
            "max_other_load": args.max_other_load, "retries": args.retries, "idle_wait": args.idle_wait,
            "versions": {pkg: version(pkg) for pkg in ("p3o", "trl", "torch", "transformers", "accelerate")},
            "commit": commit()}


def commit() -> str:
    """The p3o commit measured, marked +dirty when src/ has uncommitted changes."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=HERE.parent, capture_output=True, text=True, check=False)

    dirty = git("diff", "--quiet", "HEAD", "--", "src").returncode != 0
    return git("rev-parse", "--short", "HEAD").stdout.strip() + ("+dirty" if dirty else "")


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(HERE / "task.py"), *args.sizes], check=True, env=job_env(args.threads),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # built once, outside every timing
    infos = {s: json.loads((asset_dir(s) / "info.json").read_text()) for s in args.sizes}
    if not args.no_warmup:  # the first process after a while pays for a cold disk cache: keep it out
        print("warm-up (untimed)")
        for impl in IMPLS:
            run_job(args, impl, args.pairings[0], args.sizes[0], 1, "warmup")
    rows = []
    for pairing in args.pairings:
        for size in args.sizes:
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
