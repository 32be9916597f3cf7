"""`p3o rm` on all pairs of k responses per prompt: a response in several pairs of a batch is scored
once (exactly the same loss and gradient), and --group_by_prompt keeps each prompt's pairs together."""
from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import write_jsonl

from p3o.cli import main
from p3o.errors import UsageError
from p3o.reward.model import LastTokenReward, pad_right
from p3o.reward.train import prompt_grouped_order, rm_stage, scored_once, tokenize_pair

RESPONSES = [" the cat sleeps .", " a dog runs .", " the bird eats .", " a big frog"]


def all_pairs(prompt: str, responses: list[str]) -> list[dict]:
    return [{"prompt": prompt, "chosen": a, "rejected": b} for a, b in itertools.combinations(responses, 2)]


def test_each_distinct_response_is_scored_once():
    rows = [{"chosen": [1, 2], "rejected": [1, 3]}, {"chosen": [1, 3], "rejected": [4]}, {"chosen": [1, 2], "rejected": [4]}]
    sequences, chosen, rejected = scored_once(rows)
    assert sequences == [[1, 2], [1, 3], [4]]
    assert [sequences[i] for i in chosen] == [r["chosen"] for r in rows]
    assert [sequences[i] for i in rejected] == [r["rejected"] for r in rows]


def test_scoring_once_gives_the_loss_and_gradient_of_scoring_every_side(assets, tokenizer):
    from transformers import AutoModelForSequenceClassification

    rows = all_pairs("a story :", RESPONSES) + all_pairs("the story :", RESPONSES[:2])  # 6 + 1 pairs, 6 distinct sequences
    examples = [tokenize_pair(tokenizer, row, 64) for row in rows]
    torch.manual_seed(0)
    classifier = AutoModelForSequenceClassification.from_pretrained(assets["llama"], num_labels=1)
    classifier.config.pad_token_id = tokenizer.pad_token_id
    scorer = LastTokenReward(classifier)
    stage = rm_stage(tokenizer)
    batch = stage.collate(examples)
    assert batch["input_ids"].shape[0] == 6  # not 14

    def gradient(loss):
        scorer.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in scorer.named_parameters() if p.grad is not None}

    once, _ = stage.loss(scorer, batch)
    once_grad = gradient(once)
    ids, mask = pad_right(tokenizer, [e["chosen"] for e in examples] + [e["rejected"] for e in examples])
    chosen, rejected = scorer(ids, mask).chunk(2)  # (7,) each: every side scored, as before
    every = -torch.nn.functional.logsigmoid(chosen - rejected).sum()
    every_grad = gradient(every)
    torch.testing.assert_close(once, every, rtol=1e-5, atol=1e-6)
    assert once_grad.keys() == every_grad.keys() and any(g.abs().sum() > 0 for g in once_grad.values())
    for name in once_grad:
        torch.testing.assert_close(once_grad[name], every_grad[name], rtol=1e-4, atol=1e-6, msg=name)


def test_prompt_grouped_order_shuffles_whole_groups():
    examples = [{"group": g} for g in "aaabbcdddd"]  # groups of 3, 2, 1, 4
    orders = [prompt_grouped_order(examples, torch.Generator().manual_seed(s)) for s in range(6)]
    for order in orders:
        assert sorted(order) == list(range(len(examples)))
        runs = [key for key, _ in itertools.groupby(examples[i]["group"] for i in order)]
        assert sorted(runs) == ["a", "b", "c", "d"]  # each group one contiguous block
    assert len({tuple(o) for o in orders}) > 1  # the blocks' order is shuffled
    assert orders[0] == prompt_grouped_order(examples, torch.Generator().manual_seed(0))


def test_group_by_prompt_batches_hold_one_prompt_each(assets, tokenizer, tmp_path, monkeypatch):
    """A run with --group_by_prompt and a batch of 6 pairs forwards 4 sequences per step (one prompt's
    4 responses), trains, and writes the reward model."""
    prompts = [f"the {word} story :" for word in ("cat", "dog", "bird", "fish")]
    rows = [row for prompt in prompts for row in all_pairs(prompt, RESPONSES)]
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    held_out = write_jsonl(tmp_path / "held_out.jsonl", all_pairs("the cow story :", RESPONSES))
    import p3o.reward.train as rm_train

    forwarded = []
    real = rm_train.pad_right
    monkeypatch.setattr(rm_train, "pad_right", lambda tok, seqs, *a: forwarded.append(len(seqs)) or real(tok, seqs, *a))
    out = tmp_path / "rm"
    assert main(["rm", "--model_name_or_path", str(assets["llama"]), "--dataset", str(data), "--eval_dataset",
                 str(held_out), "--output_dir", str(out), "--per_device_train_batch_size", "6", "--group_by_prompt",
                 "--num_train_epochs", "1", "--logging_steps", "1", "--disable_progress_bar"]) == 0
    train_batches = forwarded[:4]  # then the evaluation's
    assert train_batches == [4, 4, 4, 4]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
    assert (out / "model.safetensors").is_file()


def test_scores_are_read_where_transformers_reads_them_when_a_text_ends_with_the_pad_token(assets, tokenizer):
    """pad == EOS (GPT-2) and data that carries its EOS: a plain `transformers` classifier reads the
    score before the trailing pad tokens, and p3o (training and scoring) must read it there too, or a
    saved reward model scores differently outside p3o."""
    from transformers import AutoModelForSequenceClassification

    pad = tokenizer.pad_token_id
    torch.manual_seed(0)
    classifier = AutoModelForSequenceClassification.from_pretrained(assets["llama"], num_labels=1).eval()
    classifier.config.pad_token_id = pad
    sequences = [[5, 6, 7], [5, 6, 7, pad], [5, 6, pad, pad], [8, 9, 10, 11, 12]]  # the 2nd and 3rd end in pad
    ids, mask = pad_right(tokenizer, sequences)
    assert mask[1, :4].all() and mask[2, :4].all()  # attended: the pad tokens are the text's own
    with torch.no_grad():
        ours = LastTokenReward(classifier)(ids, mask)
        theirs = torch.stack([classifier(input_ids=torch.tensor([s])).logits[0, 0] for s in sequences])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert ours[0] == ours[1] and ours[1] != ours[2]  # [5, 6, 7] read at 7 with or without the trailing pad


def test_a_margin_column_and_centring_enter_the_loss_as_in_trl(assets, tokenizer):
    """TRL's RewardTrainer: -log sigmoid(r_c - r_r - margin), plus c * mean((r_c + r_r)^2)."""
    from transformers import AutoModelForSequenceClassification

    rows = [{**row, "margin": m} for row, m in zip(all_pairs("a story :", RESPONSES[:3]), (0.0, 1.5, -2.0))]
    examples = [tokenize_pair(tokenizer, row, 64) for row in rows]
    assert [e["margin"] for e in examples] == [0.0, 1.5, -2.0]
    torch.manual_seed(0)
    classifier = AutoModelForSequenceClassification.from_pretrained(assets["llama"], num_labels=1)
    classifier.config.pad_token_id = tokenizer.pad_token_id
    scorer = LastTokenReward(classifier)
    ids, mask = pad_right(tokenizer, [e["chosen"] for e in examples] + [e["rejected"] for e in examples])
    with torch.no_grad():
        chosen, rejected = scorer(ids, mask).chunk(2)
        margins = torch.tensor([0.0, 1.5, -2.0])
        plain = -torch.nn.functional.logsigmoid(chosen - rejected - margins).sum()
        torch.testing.assert_close(rm_stage(tokenizer).loss(scorer, rm_stage(tokenizer).collate(examples))[0], plain)
        centred = rm_stage(tokenizer, center_rewards_coefficient=0.01)
        torch.testing.assert_close(centred.loss(scorer, centred.collate(examples))[0],
                                   plain + 0.01 * ((chosen + rejected) ** 2).sum())
    with pytest.raises(UsageError, match="row 1: margin must be a finite number"):
        tokenize_pair(tokenizer, {**rows[0], "margin": "high"}, 64, "row 1")
