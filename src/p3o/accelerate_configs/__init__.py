"""`accelerate launch` configurations shipped with p3o, by name: `ddp` (DDP, every process holds the
whole model), `fsdp` (FSDP2), `zero2` and `zero3` (DeepSpeed). `p3o train|sft|rm|pipeline
--num_processes N --accelerate_config NAME` launches with one (`p3o.cli.launch`); `accelerate launch --config_file
FILE -m p3o ...` takes the file itself (`python -c "import p3o.accelerate_configs as c; print(c.path('zero2'))"`)."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

NAMES = ("ddp", "fsdp", "zero2", "zero3")


def path(name: str) -> Path:
    """The shipped config called `name` (one of NAMES)."""
    if name not in NAMES:
        raise ValueError(f"p3o ships no accelerate config {name!r}; it has {', '.join(NAMES)}")
    return Path(str(resources.files(__name__).joinpath(f"{name}.yaml")))
