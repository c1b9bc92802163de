"""Epochs without replacement, in-order reading, start_token, the distinct-token count, and a resume whose global
batch changes, on real data (tinyshakespeare in a 512-token BPE, two train shards)."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from gptforge.data.loader import TokenLoader
from gptforge.data.shards import list_shards, read_shard
from gptforge.errors import GptforgeError

T = 32


def shards(path) -> list[np.ndarray]:
    return [np.asarray(read_shard(p), dtype=np.int64) for p in list_shards(path, "train")]


def all_windows(path, start_token: int = 0) -> list[tuple]:
    """Every non-overlapping window of T + 1 tokens in file order, from ``start_token`` of the split on."""
    out, begin = [], 0
    for s in shards(path):
        lo = min(max(start_token - begin, 0), len(s))
        out += [tuple(s[o:o + T + 1].tolist()) for o in range(lo, len(s) - T, T)]
        begin += len(s)
    return out


def rows(x: torch.Tensor, y: torch.Tensor) -> list[tuple]:
    """The T + 1 tokens of each window of a batch."""
    return [tuple(a.tolist()) + (int(b[-1]),) for a, b in zip(x, y)]


def take(loader: TokenLoader, steps: int) -> list[tuple]:
    return [w for _ in range(steps * loader.grad_accum) for w in rows(*loader.next_batch())]


def test_one_sequential_epoch_sees_every_window_exactly_once(shakespeare_shards):
    expected = Counter(all_windows(shakespeare_shards))
    loader = TokenLoader(shakespeare_shards, "train", T, micro_batch=50, grad_accum=2, seed=3, mode="sequential")
    W = loader.windows_per_epoch
    assert W == sum(expected.values()) and W % 100  # the last global batch straddles into epoch 2
    seen = take(loader, -(-W // 100))
    assert Counter(seen[:W]) == expected  # every window, none twice
    assert seen[:W] != all_windows(shakespeare_shards)  # shuffled, not file order
    assert loader.coverage()["distinct_tokens"] == W * T and loader.coverage()["exact"]
    second = seen[W:] + take(loader, -(-W // 100))
    assert Counter(second[:W]) == expected and second[:W] != seen[:W]  # epoch 2: all again, in a new order


def test_an_epoch_split_over_two_ranks_has_no_window_twice(shakespeare_shards):
    expected = Counter(all_windows(shakespeare_shards))
    ranks = [TokenLoader(shakespeare_shards, "train", T, micro_batch=40, grad_accum=2, rank=r, world_size=2,
                         seed=11, mode="sequential") for r in range(2)]
    W = ranks[0].windows_per_epoch
    steps = W // 160
    per_rank = [take(r, steps) for r in ranks]
    assert not set(per_rank[0]) & set(per_rank[1])  # the ranks never share a window
    # the epoch's last windows open the next global batch (rank 0's slice first, then rank 1's)
    nxt = take(ranks[0], 1) + take(ranks[1], 1)
    assert Counter(per_rank[0] + per_rank[1] + nxt[:W - steps * 160]) == expected
    single = TokenLoader(shakespeare_shards, "train", T, micro_batch=160, seed=11, mode="sequential")
    assert set(take(single, steps)) == set(per_rank[0] + per_rank[1])  # same data as one process


def test_in_order_reads_the_windows_in_file_order_every_epoch(shakespeare_shards):
    order = all_windows(shakespeare_shards)
    loader = TokenLoader(shakespeare_shards, "train", T, micro_batch=64, seed=0, mode="in_order")
    W = loader.windows_per_epoch
    got = take(loader, -(-W // 64) + 3)
    assert got[:W] == order and got[W:] == order[:len(got) - W]  # then the next epoch from the top again
    assert TokenLoader(shakespeare_shards, "train", T, micro_batch=4, mode="sequential", shuffle=False).mode == \
        "in_order"  # the older spelling


def test_start_token_skips_the_first_tokens_and_in_order_says_where_to_continue(shakespeare_shards):
    first_len = len(shards(shakespeare_shards)[0])
    start = first_len + 1000  # inside the second shard
    loader = TokenLoader(shakespeare_shards, "train", T, micro_batch=16, mode="in_order", start_token=start)
    split = np.concatenate(shards(shakespeare_shards))
    got = take(loader, 5)
    assert got == all_windows(shakespeare_shards, start)[:80]
    assert got[0] == tuple(split[start:start + T + 1].tolist())
    nxt = loader.coverage()["next_token"]
    assert nxt == start + 80 * T
    # a new run from that offset reads exactly what the old one would have read next
    cont = TokenLoader(shakespeare_shards, "train", T, micro_batch=16, mode="in_order", start_token=nxt)
    assert take(cont, 2) == take(loader, 2)
    # sequential from an offset: one epoch is exactly the windows after it
    seq = TokenLoader(shakespeare_shards, "train", T, micro_batch=16, mode="sequential", start_token=start)
    assert Counter(take(seq, seq.windows_per_epoch // 16)) <= Counter(all_windows(shakespeare_shards, start))
    with pytest.raises(GptforgeError, match="start_token=.* is outside"):
        TokenLoader(shakespeare_shards, "train", T, micro_batch=16, start_token=len(split))


def test_random_coverage_estimate_matches_the_windows_actually_drawn(shakespeare_shards):
    lengths = [len(s) for s in shards(shakespeare_shards)]
    loader = TokenLoader(shakespeare_shards, "train", T, micro_batch=256, seed=4)
    steps = round(sum(lengths) / (256 * T))  # one nominal epoch of draws
    seen = [np.zeros(n, dtype=bool) for n in lengths]
    for step in range(steps):
        shard, offset = loader._random_starts(step)  # the draws of global batch `step`
        for s, o in zip(shard.tolist(), offset.tolist()):
            seen[s][o + 1:o + T + 1] = True  # its targets
        loader.next_batch()
    exact = sum(int(m.sum()) for m in seen)
    cov = loader.coverage()
    assert not cov["exact"] and cov["tokens"] == steps * 256 * T
    assert cov["distinct_tokens"] == pytest.approx(exact, rel=0.01)
    assert 0.60 < exact / sum(n - 1 for n in lengths) < 0.66  # ~1 - 1/e: a third of the data never seen


def test_pretrain_resumed_with_a_doubled_global_batch_continues_at_the_next_token(
        shakespeare_shards, tmp_path, small_config, monkeypatch):
    from gptforge.train import pretrain

    windows: list[tuple] = []

    class Recording(TokenLoader):
        def next_batch(self):
            x, y = super().next_batch()
            windows.extend(rows(x, y))
            return x, y

    monkeypatch.setattr(pretrain, "TokenLoader", Recording)
    budget = 8 * 8 * T  # 8 steps of 8 sequences, or 4 of 16
    cfg = small_config(shakespeare_shards, tmp_path, "grow", steps=None, max_tokens=budget, stop_at=4)
    cfg.data.sampling, cfg.eval.sample_interval, cfg.data.val_tokens = "sequential", 0, 0
    first = pretrain.run_pretrain(cfg)
    assert first.tokens == 4 * 8 * T and len(windows) == 32

    cfg.train.global_batch_seqs, cfg.train.micro_batch, cfg.train.stop_at = 16, 8, None
    cfg.checkpoint.resume = True
    logged: list[str] = []
    second = pretrain.run_pretrain(cfg, log=logged.append)
    line = next(x for x in logged if "another global batch" in x)
    assert "(8 → 16 sequences" in line and f"continues at token {4 * 8 * T:,}" in line
    assert "at its step 2 " in line and "ends at step 6" in line

    reference = TokenLoader(shakespeare_shards, "train", T, micro_batch=8, seed=cfg.train.seed, mode="sequential")
    assert windows == take(reference, 8)  # the same 64 windows, in order: none repeated, none skipped
    assert second.tokens == budget and second.steps == 6
    state = json.loads((second.checkpoint / "state.json").read_text())
    assert state["loader"]["windows"] == 64 and state["loader"]["global_batch"] == 16
    assert second.summary["distinct_tokens"] == budget and second.summary["distinct_tokens_exact"]
    recs = [json.loads(x) for x in (second.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["tokens"]) for r in recs][-3:] == [(4, 1024), (5, 1536), (6, 2048)]
    schedule = cfg.optim.schedule_for(4)  # the configured schedule of the 16-sequence plan, at steps 2 and 3
    assert [r["lr"] for r in recs[-2:]] == pytest.approx([schedule.lr_at(2), schedule.lr_at(3)])
