"""The top-k teacher cache on disk: round trip, byte accounting, resume after a crash, and refusing a cache built
for another k or temperature. Pure tensors, no model."""

import json

import pytest
import torch

from ssb.errors import SsbError
from ssb.losses import topk_teacher
from ssb.teacher_cache import INDEX, TopkCacheReader, TopkCacheWriter, bytes_per_token, check_existing

K, V, T = 4, 50, 2.0


def _example(n, seed):
    logits = torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3
    return topk_teacher(logits, K, temperature=T)


def _write(writer, names, lens, seed0=0):
    parts = [_example(n, seed0 + i) for i, n in enumerate(lens)]
    writer.write_shard(names, [p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts])
    return dict(zip(names, parts))


def test_round_trip_by_example_id(tmp_path):
    w = TopkCacheWriter(tmp_path, K, T, fingerprint="fp")
    want = _write(w, ["a", "b"], [3, 5])
    want.update(_write(w, ["c"], [1], seed0=7))
    w.finish()
    r = TopkCacheReader(tmp_path, K, T, "fp")
    assert len(r) == 3 and r.total_tokens == 9 and r.tokens("b") == 5 and "d" not in r
    for name, (lp, ids, tail) in want.items():
        glp, gids, gtail = r[name]
        assert glp.dtype == torch.float16 and gids.dtype == torch.int32 and gtail.dtype == torch.float32
        torch.testing.assert_close(glp.float(), lp, rtol=1e-3, atol=1e-3)
        assert torch.equal(gids.long(), ids) and torch.equal(gtail, tail)
    blp, bids, btail = r.batch(["c", "a"])  # concatenated in the order asked
    assert torch.equal(bids.long(), torch.cat([want["c"][1], want["a"][1]])) and btail.shape == (4,)
    with pytest.raises(KeyError):
        r["zz"]


def test_bytes_per_token(tmp_path):
    assert bytes_per_token(64) == bytes_per_token(64, "bfloat16") == 64 * 2 + 64 * 4 + 4 == 388 <= 400
    assert bytes_per_token(64) * 1000 < 151_936 * 4  # vs full fp32 logits at Qwen2.5's vocabulary
    w = TopkCacheWriter(tmp_path, K, T)
    _write(w, ["a"], [2000])
    w.finish()
    r = TopkCacheReader(tmp_path)
    payload = 2000 * bytes_per_token(K)
    assert payload <= r.stored_bytes() <= payload + 1024  # only a small safetensors header on top


def test_crash_loses_only_the_shard_in_flight_and_resume_continues(tmp_path, monkeypatch):
    w = TopkCacheWriter(tmp_path, K, T, fingerprint="fp")
    want = _write(w, ["a", "b"], [3, 2])
    import ssb.teacher_cache as tc

    def crash(*a, **k):
        raise OSError("disk gone")

    monkeypatch.setattr(tc, "write_json", crash)  # the shard file lands, the index update does not
    with pytest.raises(OSError):
        _write(w, ["c"], [4], seed0=5)
    monkeypatch.undo()
    assert (tmp_path / "shard-00001.safetensors").exists()
    with pytest.raises(SsbError, match="incomplete"):
        TopkCacheReader(tmp_path)
    w2 = TopkCacheWriter(tmp_path, K, T, fingerprint="fp")  # resume
    assert w2.done == {"a", "b"} and not w2.complete
    want.update(_write(w2, ["c"], [4], seed0=9))  # overwrites the stray shard
    w2.finish()
    r = TopkCacheReader(tmp_path, K, T, "fp")
    assert len(r) == 3 and len(json.loads((tmp_path / INDEX).read_text())["shards"]) == 2
    for name, (_, ids, tail) in want.items():
        assert torch.equal(r[name][1].long(), ids) and torch.equal(r[name][2], tail)
    with pytest.raises(ValueError):
        _write(w2, ["a"], [1])  # an id is written once


def test_refuses_other_k_temperature_or_inputs(tmp_path):
    w = TopkCacheWriter(tmp_path, K, T, fingerprint="fp")
    _write(w, ["a"], [2])
    w.finish()
    with pytest.raises(SsbError, match="temperature"):
        check_existing(tmp_path, K, 1.0, "fp")
    with pytest.raises(SsbError, match="k=4"):
        TopkCacheReader(tmp_path, k=8, temperature=T)
    with pytest.raises(SsbError, match="temperature"):
        TopkCacheWriter(tmp_path, K, 1.0, fingerprint="fp")
    with pytest.raises(SsbError, match="fingerprint"):
        check_existing(tmp_path, K, T, "other")
    check_existing(tmp_path, K, T, "fp")  # the matching one is fine
    check_existing(tmp_path / "nothing-here", K, T, "fp")
    with pytest.raises(SsbError, match="no teacher cache"):
        TopkCacheReader(tmp_path / "nothing-here")
    with pytest.raises(ValueError, match="expected"):  # rows of another k
        TopkCacheWriter(tmp_path / "x", K, T).write_shard(["a"], [torch.zeros(2, K + 1)], [torch.zeros(2, K + 1)],
                                                          [torch.zeros(2)])
