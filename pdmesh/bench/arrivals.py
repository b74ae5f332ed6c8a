"""When requests arrive: open-loop Poisson arrivals, or burstier ones.

Inter-arrival gaps are gamma-distributed with shape ``burstiness`` and mean ``1 / rate``:
burstiness 1 is a Poisson process (exponential gaps); below 1 requests come in bursts, above
1 more evenly (the gaps' coefficient of variation is ``1 / sqrt(burstiness)``).
"""

from __future__ import annotations

import math
import random


def arrival_offsets(
    num_requests: int, rate: float, burstiness: float = 1.0, seed: int = 0
) -> list[float]:
    """Send times in seconds from the start, the first at 0; ``rate`` inf sends all at once."""
    if num_requests < 0:
        raise ValueError(f"num_requests must be non-negative, got {num_requests}")
    if not rate > 0:
        raise ValueError(f"request rate must be positive (inf: all at once), got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be positive, got {burstiness}")
    if math.isinf(rate):
        return [0.0] * num_requests
    rng = random.Random(seed)
    scale = 1.0 / (rate * burstiness)  # mean gap = shape * scale = 1 / rate
    offsets, now = [], 0.0
    for _ in range(num_requests):
        offsets.append(now)
        now += rng.gammavariate(burstiness, scale)
    return offsets
