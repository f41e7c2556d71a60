"""--host-memory keep: a step's freed tensors are reused by the next, without page faults."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# A fresh interpreter per policy: mallopt changes the whole process for good.
PROBE = """
import resource, sys, threading, torch
from loramux import memory
memory.apply(sys.argv[1])
torch.set_num_threads(1)
out = []
def steps():  # on a thread of its own, like the engine's (another malloc arena than the main thread's)
    torch.empty(1 << 18).fill_(0.0)  # the thread's arena made as the engine's is, by small tensors first
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):  # a step's activations: made, written, freed
            a = torch.empty(2760, 1536).fill_(1.0)
            b = torch.empty(300, 576).fill_(1.0)
            c = torch.empty(5000, 100).fill_(1.0)
            del a, b, c
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=steps)
t.start()
t.join()
print(out[-1])
"""


def faults(policy: str) -> int:
    run = subprocess.run([sys.executable, "-c", PROBE, policy], capture_output=True, text=True, check=True)
    return int(run.stdout.split()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_kept_memory_serves_the_next_steps_tensors_without_page_faults():
    kept, released = faults("keep"), faults("release")
    # 10 x 20 MB written per round: ~41,000 fresh pages when freed blocks go back to the kernel.
    assert released > 10_000
    assert kept < 100
