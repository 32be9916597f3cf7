"""What every training stage (SFT, reward model, RL) shares, written once.

    optimizer.py   AdamW over decayed and undecayed parameter groups; the learning-rate schedule
    step.py        one optimiser step accumulated over micro-batches: forward, backward, clip, step
    skips.py       the non-finite guard: skipped steps counted, a run that keeps diverging stopped
    checkpoint.py  what every checkpoint holds beside the weights, and the settings a resume may change
    supervised.py  the supervised loop (`fit`) and its config, for `p3o sft` and `p3o rm`
    supervised_run.py  one supervised command around `fit`: run directory, LoRA, the saved model

The core sits above `utils/`, `models/` and `data/` and below the stages: it never imports `rl/`,
`sft/`, `reward/` or `cli/` (tests/test_docs.py checks).
"""
