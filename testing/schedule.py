"""The order of the suite's modules in a parallel run.

``scripts/test`` runs the suite on pytest-xdist's workers, a module to a worker
(``--dist loadfile``), handing out the modules in the order they were collected
(``--no-loadscope-reorder``: by default xdist hands out the modules of most tests
first). A long module handed out last runs alone while the other workers idle:
schemathesis's two runs (``test_contract.py``) take five minutes or more. So the
longest modules go first; the rest keep the order pytest gave them. This module is a
pytest plugin (``tests/conftest.py`` loads it: ``pytest_plugins``).
"""

from __future__ import annotations

import pytest

#: The modules whose tests take longest together, longest first: ``scripts/test
#: --durations=0`` in a fresh clone, summed per module (the setup of the venvs included).
LONGEST_FIRST = (
    "test_contract.py",
    "test_llm.py",
    "test_package.py",
    "test_takeover.py",
    "test_bench.py",
    "test_anthropic_sdk.py",
    "test_nothing_hangs.py",
    "test_real_clients.py",
    "test_redis_cluster.py",
    "test_failover.py",
)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def place(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=place)  # stable: each module's own order is kept
