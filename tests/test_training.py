

def test_heldout_greedy_tau_is_the_leading_run_of_accepted_drafts() -> None:
    import numpy as np

    from dspark_sglang.training.heldout_eval import greedy_tau

    acc = np.array([[1, 1, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=bool)
    obs = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=bool)
    got = greedy_tau(acc, obs)
    # leading runs 2, 0, 2 (the unobserved tail is not accepted), 3
    assert got["blocks"] == 4 and abs(got["tau_greedy"] - (1 + 7 / 4)) < 1e-12
    # position 3 is reached by blocks 0 and 3 (block 2 is not observed there): 1 of 2
    assert got["per_position"][:3] == [0.75, 1.0, 0.5]
