"""The sandboxed side of exporter.sandbox: limits itself, installs a guard, then runs the untrusted program.

Run as `python -I -S sandbox_child.py WORKDIR MEMORY_MIB CPU_SECONDS`; the program is WORKDIR/program.py. Kept free
of edgeslim imports, so the child loads nothing but the standard library. The guard is a Python audit hook (PEP
578): it cannot be removed once installed, and it refuses processes, sockets, native code loading, signals to other
processes, and any write, removal or rename outside WORKDIR. With the resource limits (address space, CPU time,
file size) and the parent's timeout, a completion that loops, forks, floods memory or touches the host's files
fails instead of doing it. This is containment for model completions, not a boundary against a determined attacker.
"""

from __future__ import annotations

import os
import resource
import sys

BLOCKED_EVENTS = {
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen", "pty.spawn",
    "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "os.kill", "os.killpg", "signal.pthread_kill",
    "resource.setrlimit", "sys.addaudithook", "os.chdir", "os.chroot", "webbrowser.open",
}
BLOCKED_MODULES = {"ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "_multiprocessing"}
PATH_EVENTS = {  # event -> how many leading arguments are paths that must stay inside WORKDIR
    "os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.rename": 2, "os.link": 2, "os.symlink": 2, "os.chmod": 1,
    "os.chown": 1, "os.truncate": 1, "os.utime": 1, "shutil.rmtree": 1, "shutil.copyfile": 2, "shutil.move": 2,
    "os.mkfifo": 1, "os.mknod": 1,
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
MAX_FILE_BYTES = 16 * 1024 * 1024


class SandboxViolation(PermissionError):
    pass


def make_guard(workdir: str):
    root = os.path.realpath(workdir)

    def inside(path) -> bool:
        if isinstance(path, int):  # an already-open descriptor
            return True
        try:
            real = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return real == root or real.startswith(root + os.sep) or real == os.devnull

    def guard(event: str, args: tuple) -> None:
        if event in BLOCKED_EVENTS:
            raise SandboxViolation(f"sandbox: {event} is not allowed")
        if event == "import" and args[0] in BLOCKED_MODULES:
            raise SandboxViolation(f"sandbox: import {args[0]} is not allowed")
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
            if writes and not inside(path):
                raise SandboxViolation(f"sandbox: writing {path} (outside the working folder) is not allowed")
        if event in PATH_EVENTS and not all(inside(p) for p in args[: PATH_EVENTS[event]]):
            raise SandboxViolation(f"sandbox: {event} outside the working folder is not allowed")

    return guard


def main() -> None:
    workdir, memory_mib, cpu_seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_AS, (memory_mib << 20, memory_mib << 20))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with open(os.path.join(workdir, "program.py"), encoding="utf-8") as f:
        source = f.read()
    code = compile(source, "program.py", "exec")
    sys.addaudithook(make_guard(workdir))
    sys.argv = ["program.py"]
    exec(code, {"__name__": "__main__"})


if __name__ == "__main__":
    main()
