"""Python's garbage collector in a long-running serving process.

A replica's heap after start-up is large and lives for the process's life: modules, the tokenizer,
the model's Python objects, the engine. Left as it is, every collection of the oldest generation
walks all of it, and a step that happens to trigger one stalls for tens to hundreds of
milliseconds (`bench/overhead.py` at 4,096 sequences: longest step 190-250 ms against a median of
55-80). What the serving loop allocates per step, on the other hand, is short-lived: one update per
sequence per token, freed by reference counting, with few cycles.

`settle` is called once the process is ready to serve: it collects what start-up left, moves
everything that survives into the permanent generation (`gc.freeze`, never scanned again), and
raises the first generation's threshold, so that collections come every few decode steps rather
than several times in each, and the older generations less often still.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)

# Allocations (net of frees) between collections of the youngest generation; Python's default is 700.
# A decode step at 4,096 sequences allocates tens of thousands of objects.
GEN0_THRESHOLD = 50_000
# Collections of one generation between two of the next (Python's defaults: 10 and 10).
GEN1_EVERY, GEN2_EVERY = 20, 100


def settle() -> None:
    """Freezes the start-up heap and sets the thresholds above; safe to call again (after a repair)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, GEN1_EVERY, GEN2_EVERY)
    log.debug("garbage collector: %d start-up objects frozen, thresholds %s", gc.get_freeze_count(),
              gc.get_threshold())
