"""RL fine-tuning against a reward (`p3o train`): the configuration, the engine that samples, scores
and updates, the algorithms' losses and adapters, and the command's entry point."""
