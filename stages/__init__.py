"""qlora-pipeline stages: one module per DVC stage, run as `python -m stages.<name>`."""

import logging
import time

# The stage process's start, before torch and transformers are imported: timing.json's
# first_step_s counts from here (lib.throughput).
STARTED = time.perf_counter()

from stages.lib import reproducible  # noqa: E402

# Before any stage module imports torch: the kernel choices that make CPU training give the same
# bits on every x86-64 CPU (docs/reproducibility.md).
reproducible.apply()

# bitsandbytes logs at import that it cannot fetch an optional hub-hosted CPU kernel: expected
# offline, and noise in every stage log. Set here because transformers imports bitsandbytes
# before a stage's own logging set-up runs.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
