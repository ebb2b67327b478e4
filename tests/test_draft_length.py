"""Draft-length policies of the algorithms the DSpark drafter serves (draft_length.py)."""

from __future__ import annotations

import pytest
import torch

from dspark_sglang.speculative.draft_length import (
    FixedChain,
    Scheduled,
    SingleToken,
    Tree,
    draft_length_policy,
)
from dspark_sglang.speculative.sps_profile import SPSTable


def test_each_algorithm_gets_its_policy() -> None:
    flat = SPSTable.flat(10.0)
    dspark = draft_length_policy("DSPARK", 7, 4, flat, 2)
    chain = draft_length_policy("CHAIN", 7, None, None, 2)
    mtp = draft_length_policy("MTP1", 7, 5, None, 2)
    tree = draft_length_policy("TREE", 7, None, None, 3)
    assert isinstance(dspark, Scheduled) and dspark.budgeted and not dspark.tree
    assert dspark.max_draft_len() == 4 and dspark.sps_table is flat
    assert type(chain) is FixedChain and chain.max_draft_len() == 7 and not chain.budgeted
    assert isinstance(mtp, SingleToken) and mtp.max_draft_len() == 1
    assert isinstance(tree, Tree) and tree.tree and not tree.budgeted
    assert (tree.topk, tree.num_nodes, tree.num_draft, tree.max_draft_len()) == (3, 14, 7, 14)
    assert draft_length_policy("TREE", 7, 20, None, 3).max_draft_len() == 20
    with pytest.raises(ValueError):
        draft_length_policy("NGRAM", 7, None, None, 1)


def test_verify_lengths() -> None:
    conf = torch.tensor([[0.9, 0.9, 0.9], [0.0, 0.0, 0.0]])
    assert FixedChain(3).verify_lengths(conf, [2, 3]) == ([2, 3], None)
    assert Scheduled(3, None).verify_lengths(conf, [2, 3]) == ([2, 3], None)
    lengths, decision = Scheduled(3, SPSTable.flat(10.0)).verify_lengths(conf, [2, 3])
    # verification is free under a flat table: confident drafts are verified up to their limit,
    # drafts that cannot survive are not
    assert lengths == [2, 0] and decision is not None and decision.lengths == lengths
