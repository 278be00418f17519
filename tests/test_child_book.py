"""The operator's child book (kube.child_book): the children of each run as the watch showed
them, and a namespace complete only once every child listed at its first reconcile was seen
(or is gone), so a restarted operator never plans a child it made before."""

from __future__ import annotations

import asyncio

from xwin_operator.kube.child_book import ChildBook

from test_operator_kube import LABELS, NS, cond, pytorchjob


def job(name: str, uid: str, **status) -> dict:
    body = pytorchjob(name, **status)
    body["metadata"]["uid"] = uid
    return body


def test_the_watch_events_of_a_child_are_its_runs_children():
    book = ChildBook()
    book.saw(None, job("r-sft-1", "u1"))
    book.saw("MODIFIED", job("r-sft-1", "u1", conditions=[cond("Succeeded")]))
    book.saw("ADDED", job("r-sft-2", "u2"))
    assert sorted((c.name, c.phase) for c in book.children(NS, "r")) == [("r-sft-1", "Succeeded"),
                                                                        ("r-sft-2", "Pending")]
    book.saw("DELETED", job("r-sft-1", "u1"))
    assert [c.name for c in book.children(NS, "r")] == ["r-sft-2"]
    other = job("s-sft-1", "u3")
    other["metadata"]["labels"] = {**LABELS, "xwin.ai/run": "s"}
    book.saw("ADDED", other)
    assert [c.name for c in book.children(NS, "s")] == ["s-sft-1"] and book.children("elsewhere", "r") == []


def test_a_namespace_is_complete_once_every_listed_child_was_seen_or_is_gone():
    async def scenario() -> list[bool]:
        book = ChildBook()
        book.saw(None, job("r-sft-1", "u1"))          # the watch was quicker than the listing
        book.expect(NS, {"u1", "u2", "u3"})
        steps = [book.complete(NS)]
        book.saw(None, job("r-sft-2", "u2"))
        steps.append(book.complete(NS))
        book.still_there(NS, {"u1", "u2"})             # u3 was deleted before the watch showed it
        await asyncio.wait_for(book.wait(NS), 1)
        steps.append(book.complete(NS))
        return steps

    assert asyncio.run(scenario()) == [False, False, True]


def test_an_empty_namespace_is_complete_at_once():
    async def scenario() -> bool:
        book = ChildBook()
        assert not book.listed(NS)
        book.expect(NS, set())
        return book.complete(NS)

    assert asyncio.run(scenario())
