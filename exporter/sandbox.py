"""Running model-written code against a problem's tests, so that a hostile completion cannot hurt the host.

Each program runs in a fresh `python -I -S -B` process (no site packages, no environment, no bytecode writes) in
its own temporary working folder and session, under exporter.sandbox_child's limits and audit-hook guard, with
a wall-clock timeout after which the whole process group is killed. Where Linux user namespaces are available
(`unshare --net --map-root-user`), the process also gets an empty network namespace: no network at the OS level,
not only at Python's. Outcomes: "passed", "failed: <exception>", "blocked: <what>", "timeout", "memory limit".
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CHILD = Path(__file__).with_name("sandbox_child.py")
TIMEOUT_S = 10.0
MEMORY_MIB = 1024


@dataclass(frozen=True)
class Outcome:
    passed: bool
    detail: str  # "passed", "failed: AssertionError", "blocked: ...", "timeout", "memory limit"


@functools.cache
def network_isolation() -> str:
    """"namespace" when an empty network namespace can be made here, else "audit hook" (Python-level only)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return "audit hook"
    done = subprocess.run([unshare, "--net", "--map-root-user", "true"], capture_output=True, check=False)
    return "namespace" if done.returncode == 0 else "audit hook"


def run_untrusted(program: str, timeout_s: float = TIMEOUT_S, memory_mib: int = MEMORY_MIB) -> Outcome:
    """Run `program` (completion plus tests) in the sandbox; passed means it exited 0 within the limits."""
    with tempfile.TemporaryDirectory(prefix="edgeslim-sandbox-") as workdir:
        (Path(workdir) / "program.py").write_text(program, encoding="utf-8")
        command = [sys.executable, "-I", "-S", "-B", str(CHILD), workdir, str(memory_mib), str(int(timeout_s) + 1)]
        if network_isolation() == "namespace":
            command = ["unshare", "--net", "--map-root-user", *command]
        process = subprocess.Popen(command, cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                                   start_new_session=True)
        try:
            _, stderr = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            return Outcome(False, "timeout")
        finally:
            _kill_group(process)  # anything the program left running in its session goes too
    return _classify(process.returncode, stderr.decode("utf-8", "replace"))


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _classify(returncode: int, stderr: str) -> Outcome:
    if returncode == 0:
        return Outcome(True, "passed")
    last = (stderr.strip().splitlines() or [""])[-1]
    if "SandboxViolation" in last:
        return Outcome(False, "blocked: " + last.split("sandbox: ", 1)[-1])
    if "MemoryError" in last:
        return Outcome(False, "memory limit")
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return Outcome(False, "timeout")
    return Outcome(False, "failed: " + (last.split(":", 1)[0] or f"exit {returncode}"))
