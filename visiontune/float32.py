"""float32 fields in Python: protobuf keeps `float` fields as float32, Python reads them back as float64.

0.003 set on a float field reads back as 0.0030000000260770321; `shortest` turns it into 0.003 again, for
messages and files people read.
"""

from __future__ import annotations

import math
import struct
from typing import Final

MAX: Final = 3.4028234663852886e38  # the largest finite float32


def shortest(value: float) -> float:
    """The shortest decimal that is the same float32 as `value`; non-finite and out-of-range values unchanged."""
    if not math.isfinite(value) or abs(value) > MAX:
        return value
    target = struct.pack("<f", value)
    for digits in range(1, 10):  # 9 significant digits always identify a float32
        candidate = float(f"{value:.{digits}g}")
        if abs(candidate) <= MAX and struct.pack("<f", candidate) == target:
            return candidate
    return value
