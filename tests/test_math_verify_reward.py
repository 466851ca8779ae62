"""The built-in ``math_verify`` reward (the ``math`` extra): equivalent answers written differently score 1, wrong
ones and garbage 0, through the objective's real scorer; off the main thread it still scores (no signal timeouts);
without the extra, naming it is one error line saying what to install."""

from __future__ import annotations

import builtins
import json
import threading

import pytest
import torch

from modalforge.errors import ModalforgeError
from modalforge.rl.rewards import Reward, load_rewards, score

pytest.importorskip("math_verify")

CASES = [  # (reference, completion, expected)
    ("0.5", "\\frac{1}{2}", 1.0),
    ("\\frac{1}{2}", "so the answer is 0.5", 1.0),
    ("1/2", "I think $\\frac12$.", 1.0),
    ("2", "The answer is \\boxed{2}.", 1.0),
    (2, "we get \\boxed{2} in the end", 1.0),          # a number field, as read from jsonl
    ("x+1", "$1 + x$", 1.0),                             # a bare expression as reference
    ("2", "The answer is \\boxed{3}.", 0.0),
    ("0.5", "0.25", 0.0),
    ("2", "no idea", 0.0),                               # nothing parses
    ("2", "}}}\\boxed{", 0.0),                           # garbage
    ("2", "", 0.0),
]


def _call(rewards, references, completions, field="answer"):
    n = len(completions)
    return score(rewards, ["q"] * n, completions, {field: references}, [f"f, line {i + 1}" for i in range(n)])


def test_equivalent_answers_score_one_wrong_and_garbage_zero():
    rewards = load_rewards(["math_verify"])
    assert rewards[0].kwargs == {"answer_field": "answer", "timeout": 5}
    got = _call(rewards, [c[0] for c in CASES], [c[1] for c in CASES])[:, 0].tolist()
    assert got == [c[2] for c in CASES]
    # another field name; conversational completions; a reference that does not parse scores None (NaN)
    rewards = load_rewards([{"reward": "math_verify", "answer_field": "solution"}])
    got = _call(rewards, ["3", ""], [[{"role": "assistant", "content": "\\boxed{3}"}], "3"], "solution")
    assert got[0, 0] == 1.0 and torch.isnan(got[1, 0])
    with pytest.raises(ModalforgeError, match="needs an 'solution' field"):
        _call(rewards, ["3"], ["3"], "answer")


def test_options_are_checked_at_load_time():
    with pytest.raises(ModalforgeError, match=r"objective.rewards\[0\]: unknown option\(s\) \['field'\] for reward "
                                              r"math_verify; valid: answer_field, timeout"):
        load_rewards([{"reward": "math_verify", "field": "x"}])
    with pytest.raises(ModalforgeError, match="timeout must be whole seconds"):
        load_rewards([{"reward": "math_verify", "timeout": 1.5}])
    assert load_rewards([{"reward": "math_verify", "timeout": None}])[0].kwargs["timeout"] is None


def test_runs_in_the_callers_thread_beside_threaded_rewards_and_scores_off_the_main_thread():
    """Math-Verify's timeouts are signal.alarm: main thread only. The scorer keeps it there; elsewhere it scores."""
    seen: dict[str, str] = {}

    def plain(prompts, completions, **_):
        seen["plain"] = threading.current_thread().name
        return [0.5] * len(completions)

    rewards = [*load_rewards(["math_verify"]), Reward("plain", plain), Reward("other", plain)]
    out = _call(rewards, ["2", "2"], ["\\boxed{2}", "7"])
    assert out.tolist() == [[1.0, 0.5, 0.5], [0.0, 0.5, 0.5]]
    assert seen["plain"].startswith("reward")
    result: dict[str, object] = {}
    worker = threading.Thread(target=lambda: result.update(out=_call(rewards[:1], ["2"], ["\\boxed{2}"])))
    worker.start()
    worker.join()
    assert result["out"].tolist() == [[1.0]]


def test_a_grpo_config_with_math_verify_validates_and_scores_a_batch(tmp_path):
    from modalforge.config import compose
    from modalforge.run import build_components
    from modalforge.testing import check_config_binds

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in [{"prompt": "Half of one?", "answer": "\\frac{1}{2}"},
                                                              {"prompt": "One plus one?", "answer": 2}]))
    cfg = compose(["plugin=grpo", "model=grpo/tiny_llama", "objective.rewards=[math_verify,format]",
                   f"data.train={prompts}", f"data.val={prompts}", "data.batch_size=2", "objective.num_generations=2"])
    assert not check_config_binds(cfg)
    dm, objective, _ = build_components(cfg)
    dm.setup()
    objective.connect(dm)
    batch = dm.collate([dm.train_set[i] for i in range(2)])
    texts = {"Half of one?": ["0.5", "one half is 0.25"], "One plus one?": ["The answer is \\boxed{2}.", "!!"]}
    rows = [t for p in batch["prompts"] for t in texts[p]]
    tokenizer = dm.processor
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in rows]
    width = max(map(len, ids))
    completion = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids])
    attention, _ = objective._stops(completion)
    per_reward, decoded = objective._score(batch, completion, attention, copies=2)
    assert decoded == rows
    assert per_reward[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0]


def test_without_the_extra_naming_it_is_one_line_saying_what_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_math_verify(name, *args, **kwargs):
        if name == "math_verify" or name.startswith("math_verify."):
            raise ModuleNotFoundError("No module named 'math_verify'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_math_verify)
    with pytest.raises(ModalforgeError) as err:
        load_rewards(["exact_match", "math_verify"])
    message = str(err.value)
    assert "\n" not in message and message == ("objective.rewards[1]: reward math_verify needs the math extra: "
                                               "pip install 'modalforge[math]'")
    assert load_rewards(["exact_match"])[0].name == "exact_match"  # the other built-ins do not need it
