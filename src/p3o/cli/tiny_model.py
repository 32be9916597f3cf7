"""`p3o tiny-model`: a random GPT-2/Llama model and a word-level tokenizer, built offline."""
from __future__ import annotations

from pathlib import Path

from p3o.data.files import read_rows
from p3o.errors import UsageError
from p3o.models.tiny import build_tiny_model, build_word_tokenizer, words_of
from p3o.utils.io import prepare_output_dir, save_pretrained_atomically


def add_arguments(parser) -> None:
    parser.add_argument("--output_dir", required=True, help="Where to save the model and tokenizer.")
    parser.add_argument("--corpus", action="append", default=[],
                        help="Text, JSONL, CSV or Parquet file whose words form the vocabulary (repeatable).")
    parser.add_argument("--words", default="", help="Extra vocabulary words, separated by spaces.")
    parser.add_argument("--arch", choices=["llama", "gpt2"], default="llama", help="Architecture (default: llama).")
    parser.add_argument("--num_layers", type=int, default=2, help="Decoder layers (default: 2).")
    parser.add_argument("--hidden_size", type=int, default=64, help="Width; a multiple of --num_heads (default: 64).")
    parser.add_argument("--num_heads", type=int, default=4, help="Attention heads (default: 4).")
    parser.add_argument("--max_positions", type=int, default=256, help="Context length in tokens (default: 256).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights (default: 0).")
    parser.add_argument("--overwrite", action="store_true", help="Allow a non-empty output_dir.")


def run(args) -> None:
    for name in ("num_layers", "hidden_size", "num_heads", "max_positions"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.hidden_size % args.num_heads:
        raise UsageError(f"--hidden_size {args.hidden_size} must be a multiple of --num_heads {args.num_heads}")
    texts = args.words.split()
    for corpus in args.corpus:
        path = Path(corpus)
        if path.suffix in (".txt", ".md", ""):
            if not path.is_file():
                raise UsageError(f"corpus file {corpus} does not exist")
            texts.append(path.read_text(encoding="utf-8"))
        else:
            texts.extend(_strings(read_rows(corpus)))
    if not words_of(texts):
        raise UsageError("no vocabulary: give --corpus files with text in them, or --words")
    out = prepare_output_dir(args.output_dir, args.overwrite)  # after every input was read
    tokenizer = build_word_tokenizer(words_of(texts))
    model = build_tiny_model(tokenizer, args.arch, args.num_layers, args.hidden_size, args.num_heads,
                             args.max_positions, args.seed)
    save_pretrained_atomically(model, tokenizer, out)
    params = sum(p.numel() for p in model.parameters())
    print(f"saved a {args.arch} model with {params:,} parameters and a {len(tokenizer)}-word tokenizer to {out}")


def _strings(value):
    """Every string inside rows of a dataset (prompts, chat message contents, ...)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)
