"""Fixtures shared by the component tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
from lab.scripted_dns import ScriptedDns


@pytest_asyncio.fixture
async def server() -> AsyncIterator[ScriptedDns]:
    """A ScriptedDns on 127.0.0.1; every script it was given must have rendered."""
    async with ScriptedDns() as srv:
        yield srv
        assert srv.errors == []
