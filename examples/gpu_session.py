"""The Python half of ``examples/gpu_session.sh`` (issue 17): one lent-GPU call that measures speed
and continues training both shipped priors, and the CPU-side steps before and after it.

    python examples/gpu_session.py pack        # CPU, before: training packs into .gpu-pack/
    python examples/gpu_session.py travel-size # CPU, before: what the device call carries (<= 64 MiB)
    python examples/gpu_session.py speed  ...  # device: the benchmark suite + training probe -> bench.json
    python examples/gpu_session.py train  ...  # device: both trainings at once -> <name>.tar every minute
    python examples/gpu_session.py verdict ... # device: plateau verdicts, the $OUT check, the tables
    python examples/gpu_session.py unpack ...  # CPU, after: extract the returned priors, print the verdicts

``gpu_session.sh`` calls the device-side commands with deadlines computed from the session's start;
``--dry`` shrinks every count so the whole session runs on a CPU in minutes (tests/test_gpu_session.py).
Everything the call returns lies in $OUT (at most 8 files, 16 MiB each): session.log, session.json,
bench.json and one <prior>.tar per training (config.json, weights.safetensors, loss.csv).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "klip_med" / "priors" / "shipped"
PACK_DIR = ROOT / ".gpu-pack"
NAMES = ("mri-brain-flair-128", "ct-abdomen-128")
MANIFESTS = {"mri-brain-flair-128": "data_manifests/lgg_flair_128.json", "ct-abdomen-128": "data_manifests/ct_L067.json"}
MiB = 1024 * 1024
RETURN_FILES, RETURN_FILE_BYTES, RETURN_BYTES, TRAVEL_BYTES = 8, 16 * MiB, 64 * MiB, 64 * MiB
# what the device image holds (the device tool's KINDS.md, read 2026-11-17) and what the call carries as wheels
DEVICE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils
execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet
httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax
jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib
mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink
nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax
opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp
""".split())
CARRIED_WHEELS = ("monai", "deepinv", "natsort", "pydicom", "highdicom", "pyjpegls", "nibabel")
# the training schedule of a continued prior (docs/gpu-session.md): fresh AdamW, 200-step warm-up,
# then the shipped runs' constant rate; EMA 0.999 starting from the shipped EMA weights
LR, WARMUP, LR_FLOOR, EMA, NOMINAL_STEPS, SCRATCH_WARMUP = 2e-4, 200, 1.0, 0.999, 200000, 500


def log(message: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


def update_session(out: Path, **fields) -> dict:
    """Merge ``fields`` into ``out/session.json`` (written atomically)."""
    from klip_med.io.json_files import write_json

    path = out / "session.json"
    doc = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"format": "klip-med-gpu-session"}
    doc.update(fields)
    write_json(path, doc)
    return doc


# ------------------------------------------------------------------ before the call (CPU)

SESSION_MODULES = ("klip_med.bench", "klip_med.bench.compare_deepinv", "klip_med.pipeline", "klip_med.pipeline.demo",
                   "klip_med.io", "klip_med.physics", "klip_med.sampling.deepinv_adapter", "klip_med.priors.train",
                   "klip_med.priors.plateau", "klip_med.cli", "klip_med.cli.train", "klip_med.cli.bench")
"""What the session's processes import (the benchmark suite, the probe, ``klip-med train``)."""


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def import_gaps(modules=None) -> list[str]:
    """Imported third-party modules (of ``sys.modules`` by default) that neither the device image
    (:data:`DEVICE_PACKAGES`) nor a carried wheel (:data:`CARRIED_WHEELS`) provides, as
    ``module (distribution)``."""
    from importlib.metadata import packages_distributions

    owners = packages_distributions()
    have = {_norm(n) for n in (*DEVICE_PACKAGES, *CARRIED_WHEELS, "klip-med")}
    gaps = []
    for name in sorted({m.split(".")[0] for m in (sys.modules if modules is None else modules)}):
        dists = owners.get(name, [])
        if name in sys.stdlib_module_names or not dists or any(_norm(d) in have for d in dists):
            continue
        gaps.append(f"{name} ({', '.join(sorted(set(dists)))})")
    return gaps


_BLOCKER = """
import importlib, importlib.abc, sys
blocked = set(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"No module named {name!r} (not on the device machine)")
sys.meta_path.insert(0, Block())
for module in sys.argv[2].split(","):
    importlib.import_module(module)
"""


def cmd_import_check(args) -> int:
    """Import the session's modules here; those imported modules the device lacks must be optional:
    a second interpreter imports everything again with them blocked."""
    import importlib

    for module in SESSION_MODULES:
        importlib.import_module(module)
    gaps = import_gaps()
    names = sorted({gap.split(" ")[0] for gap in gaps})
    if names:
        blocked = subprocess.run([sys.executable, "-c", _BLOCKER, ",".join(names), ",".join(SESSION_MODULES)],
                                 capture_output=True, text=True, cwd=ROOT)
        if blocked.returncode != 0:
            log(f"imports: the session needs a module the device machine lacks (carry its wheel, "
                f"CARRIED_WHEELS):\n{blocked.stderr[-1500:]}")
            return 1
        log(f"imports: optional here, absent there (imported only when installed): {', '.join(gaps)}")
    log("imports: every module the session needs is on the device image or carried")
    return 0


def cmd_wheels(args) -> int:
    """The carried wheels as ``name==version`` of this environment (what --prepare downloads)."""
    from importlib.metadata import version

    print(" ".join(f"{n}=={version(n)}" for n in CARRIED_WHEELS))
    return 0



def cmd_pack(args) -> int:
    from klip_med.data.manifest import read_manifest
    from klip_med.priors.train_data import write_train_pack

    args.out_dir.mkdir(parents=True, exist_ok=True)
    wanted = {args.name: args.manifest} if args.manifest else {n: ROOT / MANIFESTS[n] for n in args.names}
    for name, manifest_path in wanted.items():
        target = args.out_dir / f"{name}.npz"
        manifest = read_manifest(manifest_path, args.data_root)
        header = write_train_pack(manifest, target)
        log(f"{target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}: {header['provenance']['n_slices']} "
            f"slices, {target.stat().st_size / MiB:.2f} MiB, images sha256 {header['images_sha256'][:12]}")
    return 0


def travel_bytes(carry: list[str]) -> tuple[int, dict[str, int]]:
    """Bytes of what a device call sends: tracked and untracked-not-ignored files, plus ``carry``."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    tree = sum((ROOT / f).stat().st_size for f in listed if f and (ROOT / f).is_file())
    parts = {"working tree": tree}
    for path in carry:
        p = ROOT / path
        parts[path] = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else (
            p.stat().st_size if p.is_file() else 0)
    return sum(parts.values()), parts


def cmd_travel_size(args) -> int:
    total, parts = travel_bytes(args.carry)
    for name, size in parts.items():
        log(f"  {name}: {size / MiB:.2f} MiB")
    ok = total <= TRAVEL_BYTES
    log(f"travels: {total / MiB:.2f} MiB of {TRAVEL_BYTES / MiB:.0f} MiB -> {'fits' if ok else 'TOO LARGE'}")
    return 0 if ok else 1


# ------------------------------------------------------------------ phase 0: the session record


def cmd_setup(args) -> int:
    import torch

    from klip_med.bench.timing import environment

    args.out.mkdir(parents=True, exist_ok=True)
    started = datetime.fromtimestamp(args.start, timezone.utc).isoformat(timespec="seconds")
    env = environment(torch.device(args.device))
    update_session(args.out, mode=args.mode, started_utc=started, budget_s=args.budget,
                   timeline_s={"speed_until": args.speed_end, "train_until": args.train_end, "end": args.budget},
                   environment=env)
    log(f"[setup] {env['device_name']}, torch {env['torch_version']}, monai {env['monai_version']}, "
        f"deepinv {env['deepinv_version']}, python {env['python_version']}")
    return 0


# ------------------------------------------------------------------ phase 1: speed


def speed_entries(prior: str, device: str, dry: bool, backend: str):
    """The benchmarks of a session, most important first (issue 17's list)."""
    from klip_med.bench import BenchSettings, SuiteEntry

    size, samples, steps = (None, 2, 3) if dry else (128, 4, 100)
    base = dict(prior=prior, device=device, image_size=size, samples=samples, steps=steps,
                repeats=1 if dry else 3, warmup=1, compare_repeats=1 if dry else 2, compare=())
    fast_net = dict(dtype="bfloat16", channels_last=True, tf32=True)
    big, bigger = (2, 3) if dry else (8, 32)
    compiled = dict(compile=True, compile_backend=backend, warmup=2, check_bf16=False, **fast_net)
    spec = [
        ("fast-f32-eager", dict(sampler="fast", compare=("trajectory",)), 0,
         "float32 eager baseline; KLIP overhead; stored-trajectory memory"),
        ("dps-f32-eager", dict(sampler="dps", compare=("deepinv",)), 0,
         "our DPS against deepinv's DPS on the same prior, steps and samples (seconds and PSNR)"),
        ("fast-bf16-eager", dict(sampler="fast", dtype="bfloat16"), 0, "bf16 map error against float32"),
        ("dps-bf16-eager", dict(sampler="dps", dtype="bfloat16"), 0, "bf16 map error against float32 (DPS)"),
        (f"fast-bf16-eager-B{big}", dict(sampler="fast", batch=big, check_bf16=False, **fast_net), 0,
         "slice batching, eager"),
        (f"fast-bf16-eager-B{bigger}", dict(sampler="fast", batch=bigger, check_bf16=False, **fast_net), 0,
         "slice batching, eager"),
        ("fast-bf16-compiled", dict(sampler="fast", compile_mode="default", **compiled), 45, "torch.compile"),
        ("fast-bf16-cudagraphs", dict(sampler="fast", compile_mode="reduce-overhead", **compiled), 45,
         "torch.compile with CUDA graphs (reduce-overhead)"),
        ("dps-bf16-cudagraphs", dict(sampler="dps", compile_mode="reduce-overhead", **compiled), 60,
         "DPS (forward + backward) with CUDA graphs"),
        (f"fast-bf16-cudagraphs-B{big}", dict(sampler="fast", compile_mode="reduce-overhead", batch=big,
                                              **compiled), 45, "slice batching with CUDA graphs"),
        (f"fast-bf16-cudagraphs-B{bigger}", dict(sampler="fast", compile_mode="reduce-overhead", batch=bigger,
                                                 **compiled), 30, "slice batching with CUDA graphs"),
    ]
    return [SuiteEntry(label, BenchSettings(**{**base, **extra}), min_s, note) for label, extra, min_s, note in spec]


def cmd_speed(args) -> int:
    import torch

    from klip_med.bench import format_table, run_suite, train_throughput
    from klip_med.bench.timing import environment
    from klip_med.priors.train_step import TrainOptions

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench.json"
    entries = [e for e in speed_entries(args.prior, args.device, args.dry, args.compile_backend)
               if not args.only or e.label in args.only]
    extra = {"environment": environment(torch.device(args.device)), "dry_run": args.dry}
    doc = run_suite([e for e in entries if not e.settings.compile], path, deadline=args.deadline, log=log,
                    extra=extra)
    # the training probe: klip-med train's own step (bf16 autocast on CUDA), eager, at rising batch sizes
    batches = (2, 4) if args.dry else (64, 128, 256)
    log(f"[probe] training step of {args.probe_prior} at batch {batches}")
    try:
        probe = train_throughput(args.probe_prior, args.device, batches, steps=1 if args.dry else 5,
                                 warmup=1 if args.dry else 2, options=TrainOptions(), image_size=args.probe_size,
                                 deadline=args.deadline + 60)
    except Exception as exc:  # noqa: BLE001 - the session goes on; the training phase has a fallback batch
        probe = {"error": f"{type(exc).__name__}: {exc}", "chosen_batch": None}
    log(f"[probe] chosen batch {probe.get('chosen_batch')}: {probe.get('reason', probe.get('error'))}")
    update_session(args.out, speed={"train_batch": probe.get("chosen_batch")})
    doc = run_suite([e for e in entries if e.settings.compile], path, deadline=args.deadline, log=log,
                    extra={"train_probe": probe}, doc=doc)
    print(format_table(doc["summary"]), flush=True)
    update_session(args.out, speed={"entries": {e["label"]: e["status"] for e in doc["entries"]},
                                    "train_batch": probe.get("chosen_batch")})
    return 0


# ------------------------------------------------------------------ phase 2: training


def parse_job(text: str) -> dict:
    """``NAME:PACK:INIT[:PRESET]`` -> a training job; INIT ``-`` (or empty) trains from scratch."""
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise SystemExit(f"--job: expected NAME:PACK:INIT[:PRESET], found {text!r}")
    init = parts[2] if parts[2] not in ("", "-") else None
    return {"name": parts[0], "pack": parts[1], "init": init, "preset": parts[3] if len(parts) == 4 else None}


def default_jobs() -> list[str]:
    return [f"{n}:{PACK_DIR / (n + '.npz')}:{SHIPPED / n}:{n}" for n in NAMES]


def train_command(job: dict, args, batch: int, minutes: float, compile_on: bool) -> list[str]:
    """``klip-med train`` continuing ``job['init']`` (or from scratch: the shipped runs' 500-step warm-up)."""
    seed, warmup, init = 0, SCRATCH_WARMUP, []
    if job["init"]:
        init_cfg = json.loads((Path(job["init"]) / "config.json").read_text(encoding="utf-8"))
        seed = int((init_cfg.get("training") or {}).get("steps_trained") or 0)  # new draws in every session
        warmup, init = WARMUP, ["--init-from", job["init"]]
    cmd = [sys.executable, "-m", "klip_med", "train", "--pack", job["pack"], *init,
           "--name", job["name"], "--out", str(args.work / job["name"]), "--device", args.device,
           "--steps", str(args.steps), "--batch-size", str(batch), "--lr", str(LR), "--warmup", str(warmup),
           "--final-lr-fraction", str(args.lr_floor), "--ema-decay", str(EMA), "--seed", str(seed),
           "--log-every", str(10 if args.dry else 50), "--checkpoint-every", "1000000000",
           "--checkpoint-minutes", str(args.checkpoint_minutes), "--time-limit-min", f"{minutes:.3f}",
           "--weights-dtype", "float16", "--publish", str(args.out / f"{job['name']}.tar"), "--no-progress"]
    if job["preset"]:
        cmd += ["--preset", job["preset"]]
    if args.dry:
        cmd += ["--stop-after", str(args.dry_steps)]
    if compile_on:
        cmd += ["--compile", "--compile-mode", args.compile_mode, "--compile-backend", args.compile_backend]
    if args.device.startswith("cuda"):
        cmd += ["--fused-adam"]
    return cmd


def cmd_train(args) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    jobs = [parse_job(j) for j in (args.job or default_jobs())]
    batch, reason = args.batch, "--batch"
    if batch is None:
        bench = args.out / "bench.json"
        probe = json.loads(bench.read_text(encoding="utf-8")).get("train_probe", {}) if bench.is_file() else {}
        chosen = probe.get("chosen_batch")
        batch, reason = (min(chosen, args.max_batch), f"probe: {probe.get('reason')}") if chosen else (
            args.fallback_batch, "no probe result: the fallback batch")
    shape = "constant" if args.lr_floor == 1.0 else f"cosine to {args.lr_floor} x lr at step {args.steps}"
    log(f"[train] batch {batch} ({reason}); lr {LR} after a {WARMUP}-step warm-up, then {shape}; EMA {EMA}")
    running: dict[str, dict] = {}

    def launch(job: dict, compile_on: bool) -> None:
        minutes = max(0.05, (args.deadline - time.time()) / 60.0)
        cmd = train_command(job, args, batch, minutes, compile_on)
        logfile = open(args.work / f"{job['name']}.log", "a", encoding="utf-8")  # noqa: SIM115 - closed below
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        running[job["name"]] = {"job": job, "proc": proc, "log": logfile, "compile": compile_on,
                                "started": time.time(), "command": cmd[1:]}
        log(f"[train] {job['name']}: started ({'compiled' if compile_on else 'eager'}, {minutes:.2f} min)")

    for job in jobs:
        launch(job, compile_on=not args.no_compile)
    results: dict[str, dict] = {}
    last_report = time.time()
    while running:
        time.sleep(0.5 if args.dry else 2.0)
        for name, run in list(running.items()):
            code = run["proc"].poll()
            if code is None and time.time() > args.deadline + args.grace:
                log(f"[train] {name}: past the deadline, stopping it")
                run["proc"].send_signal(signal.SIGTERM)
                try:
                    code = run["proc"].wait(10)
                except subprocess.TimeoutExpired:
                    run["proc"].kill()
                    code = run["proc"].wait()
            if code is None:
                continue
            run["log"].close()
            del running[name]
            tail = (args.work / f"{name}.log").read_text(encoding="utf-8", errors="replace")[-3000:]
            record = {"command": run["command"], "returncode": code, "compile": run["compile"],
                      "seconds": round(time.time() - run["started"], 1), "log_tail": tail}
            if code != 0 and run["compile"] and time.time() < args.deadline - 30:
                log(f"[train] {name}: exited {code} compiled; resuming eagerly from its checkpoint\n{tail[-800:]}")
                results.setdefault(name, {})["compiled_attempt"] = record
                launch(run["job"], compile_on=False)
                continue
            results.setdefault(name, {}).update(record)
            summary = _last_json(tail)
            results[name]["summary"] = summary
            log(f"[train] {name}: exited {code}; {summary}")
        if time.time() - last_report > (5 if args.dry else 60):
            last_report = time.time()
            for name in running:
                rows = _loss_rows(args.work / name / "loss.csv")
                if rows:
                    log(f"[train] {name}: step {rows[-1][0]}, loss {rows[-1][1]:.5f}")
    update_session(args.out, train={"batch": batch, "batch_reason": reason, "lr": LR, "warmup_steps": WARMUP,
                                    "final_lr_fraction": args.lr_floor, "schedule_steps": args.steps,
                                    "ema_decay": EMA, "jobs": results})
    return 0 if all(r.get("returncode") == 0 for r in results.values()) else 1


def _last_json(text: str) -> dict | None:
    """The summary ``klip-med train`` prints last (a JSON object), if any."""
    start = text.rfind("\n{")
    try:
        return json.loads(text[start + 1:] if start >= 0 else text)
    except json.JSONDecodeError:
        return None


def _loss_rows(path: Path) -> list[tuple[int, float]]:
    from klip_med.errors import KLIPMedError
    from klip_med.priors.plateau import read_loss_csv

    try:
        return read_loss_csv(path)
    except KLIPMedError:
        return []


# ------------------------------------------------------------------ phase 3: verdicts and the $OUT check


def check_out(out: Path) -> list[str]:
    """What would not come back from ``out`` (device README: 8 files, 16 MiB each, 64 MiB, 2 folders deep)."""
    files = [p for p in out.rglob("*") if p.is_file()]
    problems = []
    if len(files) > RETURN_FILES:
        problems.append(f"{len(files)} files, more than {RETURN_FILES}: {[f.name for f in files]}")
    problems += [f"{f.name}: {f.stat().st_size / MiB:.1f} MiB, more than 16" for f in files
                 if f.stat().st_size > RETURN_FILE_BYTES]
    total = sum(f.stat().st_size for f in files)
    if total > RETURN_BYTES:
        problems.append(f"{total / MiB:.1f} MiB in all, more than 64")
    problems += [f"{f}: more than 2 folders down" for f in files if len(f.relative_to(out).parts) > 3]
    return problems


def cmd_verdict(args) -> int:
    from klip_med.bench import format_table
    from klip_med.priors.plateau import plateau

    verdicts = {}
    for tar in sorted(args.out.glob("*.tar")):
        with tarfile.open(tar) as archive:
            member = next((m for m in archive.getmembers() if m.name.endswith("/loss.csv")), None)
            text = archive.extractfile(member).read().decode("utf-8") if member else ""
        rows = [(int(s), float(v)) for s, v in (line.split(",") for line in text.split()[1:])]
        verdict = plateau(rows).to_dict() if rows else {"plateaued": None, "reason": "no loss.csv"}
        verdicts[tar.stem] = verdict
        log(f"[verdict] {tar.stem}: {verdict['reason']}")
    problems = check_out(args.out)
    for problem in problems:
        log(f"[out] WARNING: {problem}")
    doc = update_session(args.out, verdicts=verdicts, out_problems=problems,
                         finished_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    bench = args.out / "bench.json"
    if bench.is_file():
        print(format_table(json.loads(bench.read_text(encoding="utf-8"))["summary"]), flush=True)
    for name, job in (doc.get("train") or {}).get("jobs", {}).items():
        print(f"{name}: {job.get('summary')}", flush=True)
    return 0


# ------------------------------------------------------------------ after the call (CPU)


def cmd_unpack(args) -> int:
    """Extract the returned tars into ``--into`` and print each prior's steps and plateau verdict."""
    from klip_med.priors import load
    from klip_med.priors.plateau import plateau, read_loss_csv

    args.into.mkdir(parents=True, exist_ok=True)
    for tar in sorted(args.returned.glob("*.tar")):
        with tarfile.open(tar) as archive:
            archive.extractall(args.into, filter="data")
        folder = args.into / tar.stem
        prior = load(folder)
        t = prior.config.training
        rows = read_loss_csv(folder / "loss.csv")
        log(f"{folder}: {t['steps_trained']} steps ({t['runs'][-1]['steps']} this session, "
            f"{t['runs'][-1].get('images_per_second')} images/s), final loss {t['final_loss']}; "
            f"{plateau(rows).reason if rows else 'no loss curve'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pk = sub.add_parser("pack", help="training packs of the shipped priors' train splits")
    pk.add_argument("--data-root", default=os.environ.get("KLIP_MED_DATA_ROOT", "/work/shared/data"))
    pk.add_argument("--out-dir", type=Path, default=PACK_DIR)
    pk.add_argument("--names", nargs="+", default=list(NAMES), choices=list(NAMES))
    pk.add_argument("--manifest", type=Path, help="another manifest (with --name): e.g. a 256x256 LGG one")
    pk.add_argument("--name", help="the pack's (and prior's) name with --manifest")
    pk.set_defaults(run=cmd_pack)
    sub.add_parser("import-check", help="are the session's imports on the device image or carried?").set_defaults(
        run=cmd_import_check)
    sub.add_parser("wheels", help="the wheels to carry, name==version").set_defaults(run=cmd_wheels)
    ts = sub.add_parser("travel-size", help="bytes a device call would carry")
    ts.add_argument("--carry", nargs="*", default=[".whl", ".gpu-pack"])
    ts.set_defaults(run=cmd_travel_size)
    st = sub.add_parser("setup", help="start session.json: the machine and the timeline")
    st.add_argument("--out", type=Path, required=True)
    st.add_argument("--device", default="cuda")
    st.add_argument("--mode", default="device")
    st.add_argument("--start", type=float, default=time.time())
    for flag in ("--budget", "--speed-end", "--train-end"):
        st.add_argument(flag, type=float, required=True)
    st.set_defaults(run=cmd_setup)
    for name, run in (("speed", cmd_speed), ("train", cmd_train), ("verdict", cmd_verdict)):
        q = sub.add_parser(name)
        q.add_argument("--out", type=Path, required=True)
        q.add_argument("--device", default="cuda")
        q.add_argument("--deadline", type=float, default=time.time() + 3600, help="time.time() to end by")
        q.add_argument("--dry", action="store_true", help="tiny counts: a CPU dry run")
        q.add_argument("--compile-backend", default="inductor")
        q.set_defaults(run=run)
        if name == "speed":
            q.add_argument("--prior", default="mri-brain-flair-128")
            q.add_argument("--probe-prior", default="mri-brain-flair-128")
            q.add_argument("--only", nargs="*", help="run only these entry labels (a later session's gaps)")
            q.add_argument("--probe-size", type=int, help="the probe's image side (default: the prior's)")
        if name == "train":
            q.add_argument("--work", type=Path, required=True, help="checkpoints (not returned)")
            q.add_argument("--job", action="append", help="NAME:PACK:INIT[:PRESET] (default: both shipped priors)")
            q.add_argument("--batch", type=int, help="batch size (default: the probe's choice in bench.json)")
            q.add_argument("--max-batch", type=int, default=256)
            q.add_argument("--fallback-batch", type=int, default=128)
            q.add_argument("--compile-mode", default="default")
            q.add_argument("--no-compile", action="store_true")
            q.add_argument("--checkpoint-minutes", type=float, default=1.0)
            q.add_argument("--grace", type=float, default=20.0, help="seconds past the deadline before a kill")
            q.add_argument("--dry-steps", type=int, default=6)
            q.add_argument("--steps", type=int, default=NOMINAL_STEPS,
                           help="the schedule's length in this session's steps (a cool-down: with --lr-floor)")
            q.add_argument("--lr-floor", type=float, default=LR_FLOOR,
                           help="final_lr_fraction: 1 = constant after the warm-up; 0.1 = cosine cool-down")
    up = sub.add_parser("unpack", help="extract the returned priors and print their verdicts")
    up.add_argument("returned", type=Path, help="the folder the device call's files came back to")
    up.add_argument("--into", type=Path, default=ROOT / "runs" / "gpu-session")
    up.set_defaults(run=cmd_unpack)
    args = p.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
