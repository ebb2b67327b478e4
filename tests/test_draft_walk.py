"""``DraftWalk``: the one helper that walks a grammar along draft tokens (chains, n-gram cuts,
tree branches) and never changes the matcher it starts from."""

from __future__ import annotations

from typing import Any

from dspark_sglang.constrained.draft_walk import DraftWalk, valid_draft_prefix


class _Increasing:
    """A toy matcher: accepts strictly increasing tokens; 0 is EOS (terminates). Counts copies."""

    copies = 0

    def __init__(self, last: int = 0, terminated: bool = False) -> None:
        self.last, self.terminated = last, terminated

    def copy(self) -> _Increasing:
        _Increasing.copies += 1
        return _Increasing(self.last, self.terminated)

    def is_terminated(self) -> bool:
        return self.terminated

    def accept_token(self, tok: int) -> bool:
        if self.terminated:
            return False
        if tok == 0:
            self.terminated = True
            return True
        if tok <= self.last:
            return False
        self.last = tok
        return True


def _g(last: int = 0) -> Any:
    return _Increasing(last)


def test_walk_copies_once_and_leaves_the_live_matcher_alone() -> None:
    live = _g(1)
    _Increasing.copies = 0
    w = DraftWalk(live)
    assert w.grammar is live and _Increasing.copies == 0  # reading costs no copy
    assert w.extend([2, 5, 4, 7]) == 2 and not w.alive
    assert _Increasing.copies == 1 and live.last == 1
    assert w.grammar.last == 5 and w.num_accepted == 2
    assert not w.advance(9)  # a dead walk stays dead


def test_eos_ends_the_walk_after_it() -> None:
    w = DraftWalk(_g())
    assert w.extend([3, 0, 4]) == 2
    assert w.grammar.is_terminated() and not w.alive


def test_branches_are_independent() -> None:
    live = _g()
    root = DraftWalk(live)
    a, b = root.branch(), root.branch()
    assert a.advance(5) and b.advance(3) and b.advance(4)
    assert (a.grammar.last, b.grammar.last, live.last) == (5, 4, 0)
    c = a.branch()
    assert a.advance(6) and c.advance(9)
    assert (a.grammar.last, c.grammar.last) == (6, 9)
    d = c.branch()
    assert not d.advance(9) and not d.alive and c.alive and c.advance(10)


def test_valid_draft_prefix() -> None:
    assert valid_draft_prefix(None, [3, 1]) == [3, 1]
    live = _g(2)
    assert valid_draft_prefix(live, [3, 4, 4, 5]) == [3, 4]
    assert valid_draft_prefix(live, [1]) == [] and live.last == 2
