"""The training stream: determinism, exact resume, epoch coverage across ranks and workers, bad data counting."""

from __future__ import annotations

import gzip
import io
import tarfile
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from contrastive.config import ModelConfig
from contrastive.data.loader import build_train_loader
from contrastive.data.reader import iter_shard, split_key
from contrastive.data.shards import expand_shards, shards_for_slot
from contrastive.data.stream import ImageTextStream, Source, StreamLayout
from contrastive.data.transforms import Preprocess, build_train_transform
from contrastive.models import build_tokenizer
from contrastive.models.towers import model_image_size
from contrastive.types import StreamPosition
from tests.conftest import compose_config
from tests.data_factory import png, write_tar


@pytest.fixture(scope="module")
def tiny_model_cfg() -> ModelConfig:
    return compose_config(["model=test_tiny"]).model


def _stream(shards: list[str], tokenizer, *, rank=0, world_size=1, num_workers=1, resampled=True, batch=8,
            start_step=0, positions=None, max_skip_fraction=1.0, shuffle_buffer=50, sources=None) -> ImageTextStream:
    layout = StreamLayout(rank=rank, world_size=world_size, num_workers=num_workers, seed=7, resampled=resampled,
                          shuffle_buffer=shuffle_buffer)
    return ImageTextStream(sources or [Source("demo", shards, 1.0)], layout, build_train_transform(28),
                           tokenizer, 28, batch,
                           max_skip_fraction=max_skip_fraction, start_step=start_step, positions=positions)


def _batches(stream: ImageTextStream, count: int, num_workers: int) -> list:
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


@pytest.mark.parametrize("resampled", [True, False])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_at_step_k_reproduces_the_batch_sequence(demo_root, tiny_model_cfg, resampled, num_workers):
    shards = expand_shards(str(demo_root / "train"))
    tokenizer = build_tokenizer(tiny_model_cfg)
    slots = max(1, num_workers)
    straight = _batches(_stream(shards, tokenizer, num_workers=slots, resampled=resampled), 14, num_workers)
    for k in (3, 8):  # 8 batches of 8 = 64 samples: crosses a shard boundary
        positions = {}
        for batch in straight[:k]:
            positions[batch.stream_position.worker] = batch.stream_position
        resumed = _batches(_stream(shards, tokenizer, num_workers=slots, resampled=resampled, start_step=k,
                                   positions=positions), 14 - k, num_workers)
        assert [b.keys for b in resumed] == [b.keys for b in straight[k:]]
        assert all((a.images == b.images).all() for a, b in zip(resumed, straight[k:])), "augmentation differs"



def test_stream_position_is_saved_as_plain_data_and_resumes_from_it(demo_root, tiny_model_cfg, tmp_path):
    """A checkpoint holds the position as the dict layout runs have always written (weights_only-loadable), and a
    stream resumed from the loaded dict continues exactly."""
    shards = expand_shards(str(demo_root / "train"))
    tokenizer = build_tokenizer(tiny_model_cfg)
    straight = _batches(_stream(shards, tokenizer), 5, 0)
    torch.save({0: straight[2].stream_position.to_dict()}, tmp_path / "positions.pt")
    saved = torch.load(tmp_path / "positions.pt", weights_only=True)[0]
    assert saved == {"worker": 0, "sources": {"demo": saved["sources"]["demo"]}, "exhausted": [], "past_plan": True,
                     "past_plan_samples": 0, "mixer_draws": 24, "skipped": {}, "samples_seen": 24}
    assert isinstance(saved["sources"]["demo"], list) and len(saved["sources"]["demo"]) == 3
    position = StreamPosition.from_dict(saved)
    assert position == straight[2].stream_position
    resumed = _batches(_stream(shards, tokenizer, start_step=3, positions={0: position}), 2, 0)
    assert [b.keys for b in resumed] == [b.keys for b in straight[3:]]


def test_decoding_in_the_main_process_leaves_the_global_rng_alone(demo_root, tiny_model_cfg):
    """With num_workers=0 the stream augments in the training process: drawing from (or reseeding) torch's global
    generator there would make model randomness follow the last decoded sample."""
    shards = expand_shards(str(demo_root / "train"))
    tokenizer = build_tokenizer(tiny_model_cfg)
    torch.manual_seed(11)
    expected = torch.rand(8)
    torch.manual_seed(11)
    batches = iter(_stream(shards, tokenizer))  # not through a DataLoader, which draws its own base seed
    next(batches), next(batches)
    assert torch.equal(torch.rand(8), expected)

def test_resampled_stream_is_deterministic_for_a_seed(demo_root, tiny_model_cfg):
    shards = expand_shards(str(demo_root / "train"))
    tokenizer = build_tokenizer(tiny_model_cfg)
    first = [b.keys for b in _batches(_stream(shards, tokenizer), 5, 0)]
    second = [b.keys for b in _batches(_stream(shards, tokenizer), 5, 0)]
    assert first == second
    other_rank = [b.keys for b in _batches(_stream(shards, tokenizer, rank=1, world_size=2), 5, 0)]
    assert other_rank != first


def test_epoch_mode_sees_every_key_exactly_once_across_ranks_and_workers(demo_root):
    shards = expand_shards(str(demo_root / "train"))  # 8 shards for 2 ranks x 2 workers
    assigned = [url for rank in range(2) for worker in range(2)
                for url in shards_for_slot(shards, epoch=0, rank=rank, world_size=2, worker=worker, num_workers=2,
                                           seed=7, resampled=False)]
    assert sorted(assigned) == sorted(shards)
    with pytest.raises(ValueError, match="at least one shard per"):
        shards_for_slot(shards, epoch=0, rank=0, world_size=4, worker=0, num_workers=4, seed=7, resampled=False)


def test_epoch_mode_stream_covers_all_samples(demo_root, tiny_model_cfg):
    shards = expand_shards(str(demo_root / "train"))
    tokenizer = build_tokenizer(tiny_model_cfg)
    keys: Counter = Counter()
    for rank in range(2):
        batches = _batches(_stream(shards, tokenizer, rank=rank, world_size=2, num_workers=2, resampled=False,
                                   batch=16), 16, 2)  # 2 ranks x 16 batches x 16 = 512 samples = one epoch
        keys.update(key for batch in batches for key in batch.keys)
    assert len(keys) == 512 and set(keys.values()) == {1}


def test_bad_samples_are_skipped_and_counted_by_reason(tmp_path, tiny_model_cfg):
    good = [(f"good{i:03d}", {"png": png(), "txt": b"a photo of a bag."}) for i in range(40)]
    bad = [
        ("corrupt", {"png": b"\x89PNG not really", "txt": b"a caption"}),
        ("nocaption", {"png": png()}),
        ("emptycaption", {"png": png(), "txt": b"   "}),
        ("noimage", {"txt": b"a caption"}),
    ]
    write_tar(tmp_path / "0.tar", good[:10] + bad + good[10:20])
    write_tar(tmp_path / "1.tar", good[20:])
    whole = (tmp_path / "1.tar").read_bytes()
    (tmp_path / "2.tar").write_bytes(whole[: len(whole) // 2])  # truncated copy: its first samples still count
    shards = [str(tmp_path / f"{i}.tar") for i in range(3)] + [str(tmp_path / "missing.tar")]
    stream = _stream(shards, build_tokenizer(tiny_model_cfg), resampled=False, batch=4, shuffle_buffer=0)
    # One epoch holds 52 good samples = 13 batches; the 14th starts the next epoch with good samples only, after
    # every bad thing of the first epoch (wherever the epoch's shard order put it) has been met.
    batches = _batches(stream, 14, 0)
    assert batches[-1].stream_position.sources["demo"][0] == 1
    assert batches[-1].stream_position.skipped == {
        "corrupt_image": 1, "missing_caption": 1, "empty_caption": 1, "missing_image": 1,
        "truncated_shard": 1, "unreadable_shard": 1,
    }
    assert batches[-1].stream_position.samples_seen == 56


def test_too_many_bad_samples_stop_with_a_clear_error(tmp_path, tiny_model_cfg):
    samples = [(f"s{i:03d}", {"png": png(), **({"txt": b"caption"} if i % 2 else {})}) for i in range(300)]
    write_tar(tmp_path / "0.tar", samples)
    stream = _stream([str(tmp_path / "0.tar")], build_tokenizer(tiny_model_cfg), max_skip_fraction=0.1)
    with pytest.raises(ValueError, match="more than data.max_skip_fraction=0.1"):
        _batches(stream, 20, 0)


def test_train_loader_from_config(demo_root, tiny_model_cfg):
    cfg = compose_config(["model=test_tiny", "debug=tiny", f"data.sources.0.shards={demo_root / 'train'}"])
    preprocess = Preprocess(model_image_size(cfg.model), list(cfg.model.image_mean), list(cfg.model.image_std),
                            cfg.model.interpolation)
    loader = build_train_loader(cfg.data, preprocess, build_tokenizer(cfg.model), rank=0, world_size=1, seed=0)
    batch = next(iter(loader))
    assert batch.images.shape == (16, 3, 28, 28) and batch.tokens.shape == (16, 16)
    assert batch.labels.min() >= 0 and len(batch.keys) == 16


def _member_offsets(tar_bytes: bytes) -> dict[str, tuple[int, int, int]]:
    """name -> (header offset, data offset, size), from the standard library's reading of the whole archive."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as archive:
        return {m.name: (m.offset, m.offset_data, m.size) for m in archive.getmembers()}


@pytest.mark.parametrize("where, used", [
    # Inside the second member (the caption) of sample 5: samples 0-4 are whole, sample 5 is dropped.
    ("s0005.txt header", 5), ("s0005.txt data", 5),
    # Inside the first header of sample 5: the reader cannot know sample 4 was complete (a later member of it could
    # have followed), so it drops sample 4 too; 0-3 must be used.
    ("s0005.png header", 4),
    # Inside the first member's data of sample 5: its header named a new key, so sample 4 is known to be whole.
    ("s0005.png data", 5),
])
def test_a_shard_cut_inside_a_member_uses_the_samples_before_the_cut_and_counts_the_tail(tmp_path, tiny_model_cfg,
                                                                                        where, used):
    samples = [(f"s{i:04d}", {"png": png(), "txt": f"a photo of item {i}.".encode()}) for i in range(10)]
    whole = write_tar(tmp_path / "whole.tar", samples).read_bytes()
    name, part = where.split()
    header, data, size = _member_offsets(whole)[name]
    cut = header + 100 if part == "header" else data + size // 2  # never on a 512-byte block boundary
    assert cut % tarfile.BLOCKSIZE
    (tmp_path / "cut.tar").write_bytes(whole[:cut])
    stream = _stream([str(tmp_path / "cut.tar")], build_tokenizer(tiny_model_cfg), resampled=False, batch=1,
                     shuffle_buffer=0)
    batches = _batches(stream, used + 1, 0)  # the last one is the first sample of the next pass
    assert [b.keys[0] for b in batches] == [f"s{i:04d}" for i in range(used)] + ["s0000"]
    assert batches[used].stream_position.skipped == {"truncated_shard": 1}
    assert batches[used - 1].stream_position.skipped == {}  # the tail is met after the last whole sample


def test_resume_does_not_count_a_truncated_shard_of_the_current_epoch_twice(tmp_path, tiny_model_cfg):
    shards = []
    for prefix in "tu":  # two copies cut inside sample 8's first header: 7 usable samples each, then a bad tail
        whole = write_tar(tmp_path / "whole.tar", [(f"{prefix}{i:04d}", {"png": png(), "txt": b"a bag."})
                                                   for i in range(12)]).read_bytes()
        header, _, _ = _member_offsets(whole)[f"{prefix}0008.png"]
        (tmp_path / f"{prefix}.tar").write_bytes(whole[: header + 100])
        shards.append(str(tmp_path / f"{prefix}.tar"))
    tokenizer = build_tokenizer(tiny_model_cfg)
    straight = _batches(_stream(shards, tokenizer, resampled=False, batch=2, shuffle_buffer=0), 7, 0)
    # 14 samples per epoch: 7 batches of 2 end at the last sample of epoch 0, whose second tail is not yet read;
    # batch 5 (10 samples) is past the first shard's tail.
    assert straight[-1].stream_position.sources["demo"][:2] == (0, 14)
    assert straight[-1].stream_position.skipped == {"truncated_shard": 1}
    k = 5
    resumed = _batches(_stream(shards, tokenizer, resampled=False, batch=2, shuffle_buffer=0, start_step=k,
                               positions={0: straight[k - 1].stream_position}), 7 - k, 0)
    assert [b.keys for b in resumed] == [b.keys for b in straight[k:]]
    assert resumed[-1].stream_position.skipped == straight[-1].stream_position.skipped


@pytest.mark.parametrize("name", ["shard.tar.gz", "named_plain.tar"])
def test_a_gzip_compressed_shard_reads_every_sample_and_counts_nothing(demo_root, tmp_path, name):
    """Compressed shards stream (whatever their name); the end-of-archive check measures the decompressed stream, so
    a complete compressed shard is not taken for a truncated one."""
    plain = expand_shards(str(demo_root / "train"))[0]
    compressed = tmp_path / name
    compressed.write_bytes(gzip.compress(open(plain, "rb").read()))
    expected, skipped = list(iter_shard(plain, Counter())), Counter()
    samples = list(iter_shard(str(compressed), skipped))
    assert [s["__key__"] for s in samples] == [s["__key__"] for s in expected] and not skipped
    assert all(a["png"] == b["png"] for a, b in zip(samples, expected))


def _tarfile_samples(path) -> list[dict]:
    """The reference: a shard's samples as tarfile reads them (regular members grouped by key, in order)."""
    samples: list[dict] = []
    with tarfile.open(path) as archive:
        for member in archive:
            key, extension = split_key(member.name)
            if not member.isreg() or key.startswith("__") or not extension:
                continue
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key, "__url__": str(path)})
            samples[-1][extension] = archive.extractfile(member).read()
    return samples


def _write_members(path, tar_format: int, entries: list[tuple[str, bytes | str | None]], **options) -> None:
    """entries: (name, bytes: a file | str: a symlink to it | None: a directory)."""
    with tarfile.open(path, "w", format=tar_format, **options) as archive:
        for name, content in entries:
            info = tarfile.TarInfo(name)
            if content is None:
                info.type = tarfile.DIRTYPE
            elif isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
            else:
                info.size = len(content)
            archive.addfile(info, io.BytesIO(content) if isinstance(content, bytes) else None)


@pytest.mark.parametrize("tar_format", ["ustar", "gnu", "pax", "pax_global_header"])
def test_a_local_shard_reads_as_tarfile_reads_it_whatever_its_headers(tmp_path, tar_format):
    """Plain ustar headers are read directly, anything else (a GNU long name, pax records) by tarfile from there on:
    the samples are tarfile's either way, nothing is counted."""
    long_directory = "d" * 120  # a name over 100 characters: ustar splits it into prefix and name
    entries = [("a/", None), ("a/k0.txt", b"first"), ("a/k0.cls", b"3"), ("__meta__.json", b"{}"),
               (f"{long_directory}/k1.txt", b"long"), ("a/link.txt", "a/k0.txt"), ("a/k2.txt", b""),
               ("a/k2.jpg", bytes(range(256)) * 3)]
    if tar_format != "ustar":  # names only extension records hold: a GNU long name, a pax path, in the middle
        entries[5:5] = [("x" * 300 + "/k3.txt", b"longer"), ("a/k\u00e9.txt", "é".encode())]
    options = {"pax_headers": {"comment": "global"}} if tar_format == "pax_global_header" else {}
    fmt = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT}.get(tar_format, tarfile.PAX_FORMAT)
    _write_members(tmp_path / "shard.tar", fmt, entries, **options)
    skipped = Counter()
    samples = list(iter_shard(str(tmp_path / "shard.tar"), skipped))
    assert samples == _tarfile_samples(tmp_path / "shard.tar") and not skipped
    assert [s["__key__"] for s in samples][:2] == ["a/k0", f"{long_directory}/k1"]


def test_a_plain_shard_is_read_without_tarfile(demo_root, monkeypatch):
    plain = expand_shards(str(demo_root / "train"))[0]
    expected = _tarfile_samples(plain)
    monkeypatch.setattr(tarfile, "open", None)  # any use of tarfile's reader fails
    skipped = Counter()
    assert list(iter_shard(plain, skipped)) == expected and not skipped


def test_a_bad_header_inside_a_shard_is_counted_after_the_samples_before_it(tmp_path):
    """A header whose checksum is wrong ends tarfile's reading silently; here it is a truncated shard, counted, and
    the samples before it are used but the last (whose members could have gone on), as for a cut shard."""
    samples = [(f"s{i:04d}", {"png": png(), "txt": b"a bag."}) for i in range(6)]
    whole = bytearray(write_tar(tmp_path / "whole.tar", samples).read_bytes())
    header, _, _ = _member_offsets(bytes(whole))["s0004.png"]
    whole[header] ^= 0x01  # a bit of the name flipped: the checksum no longer holds
    (tmp_path / "bad.tar").write_bytes(whole)
    skipped = Counter()
    assert [s["__key__"] for s in iter_shard(str(tmp_path / "bad.tar"), skipped)] == [f"s{i:04d}" for i in range(3)]
    assert skipped == {"truncated_shard": 1}
