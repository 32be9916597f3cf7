"""Run under torchrun by test_distributed.py: `p3o train`'s trainer, then every process writes its
own copy of the weights and the prompts it drew, so the test can compare processes."""
import argparse
import json
import sys
from pathlib import Path

import torch.distributed
from safetensors.torch import save_file

from p3o.cli.args import add_dataclass_arguments, build_config
from p3o.rl.config import TrainConfig
from p3o.rl.train import build_trainer


def main() -> None:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, TrainConfig)
    trainer = build_trainer(build_config(TrainConfig, parser.parse_args(argv)))
    history = trainer.train()
    acc = trainer.accelerator
    rank = acc.process_index
    state = {k: v.detach().contiguous().clone() for k, v in trainer.trained_module.state_dict().items()}
    save_file(state, str(out / f"rank{rank}.safetensors"))
    record = {"processes": acc.num_processes, "prompts": [trainer.prompt_indices(s) for s in range(trainer.cfg.max_steps)],
              "reward": [m["reward"] for m in history]}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    acc.wait_for_everyone()
    torch.distributed.destroy_process_group()  # gloo's threads would otherwise abort the exit now and then


if __name__ == "__main__":
    main()
