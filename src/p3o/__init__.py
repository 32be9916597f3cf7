"""p3o: Pairwise Proximal Policy Optimization (P3O) for aligning language models with human feedback.

The Python API (the same configs and code path as the `p3o` command):

    from p3o import P3OConfig, P3OTrainer
    trainer = P3OTrainer(model="path/or/hub-name", reward_funcs=my_reward, train_dataset=dataset,
                         args=P3OConfig(output_dir="runs/p3o", max_steps=100))
    trainer.train()
"""

__version__ = "0.1.0"

_EXPORTS = {
    "P3OConfig": "p3o.rl.config",
    "P3OTrainer": "p3o.rl.train",
    "SFTConfig": "p3o.sft.train",
    "SFTTrainer": "p3o.sft.train",
    "RewardConfig": "p3o.reward.train",
    "RewardTrainer": "p3o.reward.train",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    """Import on first use, so `import p3o` (and `p3o --help`) stay fast."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'p3o' has no attribute {name!r}")
