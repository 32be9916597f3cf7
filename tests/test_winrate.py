"""`p3o winrate`: policy A against policy B on the same prompts, judged, with a 95% interval."""
from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from conftest import VOCAB, prompt_rows, train_config, write_jsonl

from p3o.cli import main
from p3o.errors import UsageError
from p3o.eval.judges import (
    JUDGES,
    JudgeSettings,
    LLMJudge,
    Verdict,
    build_judge,
    combine_orders,
    parse_answer,
)
from p3o.eval.winrate import summarise, win_rate_interval

SECRET = "sk-test-SECRET-do-not-log-4242"
Z = 1.959963984540054


@pytest.fixture(scope="module")
def held_out(assets):
    return write_jsonl(assets["prompts"].parent / "winrate_held_out.jsonl", prompt_rows(64, seed=99))


@pytest.fixture(scope="module")
def fruit_policy(assets, tmp_path_factory):
    """P3O-V2 trained 30 steps on the fruit reward (the baselines tests' settings at half the prompts per
    step, which learns as reliably in half the time), saved as `p3o train` saves it."""
    from p3o.rl.train import build_trainer

    root = tmp_path_factory.mktemp("fruit")
    trainer = build_trainer(train_config(assets, root, max_steps=30, pairs_per_step=16, minibatch_pairs=8,
                                         epochs=4, max_new_tokens=8, learning_rate=1e-3))
    trainer.train()
    trainer.unwrapped_policy.save_pretrained(root / "policy")
    trainer.tokenizer.save_pretrained(root / "policy")
    return root / "policy"


def winrate_args(model_a, model_b, dataset, judge, out, *extra):
    return ["winrate", "--model_a", str(model_a), "--model_b", str(model_b), "--dataset", str(dataset),
            "--judge", judge, "--output_file", str(out), "--max_new_tokens", "8", "--disable_progress_bar", *extra]


def run_winrate_cli(*args) -> dict:
    assert main(list(args)) == 0
    return json.loads(open(args[args.index("--output_file") + 1]).read())


def test_trained_policy_beats_its_base_and_the_base_ties_itself(assets, held_out, fruit_policy, tmp_path, capsys):
    judge = f"reward_fn:{assets['rewards']}:fruit"
    trained = run_winrate_cli(*winrate_args(fruit_policy, assets["llama"], held_out, judge, tmp_path / "a.json"))
    assert trained["n"] == 64 and trained["wins"] + trained["losses"] + trained["ties"] == 64
    assert trained["ci_low"] > 0.5, trained
    assert trained["judge"] == judge and trained["model_a"] == str(fruit_policy)
    record = trained["records"][0]
    assert {"prompt", "response_a", "response_b", "verdict", "score_a", "score_b"} <= record.keys()
    assert sum(r["score"] for r in trained["records"]) / 64 == pytest.approx(trained["win_rate"])
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith("win rate of A over B: ")

    itself = run_winrate_cli(*winrate_args(assets["llama"], assets["llama"], held_out, judge, tmp_path / "b.json"))
    assert abs(itself["win_rate"] - 0.5) < 0.15 and itself["ci_low"] < 0.5 < itself["ci_high"], itself
    # independent sampling streams: the same policy does not simply echo itself
    assert any(r["response_a"] != r["response_b"] for r in itself["records"])


class ChatServer:
    """A chat-completions server on localhost. `answer(judging prompt) -> reply`; `failures` are what
    the first requests get instead: an HTTP status, or "slow" (a reply later than the client waits)."""

    def __init__(self, answer=lambda text: "A", failures=()):
        self.answer, self.failures, self.requests = answer, list(failures), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                failure = server.failures.pop(0) if server.failures else None
                if failure == "slow":
                    time.sleep(0.5)
                elif failure is not None:
                    self.send_error(failure)
                    return
                reply = {"choices": [{"message": {"role": "assistant",
                                                  "content": server.answer(body["messages"][-1]["content"])}}]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up on a slow reply
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True  # closing does not wait for a slow reply nobody reads
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)  # quick shutdown

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def shown(text: str) -> tuple[str, str]:
    """(response shown as A, response shown as B) in a judging prompt."""
    match = re.search(r"\[Response A\]\n(.*)\n\n\[Response B\]\n(.*)\n\nReply with", text, re.DOTALL)
    return match.group(1), match.group(2)


def prefers_fruit(text: str) -> str:
    first, second = (sum(w in ("apple", "pear", "plum") for w in r.split()) for r in shown(text))
    return "A" if first > second else "B" if second > first else "tie"


def settings(tmp_path, **overrides) -> JudgeSettings:
    return JudgeSettings(**{"cache_path": tmp_path / "cache.jsonl", "backoff": 0.01, "timeout": 5.0, **overrides})


def test_llm_judge_asks_both_orders_cancels_position_bias_keeps_the_key_secret_and_caches(
        assets, held_out, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("P3O_TEST_JUDGE_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "llm.json"
    with ChatServer(answer=lambda text: "A") as server:  # a judge that always picks the first position
        args = winrate_args(assets["llama"], assets["gpt2"], held_out, "llm:judge-model", out, "--max_prompts", "12",
                            "--judge_base_url", server.url, "--judge_api_key_env", "P3O_TEST_JUDGE_KEY")
        result = run_winrate_cli(*args)
        first_run = list(server.requests)
        again = run_winrate_cli(*args, "--overwrite")
        assert len(server.requests) == len(first_run)  # every verdict came from the cache
    assert result["ties"] == result["n"] == 12 and result["win_rate"] == 0.5  # position bias cancels
    assert again["records"] == result["records"] and again["judge_stats"]["requests"] == 0
    asked = {(r["body"]["model"], *shown(r["body"]["messages"][-1]["content"])) for r in first_run}
    both_orders = {("judge-model", a, b) for r in result["records"] for a, b in
                   [(r["response_a"], r["response_b"]), (r["response_b"], r["response_a"])]}
    assert asked == both_orders and len(first_run) == len(both_orders)
    assert all(r["path"] == "/v1/chat/completions" and r["body"]["temperature"] == 0 for r in first_run)
    assert all(r["headers"]["Authorization"] == f"Bearer {SECRET}" for r in first_run)
    written = "".join(p.read_text() for p in tmp_path.rglob("*") if p.is_file())
    assert (tmp_path / "judge_cache.jsonl").is_file()
    captured = capsys.readouterr()
    assert SECRET not in written + captured.out + captured.err + caplog.text


def test_llm_judge_maps_each_order_back_to_its_policy(tmp_path):
    prompts = ["story : the cat .", [{"role": "user", "content": "story : a dog ."}], "story : the cow ."]
    a, b = [" apple pear", " dog runs", " apple"], [" dog", " plum apple pear", " pear"]
    with ChatServer(answer=prefers_fruit) as server:
        verdicts = LLMJudge("m", settings(tmp_path, base_url=server.url)).compare(prompts, a, b)
    assert [v.winner for v in verdicts] == ["A", "B", "tie"]
    assert verdicts[0].details["answer_ab"] == "A" and verdicts[0].details["answer_ba"] == "B"
    assert any("user: story : a dog ." in r["body"]["messages"][0]["content"] for r in server.requests)  # chat as text
    with ChatServer(answer=lambda text: "I cannot decide.") as server:
        judge = LLMJudge("m", settings(tmp_path, base_url=server.url, cache_path=None))
        assert [v.winner for v in judge.compare(prompts, a, b)] == ["tie"] * 3
    assert judge.stats["unparsed"] == 6


def test_llm_judge_retries_after_429_500_and_a_timeout_then_gives_one_clear_error(tmp_path):
    with ChatServer(answer=lambda text: "B", failures=[429, 500, "slow"]) as server:
        judge = LLMJudge("m", settings(tmp_path, base_url=server.url, timeout=0.2))
        assert judge.request([{"role": "user", "content": "x"}]) == "B"
        assert len(server.requests) == 4 and judge.stats["requests"] == 4
    with ChatServer(failures=[503] * 10) as server:
        judge = LLMJudge("m", settings(tmp_path, base_url=server.url, max_retries=2))
        with pytest.raises(UsageError, match=r"failed 3 times \(last: HTTP 503\)"):
            judge.request([{"role": "user", "content": "x"}])
        assert len(server.requests) == 3
    with ChatServer(failures=[401] * 10) as server:
        judge = LLMJudge("m", settings(tmp_path, base_url=server.url, api_key_env="P3O_UNSET_KEY"))
        with pytest.raises(UsageError, match="refused the key.*P3O_UNSET_KEY") as error:
            judge.request([{"role": "user", "content": "x"}])
        assert len(server.requests) == 1 and "\n" not in str(error.value)  # no retry of a refusal


@pytest.fixture(scope="module")
def judge_model(tmp_path_factory):
    """A tiny causal LM whose vocabulary spells the answers A and B."""
    from p3o.models.tiny import build_tiny_model, build_word_tokenizer

    tokenizer = build_word_tokenizer(VOCAB + ["A", "B", "tie"])
    path = tmp_path_factory.mktemp("judge")
    build_tiny_model(tokenizer, "llama", num_layers=1, hidden_size=32, num_heads=2, max_positions=512,
                     seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_hf_judge_gives_a_valid_result_and_cancels_the_position(assets, held_out, judge_model, tmp_path):
    result = run_winrate_cli(*winrate_args(assets["llama"], assets["gpt2"], held_out, f"hf:{judge_model}",
                                           tmp_path / "hf.json", "--max_prompts", "16"))
    assert result["n"] == 16 and result["wins"] + result["losses"] + result["ties"] == 16
    assert 0 <= result["ci_low"] <= result["win_rate"] <= result["ci_high"] <= 1
    assert all(math.isfinite(r["margin"]) for r in result["records"])

    judge = build_judge(f"hf:{judge_model}", JudgeSettings(batch_size=4))
    prompts, a, b = ["story : the cat ."] * 3, [" apple", " dog runs", " the cow"], [" pear", " apple", " the cow"]
    forward, backward = judge.compare(prompts, a, b), judge.compare(prompts, b, a)
    for f, r in zip(forward, backward):  # swapping A and B flips the margin: no lean to a position survives
        assert f.details["margin"] == pytest.approx(-r.details["margin"], abs=1e-5)
    assert forward[2].winner == "tie" and forward[2].details["margin"] == pytest.approx(0.0, abs=1e-6)


def test_hf_judge_refuses_a_tokenizer_without_the_answers(assets):
    with pytest.raises(UsageError, match="no token for the answer 'A'"):
        build_judge(f"hf:{assets['llama']}", JudgeSettings())


def test_score_judges_compare_rewards(assets, tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    fruit = build_judge(f"reward_fn:{assets['rewards']}:fruit", JudgeSettings(tie_margin=0.5))
    verdicts = fruit.compare(["p"] * 3, [" apple pear", " dog", " apple"], [" dog", " plum", " cat"])
    assert [v.winner for v in verdicts] == ["A", "B", "A"]
    gold = build_judge("gold:summarize", JudgeSettings())
    assert [v.winner for v in gold.compare(["a"], ["same"], ["same"])] == ["tie"]
    rm = tmp_path / "rm"
    LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                               num_labels=1)).save_pretrained(rm)
    tokenizer.save_pretrained(rm)
    verdicts = build_judge(f"reward_model:{rm}", JudgeSettings()).compare(["story :"] * 2, [" cat", " dog"],
                                                                        [" cat", " apple"])
    assert verdicts[0].winner == "tie" and verdicts[1].winner in ("A", "B")


def agresti_coull(successes: int, n: int) -> tuple[float, float]:
    """The textbook Agresti-Coull interval (no ties), as the oracle."""
    n_tilde = n + Z * Z
    p = (successes + Z * Z / 2) / n_tilde
    half = Z * math.sqrt(p * (1 - p) / n_tilde)
    return max(p - half, 0.0), min(p + half, 1.0)


def test_interval_on_known_counts():
    assert win_rate_interval(8, 2, 0) == pytest.approx(agresti_coull(8, 10))
    assert win_rate_interval(8, 2, 0) == pytest.approx((0.4794, 0.9541), abs=1e-4)
    low, high = win_rate_interval(8, 0, 0)
    assert high == 1.0 and low == pytest.approx(0.63, abs=0.01)  # never collapses to [1, 1]
    low, high = win_rate_interval(0, 0, 10)
    assert low == pytest.approx(1 - high) and (low, high) == pytest.approx((0.361, 0.639), abs=1e-3)
    assert win_rate_interval(0, 0, 0) == (0.0, 1.0)
    # mirror: swapping wins and losses mirrors the interval around 1/2
    assert win_rate_interval(3, 9, 5) == pytest.approx(tuple(1 - x for x in reversed(win_rate_interval(9, 3, 5))))
    # ties narrow the interval: scores of 1/2 are closer to the mean than a coin's 0 or 1
    with_ties, coin = win_rate_interval(30, 30, 40), win_rate_interval(50, 50, 0)
    assert with_ties[1] - with_ties[0] < coin[1] - coin[0]
    # for many prompts it is the plain normal interval of the per-prompt scores
    scores = [1.0] * 4000 + [0.0] * 3000 + [0.5] * 3000
    mean, sd = np.mean(scores), np.std(scores, ddof=1)
    assert win_rate_interval(4000, 3000, 3000) == pytest.approx((mean - Z * sd / 100, mean + Z * sd / 100), abs=1e-3)
    result = summarise([Verdict("A"), Verdict("tie"), Verdict("B"), Verdict("A")])
    assert (result["win_rate"], result["wins"], result["losses"], result["ties"]) == (0.625, 2, 1, 1)


@pytest.mark.parametrize("probs, n", [((0.3, 0.4, 0.3), 20), ((0.1, 0.8, 0.1), 30), ((0.9, 0.1, 0.0), 30), ((0.0, 0.1, 0.9), 10),
                                      ((0.6, 0.1, 0.3), 100)])
def test_interval_covers_the_true_win_rate_about_95_percent_of_the_time(probs, n):
    truth = probs[0] + probs[1] / 2  # (win, tie, loss) probabilities
    counts = np.random.default_rng(0).multinomial(n, probs, size=2000)
    covered = [low <= truth <= high for low, high in (win_rate_interval(w, l, t) for w, t, l in counts.tolist())]
    # Agresti-Coull's own coverage dips to about 0.92 near the edges with few prompts; so does this one
    assert 0.91 <= np.mean(covered) <= 0.995


@pytest.mark.parametrize("ab, ba, winner", [
    ("A", "B", "A"), ("B", "A", "B"), ("A", "A", "tie"), ("B", "B", "tie"), ("A", "tie", "A"), ("tie", "A", "B"),
    ("tie", "tie", "tie"), (None, "B", "A"), (None, None, "tie")])
def test_two_orders_combine_by_their_vote_sum(ab, ba, winner):
    # in order BA policy B's response is shown as "A": answering "B" there prefers policy A
    assert combine_orders(ab, ba) == winner


def test_answers_are_parsed_strictly():
    cases = {"A": "A", " b ": "B", '"tie".': "tie", "**B**": "B", "Verdict: A": "A", "Both fine. Answer: tie": "tie",
             "I think answer a is fine": None, "maybe": None}
    assert {reply: parse_answer(reply) for reply in cases} == cases


@pytest.mark.parametrize("change, message", [
    (("--judge", "oracle:x"), ("unknown judge kind 'oracle' in --judge oracle:x; known kinds: gold, reward_fn, "
                               "reward_model, llm, hf")),
    (("--judge", "gold"), "--judge gold needs its argument: write --judge gold:TASK"),
    (("--model_a", "/no/such/model"), "--model_a /no/such/model does not exist"),
    (("--judge", "reward_fn:/no/such/rewards.py:fruit"), "file /no/such/rewards.py does not exist"),
    (("--judge", "hf:./no-judge"), "judge model ./no-judge does not exist"),
    (("--judge_model", "gpt-x"), "--judge_model gpt-x names an llm judge but --judge is reward_fn:"),
])
def test_bad_input_is_one_line_and_exit_2(assets, held_out, tmp_path, capsys, change, message):
    args = winrate_args(assets["llama"], assets["llama"], held_out, f"reward_fn:{assets['rewards']}:fruit",
                        tmp_path / "out.json")
    flag, value = change
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out.json").exists()


def test_an_existing_output_file_is_kept_without_overwrite(assets, held_out, tmp_path, capsys):
    out = tmp_path / "result.json"
    out.write_text("precious")
    args = winrate_args(assets["llama"], assets["llama"], held_out, f"reward_fn:{assets['rewards']}:fruit", out)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists; pass --overwrite" in err[0] and out.read_text() == "precious"


def test_every_judge_kind_is_registered():
    assert list(JUDGES) == ["gold", "reward_fn", "reward_model", "llm", "hf"]
