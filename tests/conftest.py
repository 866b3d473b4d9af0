"""Test setup: 8 forced CPU devices (before jax is imported), float32 matmuls at full precision, and one
persistent XLA compilation cache for the whole session (in-process tests and the subprocesses they start, which
inherit the environment): identical programs (the same tiny step in several tests, every restart of a killed
run) compile once. Results are unaffected: a cache hit is the same compiled executable."""
import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # set once by the first importer (pytest-xdist workers inherit it)
    _cache = tempfile.mkdtemp(prefix="tdae_jax_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
