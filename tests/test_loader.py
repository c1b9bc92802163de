"""The shard loader: shifted targets, disjoint data per rank, exact resume (also across a batch change), a fixed
validation slice. Epochs, in-order reading, start_token and coverage: test_loader_epochs.py."""

import numpy as np
import pytest
import torch

from gptforge.data.loader import TokenLoader, validation_windows
from gptforge.data.shards import list_shards, read_shard
from gptforge.errors import GptforgeError

T = 32


def windows_of(x: torch.Tensor) -> set[tuple]:
    return {tuple(row.tolist()) for row in x}


def test_targets_are_inputs_shifted_by_one_and_come_from_the_text(shakespeare_shards, shakespeare_bpe,
                                                                   shakespeare_text):
    loader = TokenLoader(shakespeare_shards, "train", T, micro_batch=4, seed=1)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, T) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y):
        assert shakespeare_bpe.decode(row_x.tolist() + row_y[-1:].tolist()) in shakespeare_text


def test_ranks_get_disjoint_slices_of_the_single_process_global_batch(shakespeare_shards):
    single = TokenLoader(shakespeare_shards, "train", T, micro_batch=4, grad_accum=2, seed=7)
    ranks = [TokenLoader(shakespeare_shards, "train", T, micro_batch=4, grad_accum=1, rank=r, world_size=2, seed=7)
             for r in range(2)]
    for _ in range(5):
        whole = torch.cat([single.next_batch()[0], single.next_batch()[0]])
        parts = [r.next_batch()[0] for r in ranks]
        assert torch.equal(torch.cat(parts), whole)  # same global batch, rank r takes its contiguous slice
        assert not windows_of(parts[0]) & windows_of(parts[1])


def test_sequential_mode_is_one_epoch_of_nonoverlapping_windows_split_across_ranks(shakespeare_shards):
    shards = [read_shard(p) for p in list_shards(shakespeare_shards, "train")]
    per_epoch = sum((len(s) - 1) // T for s in shards)
    ranks = [TokenLoader(shakespeare_shards, "train", T, micro_batch=16, rank=r, world_size=2, seed=3,
                         mode="sequential") for r in range(2)]
    assert ranks[0].windows_per_epoch == per_epoch
    seen: list[tuple] = []
    for _ in range(per_epoch // 32):
        for r in ranks:
            seen.extend(tuple(row.tolist()) for row in r.next_batch()[0])
    assert len(seen) == len(set(seen)) == (per_epoch // 32) * 32  # every window at most once in an epoch
    assert ranks[0].epoch == pytest.approx((per_epoch // 32) * 32 / per_epoch)
    expected = {tuple(s[i * T:i * T + T].tolist()) for s in shards for i in range((len(s) - 1) // T)}
    assert set(seen) <= expected


def test_state_dict_resumes_with_exactly_the_batches_it_would_have_seen(shakespeare_shards):
    for mode, start in (("random", 0), ("sequential", 0), ("in_order", 0), ("sequential", 50_000)):
        a = TokenLoader(shakespeare_shards, "train", T, micro_batch=4, grad_accum=3, seed=5, mode=mode,
                        start_token=start)
        for _ in range(7):
            a.next_batch()
        state = a.state_dict()
        expected = [a.next_batch() for _ in range(5)]
        b = TokenLoader(shakespeare_shards, "train", T, micro_batch=4, grad_accum=3, seed=5, mode=mode,
                        start_token=start)
        assert b.load_state_dict(state) is None  # same layout: nothing to map
        for (ex, ey), (gx, gy) in zip(expected, (b.next_batch() for _ in range(5))):
            assert torch.equal(ex, gx) and torch.equal(ey, gy)


def test_resume_with_another_global_batch_continues_at_the_same_window(shakespeare_shards):
    a = TokenLoader(shakespeare_shards, "train", T, micro_batch=4, seed=5, mode="sequential")
    for _ in range(3):
        a.next_batch()
    state = a.state_dict()
    reference = torch.cat([a.next_batch()[0] for _ in range(4)])  # windows 12..27 at batch 4
    b = TokenLoader(shakespeare_shards, "train", T, micro_batch=8, seed=5, mode="sequential")
    mapped = b.load_state_dict(state)
    assert mapped == {"step": 3, "windows": 12, "tokens": 12 * T, "from_global_batch": 4, "to_global_batch": 8}
    assert torch.equal(torch.cat([b.next_batch()[0] for _ in range(2)]), reference)
    assert b.step == 5 and b.tokens_consumed == 28 * T
    c = TokenLoader(shakespeare_shards, "train", T, micro_batch=8, seed=5, mode="sequential")
    c.load_state_dict(b.state_dict())  # and the mapped run resumes exactly in turn
    assert torch.equal(c.next_batch()[0], b.next_batch()[0])


def test_random_windows_after_a_batch_change_are_fresh_draws(shakespeare_shards):
    a = TokenLoader(shakespeare_shards, "train", T, micro_batch=8, seed=5)
    a.next_batch()
    b = TokenLoader(shakespeare_shards, "train", T, micro_batch=16, seed=5)
    b.load_state_dict(a.state_dict())
    drawn = windows_of(b.next_batch()[0])
    again = TokenLoader(shakespeare_shards, "train", T, micro_batch=8, seed=5)
    earlier = windows_of(torch.cat([again.next_batch()[0] for _ in range(3)]))
    assert len(drawn) == 16 and not drawn & earlier  # not the old generator's draws replayed


def test_resume_with_other_data_settings_is_refused(shakespeare_shards):
    a = TokenLoader(shakespeare_shards, "train", T, micro_batch=4, seed=5, mode="sequential")
    for key, kwargs in (("seed", {"seed": 6}), ("mode", {"mode": "in_order"}), ("start_token", {"start_token": 64})):
        b = TokenLoader(shakespeare_shards, "train", T, micro_batch=4, **{"seed": 5, "mode": "sequential", **kwargs})
        with pytest.raises(GptforgeError, match=f"checkpoint has {key}="):
            b.load_state_dict(a.state_dict())


def test_different_seeds_give_different_random_windows(shakespeare_shards):
    a = TokenLoader(shakespeare_shards, "train", T, micro_batch=8, seed=1).next_batch()[0]
    b = TokenLoader(shakespeare_shards, "train", T, micro_batch=8, seed=2).next_batch()[0]
    assert not torch.equal(a, b)


def test_validation_slice_is_fixed_and_covers_the_first_val_tokens(shakespeare_shards):
    val = np.asarray(read_shard(list_shards(shakespeare_shards, "val")[0]))
    w = validation_windows(shakespeare_shards, T, max_tokens=1000)
    assert w.shape == ((1000 - 1) // T, T + 1)
    assert np.array_equal(w[0], val[: T + 1]) and np.array_equal(w[1], val[T: 2 * T + 1])
    assert np.array_equal(w, validation_windows(shakespeare_shards, T, max_tokens=1000))
    assert validation_windows(shakespeare_shards, T, 1000, split="missing").shape == (0, T + 1)


def test_too_little_data_for_the_window_is_a_clear_error(shakespeare_shards):
    with pytest.raises(GptforgeError, match="too few"):
        TokenLoader(shakespeare_shards, "val", 5_000_000, micro_batch=1)
    with pytest.raises(GptforgeError, match="no train shards"):
        TokenLoader(shakespeare_shards / "nowhere", "train", T, micro_batch=1)
