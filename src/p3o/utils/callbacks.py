"""Callbacks with `transformers.TrainerCallback`'s hooks, so an existing callback works unchanged.

Called as transformers calls them, `hook(args, state, control, **kwargs)`, with `state` a
`transformers.TrainerState` whose `global_step` counts rollout-and-update steps and whose
`log_history` holds every step's metrics. A callback stops the run by setting
`control.should_training_stop`; the run then ends cleanly, its outputs written.
"""
from __future__ import annotations

from p3o.errors import UsageError

HOOKS = ("on_train_begin", "on_step_begin", "on_step_end", "on_log", "on_evaluate", "on_save", "on_train_end")


def trainer_state(args, accelerator, step: int = 0):
    """A `transformers.TrainerState` for the run's callbacks and reward functions: its length, where
    it is, and how often it logs, evaluates and saves."""
    from transformers import TrainerState

    return TrainerState(max_steps=args.max_steps, global_step=step, logging_steps=args.logging_steps,
                        eval_steps=args.eval_steps, save_steps=args.save_steps,
                        is_local_process_zero=accelerator.is_local_main_process,
                        is_world_process_zero=accelerator.is_main_process)


def instantiated(callback):
    """A callback given as its class is instantiated when it is added, as transformers.Trainer does
    (callbacks=[PrinterCallback]); one p3o cannot honour is refused."""
    from transformers import EarlyStoppingCallback

    callback = callback() if isinstance(callback, type) else callback
    if isinstance(callback, EarlyStoppingCallback):
        raise UsageError("EarlyStoppingCallback needs transformers' load_best_model_at_end and metric_for_best_model, "
                         "which p3o does not have; stop from on_evaluate instead (set control.should_training_stop "
                         "when metrics['eval_reward'] stops improving)")
    return callback


class CallbackHandler:
    def __init__(self, callbacks: list, args, engine, step: int = 0, state=None):
        from transformers import TrainerControl

        self.callbacks = [instantiated(c) for c in callbacks]
        self.args, self.engine = args, engine
        self.state = state if state is not None else trainer_state(args, engine.accelerator, step)
        self.control = TrainerControl()

    def fire(self, event: str, **kwargs):
        """Call `event` on every callback that has it; a returned `TrainerControl` replaces the current one."""
        assert event in HOOKS, event
        extra = {"model": self.engine.unwrapped_policy, "processing_class": self.engine.tokenizer,
                 "optimizer": self.engine.optimizer, "lr_scheduler": self.engine.scheduler}
        for callback in self.callbacks:
            hook = getattr(callback, event, None)
            if hook is not None:
                result = hook(self.args, self.state, self.control, **extra, **kwargs)
                if result is not None:
                    self.control = result
        return self.control

    def step_end(self, metrics: dict):
        """After step `metrics["step"]`: on_step_end, then on_log with the step's metrics."""
        self.state.global_step = metrics["step"]
        self.state.log_history.append(dict(metrics))
        self.fire("on_step_end")
        return self.fire("on_log", logs=dict(metrics))  # a copy: what a callback does to it is not logged
