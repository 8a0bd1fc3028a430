"""utils/heap.py: freed large buffers stay in the process while training, and go back after."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from instructune.utils.heap import _glibc

pytestmark = pytest.mark.skipif(_glibc() is None, reason="glibc's malloc only (not this libc)")

# A child process, so that changing malloc's settings leaves this one as it was. Like a
# training step, each "step" asks for six large buffers (40-49 MiB, over glibc's largest mmap
# threshold, of sizes that change from step to step as packed batch lengths do), writes them
# and frees them; it counts the minor page faults of each step outside the block, then inside.
_CHILD = r"""
import json, resource, torch
from instructune.utils.heap import freed_memory_kept

MIB = 2**20 // 4  # fp32 elements

def faults_per_step(steps=6):
    counts = []
    for step in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffers = [torch.empty((40 + 3 * ((step + i) % 4)) * MIB).fill_(1.0) for i in range(6)]
        del buffers
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return counts

def resident_pages():
    return int(open("/proc/self/statm").read().split()[1])

outside = faults_per_step()
with freed_memory_kept() as applied:
    with freed_memory_kept():  # a nested block leaves the outer one's setting on exit
        pass
    inside = faults_per_step()
    kept = resident_pages()
released = kept - resident_pages()
print(json.dumps(dict(applied=applied, outside=outside, inside=inside, released=released)))
"""


def test_a_steps_freed_buffers_are_reused_without_faults_inside_the_block():
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["applied"] is True
    pages = 6 * 40 * 2**20 // 4096  # at least, per step
    # glibc's defaults: every buffer is a fresh mmap, and every step faults all its pages.
    assert all(n > pages // 2 for n in r["outside"]), r
    # Kept: the first step grows the heap; later steps find most of their buffers in it (a
    # buffer a little larger than any free block grows the heap again, less often as it grows).
    assert r["inside"][0] > pages // 2, r
    assert sum(r["inside"][1:]) < sum(r["outside"][1:]) // 4, r
    assert min(r["inside"][1:]) < pages // 20, r
    # On leaving the block, the heap's free memory is given back to the system.
    assert r["released"] > pages // 2, r
