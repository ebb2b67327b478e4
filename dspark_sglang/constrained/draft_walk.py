"""Walking a request's grammar along draft tokens without touching the live matcher.

Drafting and verification need the matcher state after each draft token (to mask the next
position, or to cut a draft at its first token the grammar refuses), while the live
``Req.grammar`` is advanced only by output processing. ``DraftWalk`` is the one place that does
this: a copy-on-write view of a matcher that advances along draft tokens and branches for trees.
"""

from __future__ import annotations

from collections.abc import Sequence

from dspark_sglang.constrained.base import Grammar


class DraftWalk:
    """A matcher walked along draft tokens; the matcher it starts from never changes.

    The first :meth:`advance` copies the matcher (``Grammar.copy``), so a walk that only reads
    masks costs no copy. A token the grammar refuses -- or any token after an accepted EOS --
    ends the walk: ``alive`` turns False, the state stays that of the last accepted token and
    every later :meth:`advance` returns False. :meth:`branch` starts another walk from the
    current state (tree drafts); the two share the matcher until either advances.
    """

    def __init__(self, grammar: Grammar) -> None:
        self._grammar = grammar
        self._owned = False  # whether _grammar is this walk's private copy
        self.alive = True
        self.num_accepted = 0  # draft tokens accepted so far

    @property
    def grammar(self) -> Grammar:
        """The matcher after the accepted tokens. Read it (masks, ``is_terminated``); never
        advance it directly, it may be shared with the live matcher or another walk."""
        return self._grammar

    def advance(self, token: int) -> bool:
        """Accept one more draft token; False (and the walk ends) if the grammar refuses it."""
        if not self.alive:
            return False
        if not self._owned:
            self._grammar = self._grammar.copy()
            self._owned = True
        if self._grammar.accept_token(token):
            self.num_accepted += 1
            return True
        self.alive = False
        return False

    def extend(self, tokens: Sequence[int]) -> int:
        """Advance along ``tokens`` until the first refusal; returns how many were accepted."""
        for i, tok in enumerate(tokens):
            if not self.advance(tok):
                return i
        return len(tokens)

    def branch(self) -> DraftWalk:
        """A walk from this one's current state; neither sees the other's later tokens."""
        other = DraftWalk(self._grammar)
        self._owned = False  # shared now: whichever advances first copies
        return other


def valid_draft_prefix(grammar: Grammar | None, tokens: list[int]) -> list[int]:
    """The longest prefix of ``tokens`` the grammar accepts in order (all of them without a
    grammar); ``grammar`` does not change."""
    if grammar is None or not tokens:
        return tokens
    return tokens[: DraftWalk(grammar).extend(tokens)]
