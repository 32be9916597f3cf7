"""--reward_url: a reward served over HTTP, against a server the tests start on 127.0.0.1 that is
slow, flaky, rate-limited, wrong, down or fine."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import prompt_rows

from p3o import P3OConfig, P3OTrainer
from p3o.cli import main
from p3o.errors import RewardError, UsageError
from p3o.reward import RemoteReward


class RewardServer:
    """Answers POST /score with {"rewards": [words in each completion]}; `script` lists what the next
    requests get instead ("503", "429", "slow", "close", "400", "short", "nan", "junk")."""

    def __init__(self):
        self.script, self.bodies = [], []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.bodies.append(body)
                action = server.script.pop(0) if server.script else "ok"
                if action == "close":  # drop the connection, as a restarting server does
                    self.close_connection = True
                    self.connection.close()
                    return
                if action == "slow":
                    threading.Event().wait(1.0)
                if action in ("503", "429", "400"):
                    payload, code = b"context overflow: 9000 tokens" if action == "400" else b"busy", int(action)
                else:
                    rewards = [float(len(c.split()) if isinstance(c, str) else len(c[-1]["content"].split()))
                               for c in body["completions"]]
                    rewards = {"short": rewards[:-1], "nan": [float("nan")] * len(rewards)}.get(action, rewards)
                    payload, code = (b"not json" if action == "junk" else json.dumps({"rewards": rewards}).encode()), 200
                self.send_response(code)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = RewardServer()
    yield s
    s.close()


def test_a_batch_is_posted_with_its_columns_and_rewards_read_back(server):
    reward = RemoteReward(server.url, timeout=5, max_retries=0)
    values = reward(["p1", "p2"], ["a b", "c"], completion_ids=[[1, 2], [3]], topic=["t0", "t1"])
    assert values.tolist() == [2.0, 1.0]
    assert server.bodies[0] == {"prompts": ["p1", "p2"], "completions": ["a b", "c"], "completion_ids": [[1, 2], [3]],
                                "topic": ["t0", "t1"]}


@pytest.mark.parametrize("script", [["503", "503"], ["429"], ["close"], ["slow"]])
def test_busy_restarting_and_slow_servers_are_retried(server, script):
    server.script = list(script)
    reward = RemoteReward(server.url, timeout=0.5, max_retries=3, backoff=0.01)
    assert reward(["p"], ["a b c"]).tolist() == [3.0]
    assert len(server.bodies) == len(script) + 1


@pytest.mark.parametrize("script, message", [
    (["400"], "refused the batch (HTTP 400: context overflow: 9000 tokens)"),
    (["503"] * 3, "failed 3 times (last: HTTP 503: busy)"),
    (["short"], "returned 1 values for 2 completions"),
    (["nan"], "returned a non-finite value"),
    (["junk"], "must answer JSON {\"rewards\": [...]}"),
])
def test_a_misbehaving_server_is_one_clear_error_with_its_reason(server, script, message):
    server.script = list(script)
    with pytest.raises(RewardError) as info:
        RemoteReward(server.url, timeout=2, max_retries=2, backoff=0.01)(["p", "q"], ["a", "b"])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_an_unreachable_url_is_refused_before_anything_is_written(assets, tmp_path, capsys):
    s = RewardServer()
    url = s.url
    s.close()  # nothing listens there now
    out = tmp_path / "run"
    code = main(["train", "--model_name_or_path", str(assets["llama"]), "--dataset", str(assets["prompts"]),
                 "--reward_url", url, "--output_dir", str(out), "--max_steps", "1", "--disable_progress_bar"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"--reward_url {url}: cannot connect to 127.0.0.1" in err[0]
    assert not out.exists()


def test_a_url_and_a_function_train_together_and_a_dead_server_keeps_the_checkpoint(assets, tmp_path, server):
    fruit = {}
    exec("def fruit(prompts, completions, **kw):\n    return [float('pear' in c) for c in completions]", fruit)
    args = P3OConfig(output_dir=str(tmp_path / "run"), max_steps=3, pairs_per_step=4, max_new_tokens=4,
                     learning_rate=1e-3, reward_url=[server.url], reward_weights=[0.5, 1.0], save_steps=1,
                     reward_url_retries=1, reward_url_timeout=2, disable_progress_bar=True)
    trainer = P3OTrainer(str(assets["llama"]), fruit["fruit"], args=args, train_dataset=prompt_rows(16))
    server.script = ["ok", "ok", "400"]  # steps 1 and 2 are scored; step 3's batch is refused
    with pytest.raises(UsageError, match="refused the batch"):
        trainer.train()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and {"reward/score", "reward/fruit"} <= lines[0].keys()
    assert lines[0]["reward"] == pytest.approx(0.5 * lines[0]["reward/score"] + lines[0]["reward/fruit"])
    assert (tmp_path / "run" / "checkpoint-2" / "trainer_state.json").is_file()  # the last checkpoint is intact
