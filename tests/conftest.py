"""Settings for the whole test suite.

Kernel costs are not measured (``ONNXQUANT_MEASURE_COSTS=0``): node selection stays
deterministic and uses the fixed rules. The cost model's own tests inject a cost table or
measure into a temporary cache (tests/test_cost_model.py).
"""

from __future__ import annotations

import os

os.environ["ONNXQUANT_MEASURE_COSTS"] = "0"
