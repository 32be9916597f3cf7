"""`p3o pipeline --config recipe.yaml`: SFT -> reward model -> RL on your own data."""
from __future__ import annotations

from p3o.pipeline.recipe import STAGES, check_stages, load_recipe, run_recipe


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="Recipe: output_dir and sections sft, rm, train (see configs/recipes/).")
    parser.add_argument("--output_dir", help="Overrides the recipe's output_dir.")
    parser.add_argument("--overwrite", action="store_true", help="Allow non-empty stage directories.")
    parser.add_argument("--resume", action="store_true", help="Keep the stages that finished with these settings and "
                        "continue an interrupted one from its latest checkpoint (a recipe whose later stage failed, "
                        "fixed and run again).")
    parser.add_argument("--check", action="store_true", help="Only load and check the recipe (options, models, data "
                        "files and their rows, reward functions, batch sizes, stage directories), as a run does "
                        "first; run nothing.")


def check(args) -> dict:
    """The recipe loaded and checked as a run checks it first (on --num_processes processes, if given)."""
    recipe = load_recipe(args.config, overrides(args))
    check_stages(recipe, recipe["output_dir"], args.num_processes)
    return recipe


def overrides(args) -> dict:
    return {"output_dir": args.output_dir, "overwrite": args.overwrite, "resume": args.resume}


def run(args) -> None:
    if args.check:
        recipe = check(args)
        for name in STAGES:
            if name in recipe:
                cfg, fmt = recipe[name]
                print(f"{name}: {cfg.model_name_or_path} on {cfg.dataset}{f' ({fmt})' if fmt else ''} -> {cfg.output_dir}")
        return
    run_recipe(args.config, overrides(args))
