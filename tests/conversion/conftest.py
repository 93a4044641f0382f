"""The ``case`` fixture: every tiny model of :mod:`tests.conversion.models`."""

from __future__ import annotations

import pytest

from tests.conversion.models import CASES, Case


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]
