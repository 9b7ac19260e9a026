"""Shared fixtures: a small real demo dataset, config composition, and the processes tests start.

Every process a test starts goes through `running` (or `run` and `torchrun`, built on it). It starts in a session
of its own and carries a tag in its environment, which everything it starts inherits: torchrun's workers (which
torchrun puts in sessions of their own), their data-loader workers, the tasks of the stand-in SLURM. Leaving
`running` in any way (normal end, failed assertion, timeout, Ctrl-C) stops every process with the tag, and at the
end of the session `pytest_sessionfinish` fails the run if any process started by it is still alive.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from contrastive.config import register_configs
from contrastive.data.demo import build_demo_dataset

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
LAUNCH_TAG = "CONTRASTIVE_TEST_LAUNCH"  # value "<pytest pid>.<launch number>"
os.environ.setdefault("WANDB_MODE", "disabled")
_launches = itertools.count()

register_configs()


def compose_config(overrides: list[str] | None = None, config_name: str = "train"):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name, overrides=overrides or [])


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """512 train and 512 test samples of the demo data, in shards of 64 (train) and 32 (test)."""
    root = tmp_path_factory.mktemp("demo") / "fashion-mnist"
    build_demo_dataset(root, samples_per_shard=64, limit=512)
    return root


def tiny_run_overrides(demo_root: Path, run_dir: Path) -> list[str]:
    return [
        "model=test_tiny",
        "debug=tiny",
        f"data.sources.0.shards={demo_root / 'train'}",
        f"run_dir={run_dir}",
        "trainer.threads_per_process=1",
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_env() -> dict[str, str]:
    """The environment of a started process: one thread, wandb off, the repository importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}


def _tagged_processes() -> dict[int, str]:
    """pid -> launch tag of every live process that carries one (a zombie's environment reads as empty)."""
    needle = f"{LAUNCH_TAG}=".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours
            continue
        for item in environ.split(b"\0"):
            if item.startswith(needle):
                found[int(entry.name)] = item[len(needle):].decode()
    return found


def _signal_all(pids, signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def stop(process: subprocess.Popen, grace: float = 5.0) -> None:
    """End `process` and every process it started: SIGTERM, then SIGKILL what is left after `grace` seconds.

    grace=0 kills at once, like a crash. Returns once none of them is alive and `process` is reaped.
    """
    def alive() -> list[int]:
        process.poll()  # reap the launcher once it exits
        return [pid for pid, tag in _tagged_processes().items() if tag == process.launch_tag]

    steps = [(signal.SIGTERM, grace)] if grace > 0 else []
    for signum, wait in [*steps, (signal.SIGKILL, 30.0)]:
        remaining = alive()
        if not remaining:
            break
        _signal_all(remaining, signum)
        try:
            os.killpg(process.pid, signum)  # anything in the launcher's session that dropped the tag
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + wait
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)
    if alive():
        raise RuntimeError(f"processes of {process.args} survived SIGKILL: {alive()}")
    process.wait()


@contextmanager
def running(command: list[str], env: dict[str, str] | None = None, **popen) -> Iterator[subprocess.Popen]:
    """`subprocess.Popen(command)` (in the repository, with `process_env()` unless `env` is given), in a session of
    its own; on leaving the block the process and everything it started are stopped (see `stop`)."""
    tag = f"{os.getpid()}.{next(_launches)}"
    env = {**(process_env() if env is None else env), LAUNCH_TAG: tag}
    popen.setdefault("cwd", REPO)
    with subprocess.Popen(command, env=env, start_new_session=True, **popen) as process:
        process.launch_tag = tag
        try:
            yield process
        finally:
            stop(process)


def run(command: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True)` through `running`; a timeout fails with the output."""
    with running(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(process)
            stdout, stderr = process.communicate()
            message = f"timed out after {timeout} s: {command}\n{stdout[-4000:]}\n{stderr[-6000:]}"
            raise AssertionError(message) from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def torchrun_command(args: list[str], nproc: int = 2, extra: list[str] | None = None) -> list[str]:
    """`torchrun --nproc_per_node=N ARGS` on loopback (the trainer picks gloo on CPU)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", *(extra or []), *args]


def torchrun(args: list[str], nproc: int = 2, timeout: float = 900, extra: list[str] | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run `torchrun_command(...)` to the end; on failure show its output."""
    result = run(torchrun_command(args, nproc, extra), timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"torchrun failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def _descendants(root: int) -> list[int]:
    """Live (not zombie) processes below `root` in the parent tree."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _command_line(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def pytest_sessionfinish(session, exitstatus) -> None:
    """Fail the run if a process started by it outlived its test; kill such processes so nothing keeps running."""
    prefix = f"{os.getpid()}."
    leftovers = set(_descendants(os.getpid()))
    leftovers |= {pid for pid, tag in _tagged_processes().items() if tag.startswith(prefix)}
    if not leftovers:
        return
    lines = [f"  {pid}: {_command_line(pid)[:200]}" for pid in sorted(leftovers)]
    _signal_all(leftovers, signal.SIGKILL)
    message = "processes started by the tests were still running at the end of the session (now killed):"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")
        reporter.write_line(message, red=True, bold=True)
        for line in lines:
            reporter.write_line(line, red=True)
    else:
        print(message, *lines, sep="\n", file=sys.stderr)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
