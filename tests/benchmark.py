"""Benchmark of the series: wall time and peak memory of every notebook, and of the plain script.

Run from the repository root (a script, not a pytest test)::

    python tests/benchmark.py                 # every notebook, then the plain script
    python tests/benchmark.py --only 01 03    # only notebooks 01 and 03, then the plain script

Each notebook is executed top to bottom in a fresh ``python3`` kernel whose working
directory is ``notebooks/``; the executed notebook stays in memory. A notebook's
figures are the wall seconds from kernel start to the end of its last cell, and
the kernel process's peak resident memory (``VmHWM`` of ``/proc/<pid>/status``),
read just before the kernel is shut down.

For comparison, the "plain script" is the original case without a notebook, in a
fresh interpreter: the three images loaded with ``utils.load_images``, then
``keras.applications.ResNet50(weights=None, input_shape=(197, 197, 1), classes=3)``
compiled with Keras defaults (graph mode), five epochs of ``fit``, ``predict`` and
``evaluate``. By default it runs with TensorFlow's own oneDNN setting (the notebooks switch
oneDNN off in their setup cell); see ``--plain-onednn``.

The results are printed as a Markdown table with the targets (PASS/FAIL), and
written to ``output/benchmark.md`` and ``output/benchmark.json``. Exit status:
0 when everything ran, 1 when a notebook or the plain script failed, 2 for bad
arguments, 3 when ``--strict`` is given and a target is missed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
OUTPUT = ROOT / "output"  # everything the series generates (git-ignored)

#: Targets: seconds per notebook, seconds for the whole series, peak memory per kernel (MB).
NOTEBOOK_SECONDS = 120.0
SERIES_SECONDS = 300.0
KERNEL_MB = 1536.0

#: Exit statuses.
EXIT_FAILED = 1
EXIT_TARGET_MISSED = 3

# The plain script, run as ``python -c PLAIN_SCRIPT <repository root>``. It prints
# one line starting with the marker, holding its results and its own VmHWM as JSON.
PLAIN_MARKER = "BENCHMARK-PLAIN-RESULT "
PLAIN_SCRIPT = r"""
import json
import os
import sys

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
root = sys.argv[1]

# TensorFlow reads TF_ENABLE_ONEDNN_OPTS when it is imported: the caller's environment decides.
import keras
import numpy as np

sys.path.insert(0, root)
import utils

images, labels, names = utils.load_images(os.path.join(root, "data", "train"))
model = keras.applications.ResNet50(weights=None, input_shape=(197, 197, 1), classes=3)
model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
history = model.fit(images, labels, epochs=5)
probabilities = model.predict(images)
loss, accuracy = model.evaluate(images, labels)

try:
    from tensorflow.python.util import _pywrap_util_port
    onednn = bool(_pywrap_util_port.IsMklEnabled())
except Exception:  # private API: absent from some releases
    onednn = None

peak_kb = None
with open("/proc/self/status", encoding="ascii") as status:
    for line in status:
        if line.startswith("VmHWM:"):
            peak_kb = int(line.split()[1])

print(__MARKER__ + json.dumps({
    "pid": os.getpid(),
    "vmhwm_kb": peak_kb,
    "onednn": onednn,
    "run_eagerly": bool(model.run_eagerly),
    "images": names,
    "fit_accuracy": [float(a) for a in history.history["accuracy"]],
    "fit_loss": [float(v) for v in history.history["loss"]],
    "predicted": [int(c) for c in np.argmax(probabilities, axis=1)],
    "evaluate_loss": float(loss),
    "evaluate_accuracy": float(accuracy),
}), flush=True)
""".replace("__MARKER__", repr(PLAIN_MARKER))

# Run in the kernel after the notebook's last cell (outside the timing): the
# kernel's own pid and VmHWM, to check the pid obtained from the kernel manager.
PROBE_SOURCE = (
    "import os as _bm_os\n"
    "with open('/proc/self/status', encoding='ascii') as _bm_status:\n"
    "    _bm_kb = [l.split()[1] for l in _bm_status if l.startswith('VmHWM:')]\n"
    "print('BENCHMARK-PROBE', _bm_os.getpid(), _bm_kb[0] if _bm_kb else -1)\n"
)

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------


def read_vmhwm_kb(pid: int) -> int | None:
    """``VmHWM`` of process ``pid`` in kB, or None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def kernel_pid(km) -> int | None:
    """The kernel's process id, from the kernel manager (jupyter_client 7/8 and older)."""
    provisioner = getattr(km, "provisioner", None)
    candidates = [
        getattr(provisioner, "pid", None),
        getattr(getattr(provisioner, "process", None), "pid", None),
        getattr(getattr(km, "kernel", None), "pid", None),  # jupyter_client < 7
    ]
    for pid in candidates:
        if isinstance(pid, int) and pid > 0:
            return pid
    return None


def run_probe(client, nb) -> tuple[int | None, int | None]:
    """Execute :data:`PROBE_SOURCE` in the kernel; returns its (pid, VmHWM kB)."""
    import nbformat

    cell = nbformat.v4.new_code_cell(PROBE_SOURCE)
    nb.cells.append(cell)  # nbclient stores the executed cell at its index
    try:
        client.execute_cell(cell, len(nb.cells) - 1)
    except Exception:
        return None, None
    for output in cell.get("outputs", []):
        text = output.get("text", "") if output.get("output_type") == "stream" else ""
        match = re.search(r"BENCHMARK-PROBE (\d+) (-?\d+)", text)
        if match:
            kb = int(match.group(2))
            return int(match.group(1)), (kb if kb >= 0 else None)
    return None, None


def describe_error(error: BaseException) -> str:
    """One line for a notebook error: the exception name and message, colours stripped."""
    from nbclient.exceptions import CellExecutionError

    if isinstance(error, CellExecutionError) and getattr(error, "ename", None):
        text = f"{error.ename}: {error.evalue}"
    else:
        text = f"{type(error).__name__}: {error}"
    text = ANSI.sub("", text).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    return first[:500]


def run_notebook(path: Path, cell_timeout: int, startup_timeout: int) -> dict:
    """Execute one notebook in a fresh kernel, in memory; measure seconds and peak memory."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=cell_timeout,
        startup_timeout=startup_timeout,
        kernel_name="python3",
        allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    result = {
        "notebook": path.stem,
        "file": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
        "ok": False,
        "seconds": None,
        "peak_mb": None,
        "kernel_pid": None,
        "pid_source": None,
        "cells": sum(1 for c in nb.cells if c.cell_type == "code"),
        "failed_cell": None,
        "error": None,
        "traceback": None,
    }
    current = None
    start = time.perf_counter()
    try:
        with client.setup_kernel(cwd=str(NOTEBOOKS)):
            manager_pid = kernel_pid(client.km)
            try:
                for index, cell in enumerate(list(nb.cells)):
                    current = index
                    if cell.cell_type == "code":
                        client.execute_cell(cell, index)
                result["seconds"] = time.perf_counter() - start
                result["ok"] = True
            except Exception as error:  # noqa: BLE001  reported, and the exit status says it
                result["seconds"] = time.perf_counter() - start
                result["failed_cell"] = current
                result["error"] = describe_error(error)
                result["traceback"] = ANSI.sub("", str(error))[-4000:]
            # Peak memory, read while the kernel is still up.
            probe_pid, probe_kb = run_probe(client, nb) if result["ok"] else (None, None)
            pid = manager_pid
            result["pid_source"] = "kernel manager"
            if pid is None or (probe_pid is not None and probe_pid != pid):
                pid, result["pid_source"] = probe_pid, "in-kernel probe"
            kb = read_vmhwm_kb(pid) if pid is not None else None
            if kb is None and probe_kb is not None:
                kb, result["pid_source"] = probe_kb, "in-kernel probe"
            result["kernel_pid"] = pid
            result["peak_mb"] = kb / 1024 if kb is not None else None
            result["probe_peak_mb"] = probe_kb / 1024 if probe_kb is not None else None
    except Exception as error:  # noqa: BLE001  kernel failed to start or died on shutdown
        if result["error"] is None:
            result["ok"] = False
            result["failed_cell"] = current
            result["error"] = describe_error(error)
            result["traceback"] = ANSI.sub("", str(error))[-4000:]
            if result["seconds"] is None:
                result["seconds"] = time.perf_counter() - start
    return result


def run_plain(onednn: str, timeout: int) -> dict:
    """Run :data:`PLAIN_SCRIPT` in a fresh interpreter; measure seconds and its VmHWM."""
    env = dict(os.environ)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # write nothing into the repository
    if onednn == "default":
        env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    else:
        env["TF_ENABLE_ONEDNN_OPTS"] = "1" if onednn == "on" else "0"
    result = {"ok": False, "seconds": None, "peak_mb": None, "error": None}
    start = time.perf_counter()
    try:
        completed = subprocess.run(
            [sys.executable, "-c", PLAIN_SCRIPT, str(ROOT)],
            cwd=str(ROOT),
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        result["seconds"] = time.perf_counter() - start
        result["error"] = f"timed out after {timeout} s"
        return result
    result["seconds"] = time.perf_counter() - start
    line = next(
        (text for text in completed.stdout.splitlines() if text.startswith(PLAIN_MARKER)), None
    )
    if completed.returncode != 0 or line is None:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-15:]
        result["error"] = f"exit status {completed.returncode}: " + "\n".join(tail)
        return result
    details = json.loads(line[len(PLAIN_MARKER) :])
    result.update(details)
    result["ok"] = True
    kb = details.get("vmhwm_kb")
    result["peak_mb"] = kb / 1024 if kb is not None else None
    return result


# ---------------------------------------------------------------------------
# Machine, table, targets
# ---------------------------------------------------------------------------


def machine() -> dict:
    """CPU, cores, memory and versions, without importing TensorFlow here."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory_gb = None
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemTotal:"):
                    memory_gb = int(line.split()[1]) / 1024**2
                    break
    except OSError:
        pass

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": memory_gb,
        "python": platform.python_version(),
        "tensorflow": version("tensorflow-cpu")
        if version("tensorflow") == "not installed"
        else version("tensorflow"),
        "keras": version("keras"),
        "platform": platform.platform(),
    }


def recalibration_cost(samples: int = 256, batch_size: int = 32, size: int = 64) -> dict:
    """Seconds of recalibrate_batchnorm against the same training-mode passes, eager and traced.

    On keras.applications.ResNet50(weights=None) at size x size x 3, in one process; each figure
    is the best of two runs after a warm-up (the traced one excludes its tracing, given apart).
    """
    import time

    import keras
    import numpy as np
    import tensorflow as tf

    import utils

    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None, input_shape=(size, size, 3), classes=10)
    x = np.random.default_rng(0).normal(size=(samples, size, size, 3)).astype("float32")
    batches = [x[i : i + batch_size] for i in range(0, samples, batch_size)]
    model(batches[0], training=False)

    def eager():
        with utils.frozen_moving_statistics(model):
            for batch in batches:
                model(batch, training=True)

    traced = tf.function(lambda batch: model(batch, training=True), reduce_retracing=True)

    def compiled():
        with utils.frozen_moving_statistics(model):
            for batch in batches:
                traced(batch)

    def recalibrate():
        with utils.frozen_moving_statistics(model):
            utils.recalibrate_batchnorm(
                model, x, batch_size=batch_size, include_never_updated=True
            )

    def best(run):
        times = []
        for _ in range(2):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times)

    start = time.perf_counter()
    compiled()
    tracing = time.perf_counter() - start
    eager()
    recalibrate()
    result = {
        "eager": best(eager),
        "compiled": best(compiled),
        "first_compiled": tracing,
        "recalibrate": best(recalibrate),
        "samples": samples,
        "batch_size": batch_size,
    }
    result["vs_eager"] = result["recalibrate"] / result["eager"]
    result["vs_compiled"] = result["recalibrate"] / result["compiled"]
    return result


def machine_line(m: dict) -> str:
    memory = f"{m['memory_gb']:.1f} GB RAM" if m["memory_gb"] is not None else "RAM unknown"
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores, {memory}; Python {m['python']}, "
        f"TensorFlow {m['tensorflow']}, Keras {m['keras']}"
    )


def _num(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def summarize(notebooks: list[dict], plain: dict | None, complete: bool, available: int) -> dict:
    """Totals, ratios and the targets with their PASS/FAIL (or n/a) status."""
    seconds = [r["seconds"] for r in notebooks if r["seconds"] is not None]
    peaks = [r["peak_mb"] for r in notebooks if r["peak_mb"] is not None]
    total_seconds = sum(seconds) if seconds else None
    max_peak = max(peaks) if peaks else None
    ratio_seconds = ratio_memory = None
    if plain and plain.get("ok"):
        if total_seconds is not None and plain["seconds"]:
            ratio_seconds = total_seconds / plain["seconds"]
        if max_peak is not None and plain.get("peak_mb"):
            ratio_memory = max_peak / plain["peak_mb"]

    targets = []
    for r in notebooks:
        value = r["seconds"] if r["ok"] else None
        status = "FAIL" if not r["ok"] else ("PASS" if value <= NOTEBOOK_SECONDS else "FAIL")
        targets.append(
            {
                "target": f"{r['notebook']} at most {NOTEBOOK_SECONDS:.0f} s",
                "value": value,
                "unit": "s",
                "status": status,
            }
        )
    all_ok = all(r["ok"] for r in notebooks)
    if not all_ok:
        series_status, note = "FAIL", "a notebook failed"
    elif total_seconds is None:
        series_status, note = "n/a", "no notebook run"
    elif total_seconds > SERIES_SECONDS:
        series_status, note = "FAIL", "" if complete else "partial run already over the limit"
    elif complete:
        series_status, note = "PASS", ""
    else:
        series_status, note = "n/a", f"partial run: {len(notebooks)} of {available} notebooks"
    targets.append(
        {
            "target": f"whole series at most {SERIES_SECONDS:.0f} s",
            "value": total_seconds,
            "unit": "s",
            "status": series_status,
            "note": note,
        }
    )
    for r in notebooks:
        value = r["peak_mb"]
        status = "n/a" if value is None else ("PASS" if value <= KERNEL_MB else "FAIL")
        if value is None and not r["ok"]:
            status = "FAIL"
        targets.append(
            {
                "target": f"{r['notebook']} kernel peak memory at most {KERNEL_MB:.0f} MB",
                "value": value,
                "unit": "MB",
                "status": status,
            }
        )
    return {
        "total_seconds": total_seconds,
        "max_peak_mb": max_peak,
        "ratio_seconds": ratio_seconds,
        "ratio_memory": ratio_memory,
        "targets": targets,
        "targets_met": all(t["status"] != "FAIL" for t in targets),
    }


def markdown(
    notebooks: list[dict], plain: dict | None, summary: dict, m: dict, complete: bool
) -> str:
    lines = ["| notebook | seconds | peak memory (MB) |", "|---|---:|---:|"]
    for r in notebooks:
        name = r["notebook"] + ("" if r["ok"] else " (FAILED)")
        lines.append(f"| {name} | {_num(r['seconds'], 1)} | {_num(r['peak_mb'], 0)} |")
    label = "total" if complete else f"total, {len(notebooks)} notebook(s) run"
    lines.append(
        f"| **{label}** (sum of seconds, max of memory) | **{_num(summary['total_seconds'], 1)}** "
        f"| **{_num(summary['max_peak_mb'], 0)}** |"
    )
    if plain is not None:
        onednn = {True: "oneDNN on", False: "oneDNN off"}.get(plain.get("onednn"), "oneDNN ?")
        mode = "eager" if plain.get("run_eagerly") else "graph mode"
        name = f"plain script ({mode}, {onednn})" + ("" if plain["ok"] else " (FAILED)")
        lines.append(f"| {name} | {_num(plain['seconds'], 1)} | {_num(plain['peak_mb'], 0)} |")
        ratio_s = "n/a" if summary["ratio_seconds"] is None else f"{summary['ratio_seconds']:.2f}x"
        ratio_m = "n/a" if summary["ratio_memory"] is None else f"{summary['ratio_memory']:.2f}x"
        lines.append(f"| ratio total / plain | {ratio_s} | {ratio_m} |")
    lines += ["", machine_line(m), "", "Targets:", ""]
    for t in summary["targets"]:
        value = (
            "n/a"
            if t["value"] is None
            else f"{t['value']:.{1 if t['unit'] == 's' else 0}f} {t['unit']}"
        )
        note = f" ({t['note']})" if t.get("note") else ""
        lines.append(f"- {t['status']}: {t['target']}: {value}{note}")
    if plain is not None and plain.get("ok"):
        lines += [
            "",
            "Plain script: fit accuracy per epoch "
            f"{[round(a, 3) for a in plain['fit_accuracy']]}, "
            f"predicted classes {plain['predicted']}, evaluate accuracy "
            f"{plain['evaluate_accuracy']:.3f}, loss {plain['evaluate_loss']:.4g}.",
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def select_notebooks(only: list[str] | None) -> list[Path]:
    found = sorted(p for p in NOTEBOOKS.glob("*.ipynb") if re.match(r"\d\d_", p.name))
    if not only:
        return found
    wanted = []
    for number in only:
        key = number.zfill(2)
        matches = [p for p in found if p.name.startswith(key + "_")]
        if not matches:
            print(f"benchmark: no notebook numbered {number!r} in {NOTEBOOKS}", file=sys.stderr)
            raise SystemExit(2)
        wanted.extend(m for m in matches if m not in wanted)
    return sorted(wanted)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time every notebook in a fresh kernel, and the plain script, "
        "against the series' targets."
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NN",
        help="only these notebooks, by number (e.g. --only 01 03)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help=f"exit with status {EXIT_TARGET_MISSED} if a target is missed",
    )
    parser.add_argument(
        "--cell-timeout",
        type=int,
        default=1800,
        metavar="S",
        help="seconds allowed per cell (default 1800)",
    )
    parser.add_argument(
        "--startup-timeout",
        type=int,
        default=180,
        metavar="S",
        help="seconds allowed for a kernel to start (default 180)",
    )
    parser.add_argument(
        "--plain-timeout",
        type=int,
        default=1800,
        metavar="S",
        help="seconds allowed for the plain script (default 1800)",
    )
    parser.add_argument(
        "--plain-onednn",
        choices=("default", "on", "off"),
        default="default",
        help="oneDNN for the plain script: TensorFlow's default (as in the "
        "original case), or forced on/off (the notebooks run with it off)",
    )
    parser.add_argument(
        "--name",
        default="benchmark",
        metavar="NAME",
        help="write output/NAME.md and output/NAME.json (default: benchmark); "
        "e.g. --name benchmark-1cpu under taskset -c 0",
    )
    parser.add_argument(
        "--recalibration",
        action="store_true",
        help="only measure recalibrate_batchnorm against eager and traced passes",
    )
    parser.add_argument("--no-plain", action="store_true", help="skip the plain script")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.recalibration:
        import json as json_module

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        cost = recalibration_cost()
        print(json_module.dumps(cost, indent=1))
        return 0
    paths = select_notebooks(args.only)
    every = select_notebooks(None)
    complete = len(paths) == len(every)
    m = machine()
    print(machine_line(m), flush=True)

    notebooks = []
    for path in paths:
        print(f"running {path.name} in a fresh kernel ...", flush=True)
        r = run_notebook(path, args.cell_timeout, args.startup_timeout)
        notebooks.append(r)
        if r["ok"]:
            print(
                f"  {r['seconds']:.1f} s, peak {_num(r['peak_mb'], 0)} MB "
                f"(kernel pid {r['kernel_pid']}, via {r['pid_source']})",
                flush=True,
            )
        else:
            where = "" if r["failed_cell"] is None else f" in cell index {r['failed_cell']}"
            print(f"  FAILED{where}: {r['error']}", file=sys.stderr, flush=True)

    plain = None
    if not args.no_plain:
        print("running the plain script (graph mode, no notebook) ...", flush=True)
        plain = run_plain(args.plain_onednn, args.plain_timeout)
        if plain["ok"]:
            print(f"  {plain['seconds']:.1f} s, peak {_num(plain['peak_mb'], 0)} MB", flush=True)
        else:
            print(f"  plain script FAILED: {plain['error']}", file=sys.stderr, flush=True)

    summary = summarize(notebooks, plain, complete, len(every))
    table = markdown(notebooks, plain, summary, m, complete)
    print()
    print(table, end="")

    OUTPUT.mkdir(exist_ok=True)
    report = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)],
        "machine": m,
        "complete_series": complete,
        "targets_limits": {
            "notebook_seconds": NOTEBOOK_SECONDS,
            "series_seconds": SERIES_SECONDS,
            "kernel_mb": KERNEL_MB,
        },
        "notebooks": notebooks,
        "plain": plain,
        **summary,
    }
    md_path, json_path = OUTPUT / f"{args.name}.md", OUTPUT / f"{args.name}.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(table, encoding="utf-8")
    print(f"\nwritten: {md_path.relative_to(ROOT)}, {json_path.relative_to(ROOT)}")

    failed = [r for r in notebooks if not r["ok"]]
    for r in failed:
        where = "" if r["failed_cell"] is None else f" (cell index {r['failed_cell']})"
        print(f"benchmark: notebook {r['notebook']} failed{where}: {r['error']}", file=sys.stderr)
    if plain is not None and not plain["ok"]:
        print(f"benchmark: plain script failed: {plain['error']}", file=sys.stderr)
    if failed or (plain is not None and not plain["ok"]):
        return EXIT_FAILED
    if args.strict and not summary["targets_met"]:
        print("benchmark: a target was missed (--strict)", file=sys.stderr)
        return EXIT_TARGET_MISSED
    return 0


if __name__ == "__main__":
    sys.exit(main())
