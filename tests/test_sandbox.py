"""Model-written code runs contained: hostile completions fail and leave the host untouched."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from exporter.sandbox import network_isolation, run_untrusted

SOLUTION = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


def test_a_correct_completion_passes_and_a_wrong_one_fails():
    assert run_untrusted(SOLUTION + TESTS).passed
    wrong = run_untrusted("def add(a, b):\n    return a - b\n" + TESTS)
    assert not wrong.passed and wrong.detail == "failed: AssertionError"


def test_files_in_its_own_working_folder_are_allowed():
    program = "open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n"
    assert run_untrusted(program).passed


def test_an_infinite_loop_times_out_and_is_killed():
    start = time.monotonic()
    outcome = run_untrusted("while True:\n    pass\n", timeout_s=2)
    assert outcome.detail == "timeout" and not outcome.passed
    assert time.monotonic() - start < 15


@pytest.mark.parametrize("attack", [
    "import os\nos.system('touch {target}')",
    "import subprocess\nsubprocess.run(['touch', '{target}'])",
    "open('{target}', 'w').write('pwned')",
    "import pathlib\npathlib.Path('{target}').write_text('pwned')",
    "import os\nos.open('{target}', os.O_CREAT | os.O_WRONLY)",
    "import os\nif os.fork() == 0:\n    open('{target}', 'w')",
    "import shutil\nshutil.copyfile('/etc/hostname', '{target}')",
    "import ctypes\nctypes.CDLL(None).system(b'touch {target}')",
])
def test_hostile_completions_are_contained_and_fail(attack):
    target = Path("/tmp") / f"edgeslim-sandbox-escape-{uuid.uuid4().hex}"
    outcome = run_untrusted(attack.format(target=target) + "\n" + SOLUTION + TESTS)
    assert not outcome.passed and outcome.detail.startswith("blocked"), outcome
    time.sleep(0.2)  # a forked child, had there been one, would have had time to write
    assert not target.exists()


def test_no_network_and_no_memory_flood():
    network = run_untrusted("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n")
    assert not network.passed and network.detail.startswith("blocked")
    flood = run_untrusted("x = bytearray(8 * 1024 ** 3)\n", memory_mib=256)
    assert not flood.passed and flood.detail == "memory limit"


def test_a_deleting_completion_cannot_remove_host_files(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    outcome = run_untrusted(f"import os\nos.remove({str(victim)!r})\n")
    assert outcome.detail.startswith("blocked") and victim.read_text() == "precious"


def test_network_isolation_is_reported():
    assert network_isolation() in ("namespace", "audit hook")
