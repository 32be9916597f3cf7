"""Quick-start reward: +1 for every colour word in the completion (a toy stand-in for a reward model)."""

COLOURS = {"red", "green", "blue", "yellow"}


def colour_words(prompts, completions, **kwargs):
    return [float(sum(word in COLOURS for word in completion.split())) for completion in completions]
