"""Shared settings of the fault and bad-input suite.

Property-based tests run under a hypothesis profile chosen by ``HYPOTHESIS_PROFILE``:
- ``ci`` (default): derandomized (the same examples on every run, so CI is reproducible and a
  failure seen once is seen again), no deadline (a 2-core CI machine is slow and noisy), and the
  example counts written beside each test;
- ``explore``: random seeds and ``RELIABILITY_EXAMPLES`` times as many examples, for hunting new
  failures locally: ``HYPOTHESIS_PROFILE=explore RELIABILITY_EXAMPLES=20 pytest tests/reliability``.
A failure prints the example and a ``@reproduce_failure`` blob that replays it.
"""

import os

from hypothesis import HealthCheck, settings

_common = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])
settings.register_profile("ci", derandomize=True, database=None, **_common)
settings.register_profile("explore", **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
