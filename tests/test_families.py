"""The model families people train (tests/families.py), each with its real special tokens and chat
template: data, sampling, scoring and packing must agree token for token on every one of them."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import REWARD_FILE, write_jsonl
from families import FAMILIES, build

from p3o.cli import main
from p3o.data.prompts import load_preference_pairs
from p3o.models.loading import eos_token_ids, load_causal_lm, load_tokenizer
from p3o.rl.rollout import (
    generation_config,
    pad_prompts,
    pad_responses,
    group_token_logprobs,
    sample_responses,
    shares_prompt_forward,
    token_logprobs,
)
from p3o.sft.train import IGNORE, tokenize_example
from p3o.utils.ops import response_mask_from_eos

# (prompt, chosen reply, rejected reply): words the tokenizers were trained on, the reward's fruit
EXAMPLES = [("story : big cat sees the dog .", "the cat likes the apple .", "the dog sleeps ."),
            ("story : sad goat and the frog .", "the goat eats a pear and a plum !", "no ."),
            ("hello , are you a helpful assistant ?", "yes", "the quick horse runs and jumps .")]


@pytest.fixture(scope="session", params=FAMILIES)
def family(request, tmp_path_factory):
    """One family's saved tiny model; built once per session (per xdist worker that needs it)."""
    return build(request.param, tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """The examples as chat and plain prompt, SFT and preference files, and the reward file."""
    root = tmp_path_factory.mktemp("family-data")
    paths = {"rewards": root / "rewards.py"}
    paths["rewards"].write_text(REWARD_FILE)
    for kind in ("chat", "plain"):
        rows = [as_row(kind, *example) for example in EXAMPLES * 2]
        paths[kind, "prompts"] = write_jsonl(root / f"{kind}-prompts.jsonl", [{"prompt": r["prompt"]} for r in rows])
        paths[kind, "prefs"] = write_jsonl(root / f"{kind}-prefs.jsonl", rows)
    return paths


def as_row(kind: str, prompt: str, chosen: str, rejected: str) -> dict:
    if kind == "chat":
        return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}
    return {"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected}


def kind(family) -> str:
    return "chat" if family.chat else "plain"


def end_of_turn_id(family, tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(family.end_of_turn)


def expected_completion(family, tokenizer, reply: str) -> list[int]:
    """What training and sampling should see of a reply: its tokens (after what the template always
    writes before a reply, e.g. Qwen3's empty think block), then ONE end-of-turn token. Whatever the
    template writes after that token (a newline, Phi-3's EOS) is not part of the reply."""
    text = family.reply_prefix + reply if family.chat else " " + reply
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [end_of_turn_id(family, tokenizer)]


def sampling(max_new_tokens: int = 6):
    return SimpleNamespace(max_new_tokens=max_new_tokens, temperature=1.0, top_k=0, top_p=1.0)


def prompt_ids(family, tokenizer) -> list[list[int]]:
    """The examples' prompts tokenized as `load_prompts` does (a chat template writes its own BOS)."""
    if family.chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p, _, _ in EXAMPLES]
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return [tokenizer(p)["input_ids"] for p, _, _ in EXAMPLES]


# --- 1 and 2: data ends where sampling stops -------------------------------------------------------

def test_sft_and_dpo_tokens_end_at_the_first_end_of_turn(family, data):
    tokenizer = load_tokenizer(str(family.path))
    for prompt, chosen, _ in EXAMPLES:
        row = as_row(kind(family), prompt, chosen, "")
        example = tokenize_example(tokenizer, row["prompt"], row["chosen"], 512, "row")
        trained = [label for label in example["labels"] if label != IGNORE]
        assert tokenizer.convert_ids_to_tokens(trained) == tokenizer.convert_ids_to_tokens(
            expected_completion(family, tokenizer, chosen))
    pairs = load_preference_pairs(str(data[kind(family), "prefs"]), tokenizer)
    expected = [[expected_completion(family, tokenizer, reply) for reply in (c, r)] for _, c, r in EXAMPLES * 2]
    assert pairs.responses == expected


def test_sampling_stops_at_the_end_of_turn_the_data_ends_with(family):
    tokenizer, model = load_tokenizer(str(family.path)), load_causal_lm(str(family.path))
    stop = eos_token_ids(tokenizer, model)
    eot = end_of_turn_id(family, tokenizer)
    assert eot in stop, (family.end_of_turn, tokenizer.convert_ids_to_tokens(stop))
    # The data's completions are cut by these stop ids exactly where they end (no reply token stops early).
    replies = [expected_completion(family, tokenizer, c) for _, c, _ in EXAMPLES]
    ids, mask = pad_responses(replies, tokenizer.pad_token_id)
    assert torch.equal(response_mask_from_eos(ids, stop), mask)
    # A policy that says the end-of-turn token at once: sampling stops there, and its mask covers it alone.
    query, query_mask = pad_prompts(tokenizer, prompt_ids(family, tokenizer), 64)
    config = generation_config(sampling(), tokenizer, stop)
    config.sequence_bias = {(eot,): 100.0}
    torch.manual_seed(0)
    response, response_mask = sample_responses(model, query, query_mask, config, stop)
    assert response.shape[1] == 1 and (response[:, 0] == eot).all() and response_mask.sum() == len(EXAMPLES)


# --- 3, 5, 6: one P3O step in process: exact scoring, ratio 1, what the reward sees -----------------

def test_a_p3o_step_scores_exactly_the_sampled_tokens_on_policy(family, data, tmp_path):
    import dataclasses

    from p3o.rl.config import TrainConfig
    from p3o.rl.train import build_trainer

    cfg = TrainConfig(model_name_or_path=str(family.path), dataset=str(data[kind(family), "prompts"]),
                      reward_fn=f"{data['rewards']}:fruit", output_dir=str(tmp_path / "run"), algo="p3o-v2",
                      max_steps=1, pairs_per_step=4, minibatch_pairs=2, epochs=2, max_new_tokens=8,
                      learning_rate=1e-3, seed=0, disable_progress_bar=True)
    trainer = build_trainer(cfg)
    seen, gaps, rollouts = [], [], []
    reward, collect, algorithm = trainer.reward, trainer.collect_rollout, trainer.algorithm

    def recording_reward(prompts, completions, **kw):
        seen.append((prompts, completions, kw["completion_ids"]))
        return reward(prompts, completions, **kw)

    def recording_collect(step):
        rollouts.append(collect(step))
        return rollouts[-1]

    def recording_loss(batch, outputs, cfg):  # the first minibatch of the first epoch: pi == pi_old
        if not gaps:
            logp = (outputs.token_logps * batch.response_mask).sum(-1)
            gaps.append((logp - batch.old_logp).abs().max().item())
        return algorithm.loss(batch, outputs, cfg)

    trainer.reward, trainer.collect_rollout = recording_reward, recording_collect
    trainer.algorithm = dataclasses.replace(algorithm, loss=recording_loss)
    history = trainer.train()
    assert math.isfinite(history[0]["loss"])
    assert gaps[0] < 1e-5  # 5: the first update's ratio is 1
    seq = rollouts[0][0]
    # 3: pi_old's and pi_ref's log-probs are a plain forward of the initial model over exactly the sampled ids
    fresh = token_logprobs(load_causal_lm(str(family.path)), seq.query_ids, seq.query_mask,
                           seq.response_ids, seq.response_mask)
    assert torch.allclose(seq.old_token_logp, fresh, atol=1e-5)
    assert torch.allclose(seq.ref_token_logp, fresh, atol=1e-5)
    # 6: the reward gets chat completions as messages (plain ones as text), and the sampled ids themselves
    prompts, completions, ids = seen[0]
    if family.chat:
        assert all(isinstance(p, list) and c[0]["role"] == "assistant" and isinstance(c[0]["content"], str)
                   for p, c in zip(prompts, completions))
    else:
        assert all(isinstance(p, str) and isinstance(c, str) for p, c in zip(prompts, completions))
    lengths = seq.response_mask.sum(-1).tolist()
    assert ids == [row[:n] for row, n in zip(seq.response_ids.tolist(), lengths)]


# --- 4: one packed sequence per pair, only where it is exact ---------------------------------------

def test_packed_pairs_equal_separate_sequences_exactly_where_packing_is_on(family):
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(family.path))
    model = AutoModelForCausalLM.from_pretrained(str(family.path))
    query, query_mask = pad_prompts(tokenizer, prompt_ids(family, tokenizer), 64)  # ragged, left-padded
    query, query_mask = query.repeat_interleave(2, 0), query_mask.repeat_interleave(2, 0)  # three pairs
    torch.manual_seed(0)
    response = torch.randint(0, min(len(tokenizer), 400), (6, 9))
    response_mask = (torch.arange(9)[None] < torch.tensor([9, 3, 6, 9, 1, 7])[:, None]).long()
    separate = token_logprobs(model, query, query_mask, response, response_mask)
    packed_length = query.shape[1] + 2 * response.shape[1]  # Phi-3's window (2047) is wider: packing is on
    if shares_prompt_forward(model, packed_length):
        packed = group_token_logprobs(model, query, query_mask, response, response_mask)
        assert torch.allclose(packed, separate, atol=1e-5), (packed - separate).abs().max()
        return
    try:  # off: forcing it must be wrong (or refused), or the flag costs speed for nothing
        packed = group_token_logprobs(model, query, query_mask, response, response_mask)
    except Exception:
        return
    assert not torch.allclose(packed, separate, atol=1e-5), "packing is off but would be exact"


# --- 7 and 8: the commands -------------------------------------------------------------------------

def test_eval_winrate_and_a_dpo_step_run(family, data, tmp_path):
    path, prompts = str(family.path), str(data[kind(family), "prompts"])
    common = ["--max_new_tokens", "6", "--max_prompts", "4", "--disable_progress_bar"]
    assert main(["eval", "--model_name_or_path", path, "--ref_model", path, "--dataset", prompts, "--reward_fn",
                 f"{data['rewards']}:fruit", "--output_file", str(tmp_path / "eval.json"), *common]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())[path]
    assert result["kl"] == 0.0 and result["n"] == 4 and 1 <= result["length"] <= 6
    assert main(["winrate", "--model_a", path, "--model_b", path, "--dataset", prompts, "--judge",
                 f"reward_fn:{data['rewards']}:fruit", "--output_file", str(tmp_path / "wr.json"), *common]) == 0
    result = json.loads((tmp_path / "wr.json").read_text())
    assert result["n"] == 4 == result["wins"] + result["losses"] + result["ties"]
    out = tmp_path / "dpo"
    assert main(["train", "--algo", "dpo", "--model_name_or_path", path, "--dataset",
                 str(data[kind(family), "prefs"]), "--output_dir", str(out), "--max_steps", "1", "--pairs_per_step",
                 "2", "--max_new_tokens", "16", "--learning_rate", "1e-3", "--disable_progress_bar"]) == 0
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the policy is the reference: margin 0
    assert load_causal_lm(str(out)).config.model_type == load_causal_lm(path).config.model_type
