"""`p3o winrate`: policy A against policy B on the same prompts, judged, with a 95% interval."""
from __future__ import annotations

import json
import logging
import math
import re
import socket
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
    label_margin,
    order_diagnostics,
    parse_answer,
)
from p3o.eval.winrate import judge_warnings, summarise, summary_line, win_rate_interval

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
    """An OpenAI-compatible chat-completions server on 127.0.0.1 (GET /v1/models, POST
    /v1/chat/completions). `answer(judging prompt) -> reply`, or a (reply, {label: log-probability})
    pair: the log-probabilities of the reply's first token, sent as `top_logprobs` when the request asks
    for them and `logprobs` is "serve" ("ignore": never sent, as a server without them; "refuse": HTTP
    400 naming logprobs). `failures` are what the first requests get instead: an HTTP status, a
    (status, error message) pair sent as an OpenAI-style error body, or "slow" (a reply later than the
    client waits). `port` binds a given port (a server coming back where it was)."""

    def __init__(self, answer=lambda text: "A", failures=(), logprobs="serve", port=0):
        self.answer, self.failures, self.logprobs, self.requests, self.gets = answer, list(failures), logprobs, [], []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def send_json(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up on a slow reply
                    pass

            def do_GET(self):
                server.gets.append(self.path)
                if self.path != "/v1/models":
                    self.send_error(404)
                    return
                self.send_json(200, {"object": "list", "data": [{"id": "judge-model", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                failure = server.failures.pop(0) if server.failures else None
                if failure == "slow":
                    time.sleep(0.5)
                elif isinstance(failure, tuple):
                    self.send_json(failure[0], {"error": {"code": failure[0], "message": failure[1],
                                                          "type": "server_error"}})
                    return
                elif failure is not None:
                    self.send_error(failure)
                    return
                if body.get("logprobs") and server.logprobs == "refuse":
                    self.send_json(400, {"error": {"message": "logprobs is not supported by this model"}})
                    return
                answered = server.answer(body["messages"][-1]["content"])
                if answered is DROP:  # the connection is closed without a reply
                    self.close_connection = True
                    return
                reply, top = answered if isinstance(answered, tuple) else (answered, None)
                choice = {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}
                if body.get("logprobs") and server.logprobs == "serve" and top:
                    first = max(top, key=top.get)
                    choice["logprobs"] = {"content": [
                        {"token": first, "logprob": top[first],
                         "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top.items()]},
                        {"token": " more", "logprob": -0.1, "top_logprobs": [{"token": " more", "logprob": -0.1}]}]}
                self.send_json(200, {"object": "chat.completion", "choices": [choice]})

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
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


DROP = object()  # what `answer` returns for the stub to close the connection without a reply


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (connections to it are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        assert server.gets == ["/v1/models"] * 2  # the endpoint was checked before each run generated
    assert result["ties"] == result["n"] == 12 and result["win_rate"] == 0.5  # position bias cancels
    assert result["abstentions"] == 0 and result["wins"] == result["losses"] == 0
    diagnostics = result["judge_diagnostics"]
    assert diagnostics["first_position_share"] == 1.0 and diagnostics["agreement"] == 0.0
    assert any("mostly position-biased" in w for w in result["warnings"])
    assert again["records"] == result["records"] and again["judge_stats"]["requests"] == 0
    asked = {(r["body"]["model"], *shown(r["body"]["messages"][-1]["content"])) for r in first_run}
    both_orders = {("judge-model", a, b) for r in result["records"] for a, b in
                   [(r["response_a"], r["response_b"]), (r["response_b"], r["response_a"])]}
    assert asked == both_orders and len(first_run) == len(both_orders)
    assert all(r["path"] == "/v1/chat/completions" and r["body"]["temperature"] == 0 and r["body"]["max_tokens"] == 32
               and r["body"]["logprobs"] is True and r["body"]["top_logprobs"] == 10 for r in first_run)
    assert all(r["headers"]["Authorization"] == f"Bearer {SECRET}" for r in first_run)
    written = "".join(p.read_text() for p in tmp_path.rglob("*") if p.is_file())
    assert (tmp_path / "judge_cache.jsonl").is_file()
    captured = capsys.readouterr()
    assert SECRET not in written + captured.out + captured.err + caplog.text
    summary = [line for line in captured.out.splitlines() if line.startswith("win rate of A over B")]
    assert len(summary) == 2 and ("0.500 (95% CI" in summary[0] and "0 abstentions" in summary[0]
                                  and "first position in 100% of its answers, orders agreed on 0% of pairs" in summary[0])


def test_a_position_biased_judge_with_unreadable_replies_gives_exactly_one_half(assets, held_out, tmp_path, capsys):
    """The run the issue reported: a judge that says "A" or, for some judging prompts, prose. Counting
    an unreadable order as no vote turned "A" + prose into a win for whichever policy was shown first;
    now such a pair is an abstention and the pairs read in both orders are ties."""
    def biased(text: str) -> str:
        first, _ = shown(text)
        return "I think both responses have merit." if len(first) % 3 == 0 else "A"

    with ChatServer(answer=biased, logprobs="ignore") as server:
        result = run_winrate_cli(*winrate_args(assets["llama"], assets["gpt2"], held_out, "llm:judge-model",
                                               tmp_path / "wr.json", "--max_prompts", "24",
                                               "--judge_base_url", server.url))
    records = result["records"]
    unreadable = [r for r in records if None in (r["answer_ab"], r["answer_ba"])]
    read_both = [r for r in records if None not in (r["answer_ab"], r["answer_ba"])]
    assert unreadable and read_both  # the stub produced both kinds of pair on these responses
    assert result["wins"] == result["losses"] == 0 and result["win_rate"] == 0.5
    assert result["abstentions"] == len(unreadable) and result["n"] == result["ties"] == len(read_both)
    assert all(r["verdict"] == "abstain" and r["score"] is None for r in unreadable)
    assert result["ci_low"] < 0.5 < result["ci_high"]
    assert result["prompts"] == 24 and result["abstention_bounds"][0] < 0.5 < result["abstention_bounds"][1]
    diagnostics = result["judge_diagnostics"]
    assert diagnostics["abstentions"] == len(unreadable) and diagnostics["first_position_share"] == 1.0
    assert diagnostics["unreadable"] == sum(r["answer_ab"] is None for r in records) + sum(
        r["answer_ba"] is None for r in records)
    out = capsys.readouterr().out
    assert f"{len(unreadable)} abstentions" in out


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
        assert [v.winner for v in judge.compare(prompts, a, b)] == ["abstain"] * 3
    assert judge.stats["unparsed"] == 6


WRAPPED = ['**{}**', 'The answer is "{}"', 'Response {}', 'Answer: {}', '{}. It mentions more fruit.',
           'The better response is Response {}.', '"{}"', '{{"answer": "{}"}}', 'Verdict: **{}**\n\nIt is more relevant.']


def test_llm_judge_reads_the_wrapped_forms_and_not_prose(tmp_path):
    """An informative judge read in whatever form it answers, and prose with a capital A never counted."""
    calls = []

    def wrapped(text: str) -> str:
        label = prefers_fruit(text)
        calls.append(label)
        return WRAPPED[len(calls) % len(WRAPPED)].format(label) if label != "tie" else "It's a tie."

    prompts = ["story : the cat ."] * 9
    a = [" apple pear", " dog", " apple plum pear", " cow", " pear", " dog dog", " apple", " cat", " plum"]
    b = [" dog", " apple", " cat", " pear plum", " cow", " apple", " dog", " plum", " cat"]
    truth = ["A", "B", "A", "B", "A", "B", "A", "B", "A"]
    with ChatServer(answer=wrapped, logprobs="ignore") as server:
        judge = LLMJudge("m", settings(tmp_path, base_url=server.url, cache_path=None))
        assert [v.winner for v in judge.compare(prompts, a, b)] == truth
    assert judge.stats["unparsed"] == 0
    prose = "Response B is a good answer. A better one would name a fruit."
    with ChatServer(answer=lambda text: prose, logprobs="ignore") as server:
        judge = LLMJudge("m", settings(tmp_path, base_url=server.url, cache_path=None))
        assert [v.winner for v in judge.compare(prompts[:2], a[:2], b[:2])] == ["abstain"] * 2


def test_llm_judge_reads_log_probabilities_where_the_server_gives_them(tmp_path, caplog):
    """A judge that writes prose but whose first token prefers the better response: with logprobs its
    p(A) vs p(B) answers (as the hf judge reads its model); without them the pairs abstain; a server
    that refuses the parameter is asked without it."""
    def prose_with_logprobs(text: str):
        label = prefers_fruit(text)
        top = {"The": -0.1, "A": -1.0, "B": -2.7} if label == "A" else {"The": -0.1, "B": -1.3, " A": -2.5}
        return "The first response talks about fruit, which", top

    prompts, a, b = ["story : the cat ."] * 2, [" apple pear", " dog"], [" dog", " plum"]
    with ChatServer(answer=prose_with_logprobs) as server:
        judge = LLMJudge("m", settings(tmp_path, base_url=server.url))
        verdicts = judge.compare(prompts, a, b)
    assert [v.winner for v in verdicts] == ["A", "B"]
    assert verdicts[0].details["read_ab"] == "logprobs" and verdicts[0].details["margin_ab"] == pytest.approx(1.7)
    assert verdicts[1].details["margin_ab"] == pytest.approx(-1.2)  # " A" counts as the label A
    assert judge.stats["read_from_logprobs"] == 4 and judge.stats["unparsed"] == 4
    cached = [json.loads(line) for line in (tmp_path / "cache.jsonl").read_text().splitlines()]
    assert len(cached) == 4 and all(e["margin"] is not None for e in cached)
    # prose that opens with the article "A" is no vote, whatever the token's probability
    with ChatServer(answer=lambda text: ("A common mistake is to salt too early.", {"A": -0.1, "B": -3.0})) as server:
        judge = LLMJudge("m", settings(tmp_path, base_url=server.url, cache_path=None))
        verdicts = judge.compare(prompts, a, b)
    assert [v.winner for v in verdicts] == ["abstain"] * 2 and verdicts[0].details["margin_ab"] == pytest.approx(2.9)
    assert judge.stats["read_from_logprobs"] == 0
    with ChatServer(answer=prose_with_logprobs, logprobs="ignore") as server:
        judge = LLMJudge("m", settings(tmp_path, base_url=server.url, cache_path=None))
        assert [v.winner for v in judge.compare(prompts, a, b)] == ["abstain"] * 2
    with ChatServer(answer=lambda text: ("B", {"B": -0.1, "A": -2.4}), logprobs="refuse") as server:
        judge = LLMJudge("m", settings(tmp_path, base_url=server.url, cache_path=None, workers=1))
        assert [v.winner for v in judge.compare(prompts, a, b)] == ["tie"] * 2  # "B" in both orders
        assert [r["body"].get("logprobs") for r in server.requests] == [True] + [None] * 4
    assert "does not give log-probabilities (logprobs is not supported by this model)" in caplog.text


def test_llm_judge_retries_after_429_500_and_a_timeout_then_gives_one_clear_error(tmp_path):
    with ChatServer(answer=lambda text: "B", failures=[429, 500, "slow"]) as server:
        judge = LLMJudge("m", settings(tmp_path, base_url=server.url, timeout=0.2))
        assert judge.request([{"role": "user", "content": "x"}])["reply"] == "B"
        assert len(server.requests) == 4 and judge.stats["requests"] == 4
    overflow = "the request exceeds the available context size, try increasing it"
    with ChatServer(failures=[(500, overflow)] * 10) as server:
        judge = LLMJudge("m", settings(tmp_path, base_url=server.url, max_retries=2))
        with pytest.raises(UsageError, match=rf"failed 3 times \(last: HTTP 500: {overflow}\)") as error:
            judge.request([{"role": "user", "content": "x"}])
        assert len(server.requests) == 3 and "\n" not in str(error.value)
    with ChatServer(failures=[(400, "model 'gpt-x' not found")]) as server:
        with pytest.raises(UsageError, match=r"refused the request \(HTTP 400: model 'gpt-x' not found\)"):
            LLMJudge("m", settings(tmp_path, base_url=server.url)).request([{"role": "user", "content": "x"}])
    with ChatServer(failures=[401] * 10) as server:
        judge = LLMJudge("m", settings(tmp_path, base_url=server.url, api_key_env="P3O_UNSET_KEY"))
        with pytest.raises(UsageError, match="refused the key.*P3O_UNSET_KEY") as error:
            judge.request([{"role": "user", "content": "x"}])
        assert len(server.requests) == 1 and "\n" not in str(error.value)  # no retry of a refusal


def test_a_restarting_judge_server_does_not_end_the_run(tmp_path, caplog):
    """Connections refused while the server is down are retried with the 5xx back-off until it is back."""
    port = free_port()
    judge = LLMJudge("m", settings(tmp_path, base_url=f"http://127.0.0.1:{port}/v1", backoff=0.1, max_retries=6))
    later = []

    def come_back():
        time.sleep(0.4)
        later.append(ChatServer(answer=prefers_fruit, port=port).__enter__())

    threading.Thread(target=come_back, daemon=True).start()
    try:
        verdicts = judge.compare(["story :"], [" apple"], [" dog"])
    finally:
        for server in later:
            server.__exit__()
    assert [v.winner for v in verdicts] == ["A"] and len(later[0].requests) == 2
    assert "ConnectionRefusedError" in caplog.text and judge.stats["requests"] > 2
    dead = LLMJudge("m", settings(tmp_path, base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=1))
    with pytest.raises(UsageError, match=r"failed 2 times \(last: ConnectionRefusedError"):
        dead.request([{"role": "user", "content": "x"}])


def test_a_fatal_error_keeps_every_reply_already_judged_in_the_cache(tmp_path):
    prompts, a, b = ["story :"] * 4, [" apple", " dog", " pear", " cow"], [" dog", " plum", " cat", " apple"]

    def fails_on_the_cow(text: str):
        return DROP if "cow" in text else prefers_fruit(text)  # a fatal error once the retries are spent

    port = free_port()  # the cache is per server: the rerun asks the same one, come back
    with ChatServer(answer=fails_on_the_cow, port=port) as server:
        judge = LLMJudge("m", settings(tmp_path, base_url=server.url, max_retries=1, workers=1))
        with pytest.raises(UsageError, match="failed 2 times"):
            judge.compare(prompts, a, b)
    # one worker asks in order: pairs 0-2 in order AB, then the cow (twice); the request it had already
    # taken up when the cow failed may finish; the rest were never asked
    answered = [r for r in server.requests if "cow" not in r["body"]["messages"][0]["content"]]
    assert 3 <= len(answered) <= 4 and len(server.requests) == len(answered) + 2
    cached = [json.loads(line) for line in (tmp_path / "cache.jsonl").read_text().splitlines()]
    assert len(cached) == len(answered) and [e["reply"] for e in cached[:3]] == ["A", "B", "A"]
    with ChatServer(answer=prefers_fruit, port=port) as server:
        verdicts = LLMJudge("m", settings(tmp_path, base_url=server.url)).compare(prompts, a, b)
        assert len(server.requests) == 8 - len(cached)  # only what was missing
    assert [v.winner for v in verdicts] == ["A", "B", "A", "B"]


def test_winrate_checks_the_judge_endpoint_before_generating(assets, held_out, tmp_path, capsys):
    port = free_port()
    args = winrate_args(assets["llama"], assets["gpt2"], held_out, "llm:judge-model", tmp_path / "wr.json",
                        "--judge_base_url", f"http://127.0.0.1:{port}/v1")
    started = time.monotonic()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot reach the judge API at http://127.0.0.1:{port}/v1" in err[0], err
    assert "ConnectionRefusedError" in err[0] and time.monotonic() - started < 10  # before any model loaded
    assert not (tmp_path / "wr.json").exists()
    with ChatServer() as server:  # a server whose /models refuses the key
        server.httpd.RequestHandlerClass.do_GET = lambda self: self.send_error(401)
        args[args.index("--judge_base_url") + 1] = server.url
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "refused the key (HTTP 401" in err[0] and not server.requests


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
    ("A", "B", "A"), ("B", "A", "B"), ("A", "A", "tie"), ("B", "B", "tie"), ("tie", "tie", "tie"),
    ("A", "tie", "tie"), ("tie", "A", "tie"), ("B", "tie", "tie"),
    (None, "B", "abstain"), ("A", None, "abstain"), (None, None, "abstain")])
def test_a_pair_is_decided_only_when_both_orders_name_the_same_policy(ab, ba, winner):
    # in order BA policy B's response is shown as "A": answering "B" there prefers policy A
    assert combine_orders(ab, ba) == winner


def test_a_judge_naming_one_position_gives_exactly_one_half_whatever_it_leaves_unread():
    rng = np.random.default_rng(0)
    for _ in range(20):  # any pattern of unreadable replies
        unread = rng.random((2, 50)) < rng.random()
        ab = [None if u else "A" for u in unread[0]]
        ba = [None if u else "A" for u in unread[1]]
        verdicts = [Verdict(combine_orders(x, y), {"answer_ab": x, "answer_ba": y}) for x, y in zip(ab, ba)]
        result = summarise(verdicts)
        assert result["wins"] == result["losses"] == 0
        assert result["n"] == 0 or result["win_rate"] == 0.5
        assert result["abstentions"] == sum(x is None or y is None for x, y in zip(ab, ba))
        assert result["judge_diagnostics"]["first_position_share"] in (1.0, None)


def test_abstentions_leave_the_denominator_and_bound_the_rate():
    verdicts = [Verdict("A")] * 6 + [Verdict("B")] * 2 + [Verdict("tie")] * 2 + [Verdict("abstain")] * 5
    result = summarise(verdicts)
    assert (result["n"], result["abstentions"], result["prompts"]) == (10, 5, 15)
    assert result["win_rate"] == 0.7 and (result["ci_low"], result["ci_high"]) == win_rate_interval(6, 2, 2)
    assert result["abstention_bounds"] == pytest.approx([7 / 15, 12 / 15])
    assert "judge_diagnostics" not in result  # a score judge has no orders
    warnings = judge_warnings(result)
    assert len(warnings) == 1 and "5 of 15 prompts are abstentions" in warnings[0] and "[0.467, 0.800]" in warnings[0]
    nothing = summarise([Verdict("abstain")] * 3)
    assert nothing["n"] == 0 and nothing["win_rate"] is None and (nothing["ci_low"], nothing["ci_high"]) == (0, 1)
    json.loads(json.dumps(nothing), parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))  # null, not NaN
    assert "n/a (no prompt judged" in summary_line({**nothing, "judge": "j", "model_a": "a", "model_b": "b"}, "o")


def test_order_diagnostics():
    ab = ["A", "A", "B", "tie", None, "A"]
    ba = ["B", "A", "A", "tie", "A", None]
    d = order_diagnostics(ab, ba)
    # the answers naming a position: A A B A in order AB, B A A A in order BA: 6 of 8 name the first
    assert d["first_position_share"] == 0.75
    # read in both orders: (A,B) agree on policy A, (A,A) disagree, (B,A) agree on B, (tie,tie) agree
    assert d["agreement"] == 0.75 and d["pairs_read_in_both_orders"] == 4 and d["abstentions"] == 2
    assert d["unreadable"] == 2 and d["replies"] == 12
    assert order_diagnostics([None], [None])["first_position_share"] is None


def test_label_margin_reads_the_first_answer_token():
    def content(*tokens):
        return {"content": [{"token": tok, "logprob": -0.1, "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top]}
                            for tok, top in tokens]}

    assert label_margin(content(("A", [("A", -0.1), ("B", -2.5)]))) == pytest.approx(2.4)
    # quotes and stars before the label are skipped; " B" and "B" both spell B
    both_b = math.log(math.exp(-0.5) + math.exp(-1.5))
    assert label_margin(content(("**", [("**", -0.01)]), (" B", [(" B", -0.5), ("B", -1.5), (" A", -3.0)]))) == \
        pytest.approx(-3.0 - both_b)
    # a label outside the top ones: bounded by the least listed, so the margin is at least this
    assert label_margin(content(("A", [("A", -0.05), ("Response", -3.0), ("The", -4.0)]))) == pytest.approx(3.95)
    assert label_margin(content(("The", [("The", -0.1), ("This", -2.0)]))) is None
    assert label_margin(None) is None and label_margin({"content": []}) is None and label_margin({"x": 1}) is None


def test_answers_are_parsed_in_the_forms_judges_write():
    cases = {"A": "A", " b ": "B", '"tie".': "tie", "**B**": "B", "Verdict: A": "A", "Both fine. Answer: tie": "tie",
             'The answer is "B"': "B", 'The answer is "B".': "B", "Response B": "B", "Answer: B": "B",
             "The answer is B": "B", "**Answer:** B": "B", "Verdict: **A**": "A", "(B)": "B", '{"answer": "B"}': "B",
             "The answer is: Response B": "B", "Option A": "A", "B is better.": "B", "I would choose B.": "B",
             "B. Response B is more accurate.": "B", "A\n\nResponse A explains more.": "A",
             "The better response is Response A.": "A", "Response A is better because it is accurate.": "A",
             "My final answer is A because it is clearer.": "A", "Answer: A. Final answer: B": "B",
             "It's a tie.": "tie", "Tie - both are fine": "tie",
             # what SmolLM2-135M-Instruct wrote as a judge (docs/evaluation.md)
             "A is the best answer.": "A", "A is a more specific and accurate answer to the prompt.": "A",
             "A is indeed the best answer.": "A", "A is the only correct answer.": "A", "A is a better choice.": "A",
             'The best answer is indeed "B"': "B", 'The answer to the prompt is "A"': "A", "A: A\n": "A",
             "A is not better than B.": None, "A is less accurate.": None,
             # prose that merely contains a capital A or B, or names both, is not an answer
             "I think answer a is fine": None, "maybe": None, "...a good answer. A better one...": None,
             "This is a good answer. A better one would mention the cat.": None,
             "A better one would mention it.": None, "Response A is a good answer": None,
             "A common mistake in learning to cook is using too much salt.": None,
             "A more helpful response would be to list the steps.": None,
             "Response A is better in tone, but Response B is better in substance.": None,
             "Both responses are good. A's explanation is longer.": None, "I choose a different approach": None,
             # "more" with a word that is no praise, and "neither ... nor", name no winner
             "Response A is more confusing than Response B.": None, "B is more harmful.": None,
             "Neither A nor B is better.": None, "Response B is more accurate.": "B"}
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
