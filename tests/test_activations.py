"""Corpus packing, token filters, live capture blocks, the on-disk store and resumable batches."""

import math

import pytest
import torch

from mechreward.activations import (FilterConfig, LiveSource, StoreManifest, StoreSource, TensorSource, TokenStats,
                                    filter_tokens, harvest_to_store, sae_batches)
from mechreward.data import DataConfig, pack, token_batches
from mechreward.errors import DataError, MismatchError
from mechreward.models import ResidualCapture, find_layers
from tiny import tiny_model, tiny_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    lines = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(5 + i % 9)) + f" {i}" for i in range(400)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_pack_separates_documents_with_eos_and_cuts_rows():
    tok = tiny_tokenizer()
    rows = list(pack(tok, ["alpha beta", "gamma"], 3))
    flat = [t for r in rows for t in r]
    a = tok("alpha beta", add_special_tokens=False).input_ids
    g = tok("gamma", add_special_tokens=False).input_ids
    expect = a + [tok.eos_token_id] + g + [tok.eos_token_id]
    assert all(len(r) == 3 for r in rows)
    assert flat == expect[: len(flat)] and len(flat) == len(expect) // 3 * 3


def test_heldout_rows_are_not_in_the_training_stream(corpus):
    tok = tiny_tokenizer()
    cfg = DataConfig(source=corpus, context_length=16, batch_size=4, heldout_sequences=8)
    held, batches = token_batches(tok, cfg)
    train_rows = [tuple(r.tolist()) for b in batches for r in b]
    assert held.shape == (8, 16)
    all_rows = list(pack(tok, (l for l in open(corpus).read().splitlines() if l.strip()), 16))
    assert [tuple(r) for r in all_rows[:8]] == [tuple(r.tolist()) for r in held]
    assert train_rows == [tuple(r) for r in all_rows[8: 8 + len(train_rows)]]
    assert len(all_rows) - 8 - len(train_rows) < 4  # only a last partial batch is left out


def test_empty_corpus_and_missing_file_are_clear_errors(tmp_path):
    tok = tiny_tokenizer()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty.txt"):
        token_batches(tok, DataConfig(source=str(empty)))
    with pytest.raises(DataError, match="nope.jsonl"):
        token_batches(tok, DataConfig(source=str(tmp_path / "nope.jsonl")))
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"content": "x"}\n')
    with pytest.raises(DataError, match="'text'"):
        token_batches(tok, DataConfig(source=str(bad)))


def test_filters_count_and_drop_first_special_outlier():
    ids = torch.tensor([[5, 0, 7, 8], [9, 10, 0, 12]])  # 0 = special
    h = torch.ones(2, 4, 3)
    h[1, 3] *= 100.0  # outlier norm
    stats = TokenStats()
    kept = filter_tokens(ids, {3: h}, FilterConfig(outlier_factor=10.0), [0], stats)
    assert kept[3].shape == (3, 3)  # of 8: 2 first positions, 2 special, 1 outlier dropped
    assert stats == TokenStats(seen=8, kept=3, first_position=2, special=2, outlier=1, nonfinite=0)


def test_nonfinite_activations_error_names_layer_or_are_skipped():
    ids = torch.tensor([[1, 2, 3]])
    h = torch.zeros(1, 3, 2)
    h[0, 2, 1] = float("nan")
    with pytest.raises(DataError, match="layer 5 in model batch 7"):
        filter_tokens(ids, {5: h}, FilterConfig(), [], TokenStats(), batch_index=7)
    stats = TokenStats()
    kept = filter_tokens(ids, {5: h}, FilterConfig(skip_nonfinite=True, outlier_factor=0), [], stats)
    assert kept[5].shape == (1, 2) and stats["nonfinite"] == 1


def _live(corpus, layers=(1, 2), seed=0, per_block=3):
    tok = tiny_tokenizer()
    model = tiny_model("qwen3")
    cfg = DataConfig(source=corpus, context_length=16, batch_size=4, heldout_sequences=4)
    return LiveSource(model, layers, lambda: token_batches(tok, cfg)[1], FilterConfig(outlier_factor=0), [tok.eos_token_id],
                      batches_per_block=per_block, seed=seed), model, tok, cfg


def test_live_blocks_hold_every_kept_token_of_one_forward_per_layer(corpus):
    src, model, tok, cfg = _live(corpus)
    block, acts = next(src.blocks())
    ids = torch.cat(list(__import__("itertools").islice(token_batches(tok, cfg)[1], 3)))
    ref = ResidualCapture(model, [1, 2], early_exit=False).run(input_ids=ids)
    keep = (ids != tok.eos_token_id)
    keep[:, 0] = False
    for layer in (1, 2):
        expect = ref[layer][keep]
        assert acts[layer].shape == expect.shape
        # same multiset of rows: the block is a permutation of the kept tokens, identical for both layers
        order = torch.argsort(acts[layer][:, 0])
        torch.testing.assert_close(acts[layer][order], expect[torch.argsort(expect[:, 0])], rtol=1e-5, atol=1e-5)
    perm_1 = torch.cdist(acts[1], ref[1][keep]).argmin(dim=1)
    perm_2 = torch.cdist(acts[2], ref[2][keep]).argmin(dim=1)
    assert torch.equal(perm_1, perm_2)  # one shuffle shared by the layers
    assert src.stats["kept"] == int(keep.sum())


def test_live_source_stops_at_the_deepest_layer(corpus):
    src, model, _, _ = _live(corpus, layers=(1,))
    calls = []
    hs = [m.register_forward_pre_hook(lambda mod, a, i=i: calls.append(i)) for i, m in enumerate(find_layers(model))]
    next(src.blocks())
    for h in hs:
        h.remove()
    assert set(calls) == {0, 1}


def test_resuming_batches_mid_block_continues_bitwise(corpus):
    src, *_ = _live(corpus)
    full = list(__import__("itertools").islice(sae_batches(src, 8, (0, 0)), 20))
    pos, _ = full[9]
    src2, *_ = _live(corpus)
    resumed = list(__import__("itertools").islice(sae_batches(src2, 8, pos), 10))
    for (p1, b1), (p2, b2) in zip(full[10:], resumed):
        assert p1 == p2
        for layer in b1:
            assert torch.equal(b1[layer], b2[layer])


def test_different_seeds_shuffle_differently(corpus):
    a = next(_live(corpus, seed=0)[0].blocks())[1][1]
    b = next(_live(corpus, seed=1)[0].blocks())[1][1]
    assert a.shape == b.shape and not torch.equal(a, b)
    torch.testing.assert_close(a.sum(0), b.sum(0), rtol=1e-4, atol=1e-4)


def _manifest(src, cfg, per_shard):
    return StoreManifest(model="tiny", layers=src.layers, d_model=64, dtype="float32", context_length=cfg.context_length,
                         batches_per_shard=per_shard, source={"source": cfg.source}, filters={"outlier_factor": 0})


def test_store_resume_neither_duplicates_nor_loses_shards(corpus, tmp_path):
    src, _, _, cfg = _live(corpus)
    once = harvest_to_store(src, 2, tmp_path / "once", 300, _manifest(src, cfg, 2))
    src, *_ = _live(corpus)
    partial = harvest_to_store(src, 2, tmp_path / "twice", 120, _manifest(src, cfg, 2))
    assert len(partial.shards) < len(once.shards)
    src, *_ = _live(corpus)
    twice = harvest_to_store(src, 2, tmp_path / "twice", 300, _manifest(src, cfg, 2))
    assert twice.shards == once.shards and twice.tokens == once.tokens >= 300
    from safetensors.torch import load_file

    for s in once.shards:
        a, b = load_file(tmp_path / "once" / s["file"]), load_file(tmp_path / "twice" / s["file"])
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert StoreManifest.load(tmp_path / "twice").complete
    src, *_ = _live(corpus)
    m = _manifest(src, cfg, 2)
    m.model = "another-model"
    with pytest.raises(MismatchError, match="another-model"):
        harvest_to_store(src, 2, tmp_path / "twice", 400, m)


def test_store_source_reads_every_token_once_per_epoch_and_checks_model_and_layer(corpus, tmp_path):
    src, _, _, cfg = _live(corpus)
    m = harvest_to_store(src, 1, tmp_path / "s", 200, _manifest(src, cfg, 1))
    store = StoreSource(tmp_path / "s", [2], shards_per_block=2, seed=3, expect_model="tiny")
    per_epoch = math.ceil(len(m.shards) / 2)
    blocks = [b[2] for _, b in __import__("itertools").islice(store.blocks(), per_epoch)]
    epoch = torch.cat(blocks)
    assert epoch.shape[0] == m.tokens
    from safetensors.torch import load_file

    everything = torch.cat([load_file(tmp_path / "s" / s["file"])["layer_2"] for s in m.shards])
    torch.testing.assert_close(epoch.sum(0), everything.sum(0), rtol=1e-4, atol=1e-3)
    with pytest.raises(MismatchError, match="other"):
        StoreSource(tmp_path / "s", [2], expect_model="other")
    with pytest.raises(MismatchError, match=r"\[0\]"):
        StoreSource(tmp_path / "s", [0], expect_model="tiny")


def test_tensor_source_epochs_are_permutations():
    x = torch.arange(40, dtype=torch.float32).reshape(20, 2)
    src = TensorSource(x, block_tokens=10, seed=0)
    it = src.blocks()
    epoch = torch.cat([next(it)[1][0] for _ in range(2)])
    assert sorted(epoch[:, 0].tolist()) == x[:, 0].tolist()
    with pytest.raises(DataError, match="finite"):
        TensorSource(torch.tensor([[float("inf"), 0.0]]))


def test_prefetch_yields_the_same_batches_positions_and_counts(corpus):
    import itertools

    plain_src, *_ = _live(corpus)
    plain = list(itertools.islice(sae_batches(plain_src, 8, (0, 3)), 40))
    plain_stats = (dict(plain_src.checkpoint_stats), dict(plain_src.consumed_stats))
    pre_src, *_ = _live(corpus)
    pre = list(itertools.islice(sae_batches(pre_src, 8, (0, 3), prefetch=True), 40))
    assert [p for p, _ in pre] == [p for p, _ in plain]
    for (_, a), (_, b) in zip(plain, pre):
        assert all(torch.equal(a[l], b[l]) for l in a)
    # what a checkpoint saves / a report shows is the consumed blocks, not the block prefetched ahead
    assert (dict(pre_src.checkpoint_stats), dict(pre_src.consumed_stats)) == plain_stats
    assert pre_src.consumed_stats["kept"] - pre_src.checkpoint_stats["kept"] > 0


def test_prefetch_reraises_the_producers_error():
    class Failing(TensorSource):
        def blocks(self, start=0):
            it = super().blocks(start)
            yield next(it)
            raise DataError("non-finite activations at layer 0 in model batch 9")

    src = Failing(torch.randn(64, 4), block_tokens=32)
    with pytest.raises(DataError, match="model batch 9"):
        list(sae_batches(src, 16, prefetch=True))
