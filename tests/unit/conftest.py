"""Fixtures for the unit tests: the DANE certificate set (built once per session)."""

import pytest
from certfactory import Pki, build_pki


@pytest.fixture(scope="session")
def pki() -> Pki:
    """All test certificates; see ``certfactory.Pki`` for what each one is."""
    return build_pki()
