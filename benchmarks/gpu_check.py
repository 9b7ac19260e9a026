"""`make gpu-check`: one command that checks a CUDA machine end to end, writing one JSON and a readable summary.

    make gpu-check                                    # after `make setup`, on a GPU node
    make gpu-check PYTHON=python3                     # an existing environment with its own CUDA-matched torch
    python benchmarks/gpu_check.py --device cpu       # the CPU smoke run CI does: same parts, tiny sizes

Parts, each a subprocess with a time limit and its output kept in WORK_DIR/logs/PART.log:
  demo_data      the demo shards, from Debian's Fashion-MNIST or the copy in demo_data/: no network needed
  demo_train     torchrun --nproc_per_node=<visible GPUs> experiment=demo, dist.device=cuda (nccl) and bf16
  demo_zeroshot  contrastive-eval zeroshot on the held-out split; on CUDA it passes at acc1 >= 0.80
  train_step     benchmarks/train_step.py: ViT-B/16 in bf16, ours against open_clip's loop: samples/s, MFU, memory
  loss_memory    benchmarks/loss_memory.py at local batches 16k and 32k: ours against open_clip's ClipLoss, SigLipLoss
  device_decode  benchmarks/device_decode.py: data.decode_device=cuda against the CPU workers (images/s, 4 workers,
                 256 px JPEGs) and its pixel error against the CPU path, decoded on the GPU (MAE < 0.5)

The whole run keeps within --time-budget (8 minutes): each part's limit is cut to the time left, and a part
that finds none left is skipped, which fails the check. Exit status 0 when every part passed, 1 when one did
not, 2 when it cannot start (no CUDA device without --device cpu, or missing packages).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from gpu_check_parts import PARTS, SIZES, CheckFailed, Context, summary_line

REPO = Path(__file__).resolve().parents[1]
# pyproject's dependencies -> the module each provides (tests/test_gpu_check.py keeps the two lists equal).
REQUIRED_PACKAGES = {
    "torch": "torch", "torchvision": "torchvision", "open_clip_torch": "open_clip", "timm": "timm",
    "webdataset": "webdataset", "hydra-core": "hydra", "omegaconf": "omegaconf", "wandb": "wandb",
    "safetensors": "safetensors", "numpy": "numpy", "pillow": "PIL", "tqdm": "tqdm", "scikit-learn": "sklearn",
    "matplotlib": "matplotlib",
}
DEMO_GLOBAL_BATCH = 256  # conf/experiment/demo.yaml's data.batch_size: the number of ranks must divide it
STOP_GRACE_SECONDS = 10
PART_TAG = "CONTRASTIVE_GPU_CHECK_PART"  # in every part's environment, inherited by all it starts


@dataclass
class PartResult:
    status: str  # passed | failed | timed out | skipped
    seconds: float
    command: str | None
    log: str | None
    returncode: int | None
    reason: str  # why it did not pass; empty when it did
    figures: dict


def missing_packages() -> list[str]:
    return [package for package, module in REQUIRED_PACKAGES.items() if importlib.util.find_spec(module) is None]


def git_commit() -> tuple[str, bool | None]:
    """(HEAD's hash or "unknown", whether tracked files differ from it)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown", None
    return head.stdout.strip(), bool(status.stdout.strip())


def ranks_for(visible_gpus: int) -> int:
    """The most GPUs, up to those visible, whose count divides the demo's global batch."""
    return max(n for n in range(1, max(1, visible_gpus) + 1) if DEMO_GLOBAL_BATCH % n == 0)


def tagged_processes(tag: str) -> list[int]:
    """Live processes whose environment carries PART_TAG=tag (read from /proc; a zombie's reads as empty)."""
    needle = f"{PART_TAG}={tag}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or another user's
            continue
    return found


def stop_part(process: subprocess.Popen, tag: str) -> None:
    """SIGTERM the part and everything it started, then SIGKILL whatever is left after a grace period.

    torchrun puts its workers in sessions of their own, so the part's process group does not reach them; the tag
    every started process inherits does. The group is signalled too, for anything that dropped the tag.
    """
    def alive() -> set[int]:
        running = process.poll() is None  # polling also reaps the part's own process once it exits
        return set(tagged_processes(tag)) | ({process.pid} if running else set())

    for signum in (signal.SIGTERM, signal.SIGKILL):
        remaining = alive()
        if not remaining:
            break
        for pid in remaining:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signum)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while time.monotonic() < deadline and alive():
            time.sleep(0.1)
    process.wait()


class Runner:
    """Runs parts one after another within one deadline; every part in a session of its own, tagged."""

    def __init__(self, context: Context, budget_seconds: float) -> None:
        self.context = context
        self.deadline = time.monotonic() + budget_seconds
        python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # no install needed
        self.env = {**os.environ, "PYTHONPATH": python_path, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}

    def run(self, name: str, command: list[str], limit_seconds: float, read_figures) -> PartResult:
        left = self.deadline - time.monotonic()
        if left < 1:
            return PartResult("skipped", 0.0, shlex.join(command), None, None, "the time budget was spent", {})
        log_path = self.context.work_dir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        tag = f"{os.getpid()}.{name}"
        start = time.monotonic()
        with log_path.open("w") as log:
            log.write(f"$ {shlex.join(command)}\n")
            log.flush()
            process = subprocess.Popen(command, cwd=REPO, env={**self.env, PART_TAG: tag}, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            try:
                returncode = process.wait(timeout=min(limit_seconds, left))
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                stop_part(process, tag)
        seconds = time.monotonic() - start
        result = PartResult("failed", seconds, shlex.join(command), str(log_path), returncode, "", {})
        if returncode is None:
            result.status, result.reason = "timed out", f"no result within {min(limit_seconds, left):.0f} s"
        elif returncode != 0:
            result.reason = f"exit code {returncode}"
        else:
            try:
                result.figures = read_figures(self.context)
                result.status = "passed"
            except CheckFailed as failure:
                result.reason = str(failure)
            except (KeyError, IndexError, TypeError) as error:  # a figures file of another shape than expected
                result.reason = f"malformed figures ({type(error).__name__}: {error})"
        return result


def run_check(args, environment: dict) -> dict:
    device = args.device
    work_dir = Path(args.work_dir or Path(args.json).parent).resolve()
    visible = len(environment["gpus"])
    nproc = args.nproc or (ranks_for(visible) if device == "cuda" else 2)
    context = Context(device=device, sizes=SIZES[device], work_dir=work_dir, nproc=nproc)
    shutil.rmtree(context.run_dir, ignore_errors=True)  # a fresh demo run each time; the data is reused
    runner = Runner(context, args.time_budget)
    started, started_at = time.monotonic(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    results: dict[str, PartResult] = {}
    for part in PARTS:
        failed_needs = [need for need in part.needs if results[need].status != "passed"]
        if failed_needs:
            results[part.name] = PartResult("skipped", 0.0, None, None, None,
                                            f"needs {', '.join(failed_needs)}, which did not pass", {})
        else:
            results[part.name] = runner.run(part.name, part.command(context), part.limit_seconds, part.read_figures)
        print(summary_line(part.name, asdict(results[part.name])), flush=True)
    commit, dirty = git_commit()
    return {
        "ok": all(result.status == "passed" for result in results.values()),
        "device": device,
        "nproc": nproc,
        "commit": commit,
        "commit_dirty": dirty,
        "command": shlex.join([sys.executable, *sys.argv]),
        "started_at": started_at,
        "elapsed_seconds": time.monotonic() - started,
        "time_budget_seconds": args.time_budget,
        "work_dir": str(work_dir),
        "environment": environment,
        "parts": {name: asdict(result) for name, result in results.items()},
    }


def summary(report: dict) -> str:
    env = report["environment"]
    gpus = f"{len(env['gpus'])} x {env['gpus'][0]}" if env["gpus"] else "no GPU"
    passed = sum(part["status"] == "passed" for part in report["parts"].values())
    lines = [
        f"gpu-check on {report['device']} ({report['nproc']} ranks): {'PASSED' if report['ok'] else 'FAILED'} "
        f"({passed}/{len(report['parts'])} parts) in {report['elapsed_seconds']:.0f} s",
        f"commit {report['commit']}{' (with uncommitted changes)' if report['commit_dirty'] else ''}; "
        f"torch {env['torch']}, CUDA runtime {env['cuda_runtime'] or '-'}, nccl {env['nccl'] or '-'}, "
        f"python {env['python']}; {gpus}",
    ]
    lines += [summary_line(name, part) for name, part in report["parts"].items()]
    if report["device"] == "cpu":
        lines.append("CPU smoke run: tiny sizes, figures measured on the CPU; they say nothing about a GPU")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default): the real check; cpu: the smoke run with tiny sizes")
    parser.add_argument("--json", default="runs/gpu_check/gpu_check.json", help="the report; the summary goes "
                        "next to it as .txt")
    parser.add_argument("--work-dir", default=None, help="data, runs and logs (default: the JSON's directory)")
    parser.add_argument("--nproc", type=int, default=0, help="training ranks (default: the visible GPUs that "
                        f"divide the demo's batch of {DEMO_GLOBAL_BATCH}; 2 on CPU)")
    parser.add_argument("--time-budget", type=float, default=480.0, help="seconds for the whole run")
    args = parser.parse_args()
    missing = missing_packages()
    if missing:
        print(f"gpu_check: missing packages: {', '.join(missing)} (pip install them, or run `make setup`)",
              file=sys.stderr)
        return 2
    from devices import describe_environment  # imports torch: only once the packages are known to be there

    environment = describe_environment()
    if args.device == "cuda" and not environment["cuda_visible"]:
        print(f"no CUDA device is visible (torch {environment['torch']}, CUDA runtime {environment['cuda_runtime']}); "
              "the GPU check needs one: use --device cpu for the CPU smoke run", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # runs the parts' clean-up
    report = run_check(args, environment)
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    text = summary(report)
    json_path.with_suffix(".txt").write_text(text + "\n")
    print(f"\n{text}\nreport: {json_path}, summary: {json_path.with_suffix('.txt')}, logs: {report['work_dir']}/logs")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
