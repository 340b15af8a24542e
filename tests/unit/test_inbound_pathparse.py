"""relay.inbound.pathparse.simple_path and LimitedSMTP._getaddr against aiosmtpd's parse.

Whenever the fast path answers, its (address, rest) must be exactly what aiosmtpd's
`SMTP._getaddr` gives for the same argument; LimitedSMTP._getaddr must equal the library
on every input, the fallback forms and the local-part limit included.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given
from hypothesis import strategies as st

from relay.inbound.pathparse import simple_path
from relay.inbound.server import ConnectionLimiter, LimitedSMTP
from relay.metrics import Metrics


def _outcome(parse: Callable[[str], object], arg: str) -> object:
    """The result, or the exception type: the library raises IndexError for "<"."""
    try:
        return parse(arg)
    except Exception as exc:  # noqa: BLE001 - compared, not handled
        return type(exc)


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[SMTP, LimitedSMTP]]:
    loop = asyncio.new_event_loop()
    library = SMTP(object(), loop=loop)
    relay = LimitedSMTP(object(), ConnectionLimiter(1, 1), Metrics(), loop=loop)  # type: ignore[arg-type]
    yield library, relay
    loop.close()


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("<alice@sender.example>", ("alice@sender.example", "")),
        (
            "<alice@sender.example> SIZE=10240 BODY=8BITMIME",
            ("alice@sender.example", "SIZE=10240 BODY=8BITMIME"),
        ),
        ("<a.b+c@d-e.f>\tX", ("a.b+c@d-e.f", "X")),
        ("<a@b>x", ("a@b", "x")),
        ("<a@b>\r X", ("a@b", "\r X")),  # a CR is no folding white space for the library
        ("<a@b> \x0b\u2003X ", ("a@b", "X ")),
    ],
)
def test_simple_forms_take_the_fast_path_with_the_library_result(
    servers: tuple[SMTP, LimitedSMTP], arg: str, expected: tuple[str, str]
) -> None:
    library, relay = servers
    assert simple_path(arg) == expected
    assert library._getaddr(arg) == expected
    assert relay._getaddr(arg) == expected


@pytest.mark.parametrize(
    "arg",
    [
        "<>",
        "<> SIZE=1",
        " <a@b>",
        "a@b",
        '<"a b"@c>',
        "<a@[1.2.3.4]>",
        "<a..b@c>",
        "<.a@b>",
        "<a@b.>",
        "<a@b> (comment) X",
        "<a@b>(c)",
        "<é@b>",
        "<a@b@c>",
        "<@r:a@b>",
        "",
    ],
)
def test_other_forms_fall_back_to_the_library(servers: tuple[SMTP, LimitedSMTP], arg: str) -> None:
    library, relay = servers
    assert simple_path(arg) is None
    assert relay._getaddr(arg) == library._getaddr(arg)


def test_local_part_limit_applies_on_the_fast_path(servers: tuple[SMTP, LimitedSMTP]) -> None:
    library, relay = servers
    relay.local_part_limit = library.local_part_limit = 5
    try:
        assert relay._getaddr("<abcde@x.y>") == library._getaddr("<abcde@x.y>") == ("abcde@x.y", "")
        assert (
            relay._getaddr("<abcdef@x.y> A") == library._getaddr("<abcdef@x.y> A") == (None, None)
        )
    finally:
        relay.local_part_limit = library.local_part_limit = 0


_PIECES = st.sampled_from(
    [
        "<",
        ">",
        "@",
        ".",
        "a",
        "Z9",
        "-",
        "+",
        "'",
        '"',
        " ",
        "\t",
        "(",
        ")",
        "é",
        "\r",
        "[",
        "]",
        "=",
        "SIZE=1",
        "\\",
        ":",
        ",",
        "\x0b",
    ]
)


@given(st.lists(_PIECES, max_size=14).map("".join))
def test_generated_arguments_agree_with_the_library(arg: str) -> None:
    loop = asyncio.new_event_loop()
    try:
        library = SMTP(object(), loop=loop)
        relay = LimitedSMTP(object(), ConnectionLimiter(1, 1), Metrics(), loop=loop)  # type: ignore[arg-type]
        simple = simple_path(arg)
        if simple is not None:
            assert simple == library._getaddr(arg)
        assert _outcome(relay._getaddr, arg) == _outcome(library._getaddr, arg)
    finally:
        loop.close()


@given(
    st.from_regex(
        r"<[a-z0-9.+_-]{1,10}@[a-z0-9-]{1,8}(\.[a-z0-9-]{1,8}){0,2}>( [A-Z]+=[0-9]+)?",
        fullmatch=True,
    )
)
def test_generated_simple_paths_agree_with_the_library(arg: str) -> None:
    loop = asyncio.new_event_loop()
    try:
        library = SMTP(object(), loop=loop)
        simple = simple_path(arg)
        expected = library._getaddr(arg)
        if simple is not None:
            assert simple == expected
        else:
            assert ".." in arg or "<." in arg or ".@" in arg
    finally:
        loop.close()
