"""tdae_jax.runtime.reuse_host_memory: a freed large block is reused without page faults (what saves the
2-8 s of kernel time per iteration of a 512 px step on XLA:CPU), and TDAE_MALLOC=default opts out."""
import os
import subprocess
import sys

import pytest

PROBE = r"""
import resource, sys
import numpy as np
from tdae_jax import runtime
np._core.multiarray._set_madvise_hugepage(False)  # count 4 KiB pages, as XLA's buffers get them
print("applied", runtime.reuse_host_memory())
n = 64 * 2**20 // 8
a = np.ones(n); del a                       # first touch: faults either way
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = np.ones(n); del b
print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


def _probe(env_extra):
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout
    vals = dict(line.split() for line in out.splitlines())
    return vals["applied"] == "True", int(vals["faults"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_block_is_reused_without_page_faults():
    applied, faults = _probe({"TDAE_MALLOC": ""})
    off_applied, off_faults = _probe({"TDAE_MALLOC": "default"})
    assert not off_applied
    if not applied:
        pytest.skip("mallopt unavailable (not glibc)")
    pages = 64 * 2**20 // 4096
    assert faults < pages // 20, faults               # the 64 MiB block came back from the heap
    assert off_faults > pages // 4, off_faults        # glibc's default re-maps it (the cost being removed)
