"""Run the notebooks as a learner on Binder does: one CPU, 2 GB for everything, kernels left open.

Binder gives a whole session one CPU and a hard memory limit: the Jupyter server and every open
kernel share it. JupyterLab keeps a notebook's kernel running when the learner opens the next
notebook. This script reproduces that: it moves itself into a new memory cgroup with the limit
(root and a cgroup v1 or v2 memory controller needed), pins itself to one CPU, and runs the given
notebooks in order, each in a fresh kernel, with ``--keep-previous`` leaving the previous
notebook's kernel alive and idle while the next one runs. Notebooks are executed in memory; no
file is written except the report.

Usage, from the repository root, as root::

    python tests/binder_session.py [--memory-mb 2048] [--cpu N] [--keep-previous] NOTEBOOK...

Per notebook it prints the wall seconds and the cgroup's peak memory (all processes charged
together, as Binder counts them), and writes ``output/binder_session.json``. A kernel killed at
the limit (what a learner sees as "The kernel appears to have died") or a failing cell ends the
session. Exit status: 0 all ran; 1 a cell failed or a kernel died; 2 no memory cgroup here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_CGROUP = 2


class MemoryCgroup:
    """A fresh memory cgroup with a hard limit and no swap; v1 or v2, whichever is writable."""

    def __init__(self, limit_bytes: int):
        name = f"bn-series-binder-{uuid.uuid4().hex[:8]}"
        v1 = Path("/sys/fs/cgroup/memory")
        if (v1 / "memory.limit_in_bytes").is_file():
            self.path = v1 / name
            self.path.mkdir()
            (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            swap = self.path / "memory.memsw.limit_in_bytes"
            if swap.exists():
                swap.write_text(str(limit_bytes))
            self.peak_file = self.path / "memory.max_usage_in_bytes"
            self.version = 1
            return
        for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
            controllers = root / "cgroup.controllers"
            if not (controllers.is_file() and "memory" in controllers.read_text().split()):
                continue
            with contextlib.suppress(OSError):
                (root / "cgroup.subtree_control").write_text("+memory")
            self.path = root / name
            self.path.mkdir()
            (self.path / "memory.max").write_text(str(limit_bytes))
            if (self.path / "memory.swap.max").exists():
                (self.path / "memory.swap.max").write_text("0")
            self.peak_file = self.path / "memory.peak"
            self.version = 2
            return
        raise OSError("no writable memory cgroup (v1 or v2) on this machine")

    def join(self) -> None:
        """Move this process (and so every kernel it starts later) into the cgroup."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def reset_peak(self) -> None:
        # OSError: an older kernel; the peak then covers the session so far.
        with contextlib.suppress(OSError):
            self.peak_file.write_text("0")

    def peak_mb(self) -> float:
        return int(self.peak_file.read_text()) / 2**20

    def remove(self) -> None:
        (self.path.parent / "cgroup.procs").write_text(str(os.getpid()))
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def alive(pid: int | None) -> bool:
    """True while the process exists and is not a zombie (from /proc, without reaping it)."""
    if pid is None:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def kernel_pid(manager) -> int | None:
    process = getattr(getattr(manager, "provisioner", None), "process", None)
    return getattr(process, "pid", None)


def watch(manager, done: threading.Event, on_death) -> None:
    """Call ``on_death`` if the kernel dies before ``done`` is set.

    nbclient can wait forever on a kernel killed under it, so the session is ended from here.
    """
    pid = kernel_pid(manager)
    while not done.wait(1.0):
        if pid is not None and not alive(pid):
            on_death()
            return


def run(notebooks: list[Path], memory_mb: int, cpu: int, keep_previous: bool) -> int:
    import nbformat
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    try:
        cgroup = MemoryCgroup(memory_mb * 2**20)
    except OSError as error:
        print(f"binder session: cannot limit memory here ({error}); nothing was run")
        return NO_CGROUP
    cgroup.join()
    os.sched_setaffinity(0, {cpu})
    results, previous, status = [], None, 0
    try:
        for path in notebooks:
            cgroup.reset_peak()
            notebook = nbformat.read(path, as_version=4)
            manager = KernelManager(kernel_name="python3")  # ours: the client leaves it running
            client = NotebookClient(
                notebook,
                km=manager,
                timeout=900,
                resources={"metadata": {"path": str(path.parent)}},
            )
            start, error, done = time.perf_counter(), None, threading.Event()

            def on_death(name=path.name, start=start, kept=previous):
                print(
                    f"{name}: {time.perf_counter() - start:.0f} s, peak {cgroup.peak_mb():.0f} MB"
                    f" of {memory_mb}  FAILED: the kernel died (killed at the memory limit?)",
                    flush=True,
                )
                if kept is not None and alive(kernel_pid(kept)):
                    os.kill(kernel_pid(kept), 9)
                cgroup.remove()
                os._exit(1)

            with client.setup_kernel():
                threading.Thread(target=watch, args=(manager, done, on_death), daemon=True).start()
                try:
                    for index, cell in enumerate(notebook.cells):
                        client.execute_cell(cell, index)
                except Exception as exc:  # a failing cell
                    error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}"
                done.set()
                seconds, peak = time.perf_counter() - start, cgroup.peak_mb()
                client.kc.stop_channels()
            if previous is not None:
                previous.shutdown_kernel(now=True)
                previous = None
            if keep_previous and error is None:
                previous = manager  # left running, idle, while the next notebook runs
            else:
                manager.shutdown_kernel(now=True)
            row = {
                "notebook": path.name,
                "seconds": round(seconds, 1),
                "peak_mb": round(peak),
                "previous_kernel_alive": keep_previous and len(results) > 0,
                "error": error,
            }
            results.append(row)
            alive_note = " (previous kernel alive)" if row["previous_kernel_alive"] else ""
            print(
                f"{path.name}: {seconds:.0f} s, peak {peak:.0f} MB of {memory_mb}{alive_note}"
                + (f"  FAILED: {error}" if error else ""),
                flush=True,
            )
            if error:
                status = 1
                break
    finally:
        if previous is not None:
            previous.shutdown_kernel(now=True)
        cgroup.remove()
    out = ROOT / "output"
    out.mkdir(exist_ok=True)
    (out / "binder_session.json").write_text(
        json.dumps(
            {
                "memory_mb": memory_mb,
                "cpu": cpu,
                "keep_previous": keep_previous,
                "notebooks": results,
            },
            indent=1,
        )
    )
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--memory-mb", type=int, default=2048)
    parser.add_argument(
        "--cpu",
        type=int,
        default=min(os.sched_getaffinity(0)),
        help="the one CPU to run on (default: the first this process may use)",
    )
    parser.add_argument(
        "--keep-previous",
        action="store_true",
        help="keep the previous notebook's kernel alive while the next one runs",
    )
    args = parser.parse_args()
    missing = [str(p) for p in args.notebooks if not p.is_file()]
    if missing:
        print(f"binder session: no such notebook: {', '.join(missing)}")
        return 1
    return run([p.resolve() for p in args.notebooks], args.memory_mb, args.cpu, args.keep_previous)


if __name__ == "__main__":
    sys.exit(main())
