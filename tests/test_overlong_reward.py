"""The ``overlong`` built-in (DAPO's soft overlong punishment) by hand, and rewards scored concurrently in order."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from modalforge.errors import ModalforgeError
from modalforge.rl.overlong import overlong
from modalforge.rl.rewards import Reward, load_rewards, score


def test_formula_by_hand_at_each_boundary():
    # L_max = 10, L_cache = 4: no penalty up to 6 tokens, linear to -1 at 10, -1 beyond
    lengths = [0, 5, 6, 7, 8, 9, 10, 11, 30]
    ids = [[1] * n for n in lengths]
    got = overlong([""] * len(ids), [""] * len(ids), completion_ids=ids, max_length=10, cache=4)
    assert got == pytest.approx([0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0])
    # L_cache = L_max: the penalty starts at the first token
    assert overlong([""] * 3, [""] * 3, completion_ids=[[], [1], [1, 1]], max_length=2, cache=2) == [0.0, -0.5, -1.0]
    with pytest.raises(ModalforgeError, match="needs 'completion_ids'"):
        overlong(["p"], ["c"], max_length=10, cache=4)


def test_loaded_by_name_with_options_checked():
    rewards = load_rewards([{"reward": "overlong", "max_length": 10, "cache": 4}])
    assert rewards[0].name == "overlong" and rewards[0].kwargs == {"max_length": 10, "cache": 4}
    per = score(rewards, ["p"] * 3, ["a", "b", "c"], {"completion_ids": [[1] * 6, [1] * 8, [1] * 12]},
                ["f, line 1"] * 3)
    torch.testing.assert_close(per, torch.tensor([[0.0], [-0.5], [-1.0]]))
    # max_length defaults to the objective's max_completion_length when the caller gives it
    assert load_rewards([{"reward": "overlong", "cache": 2}], max_completion_length=8)[0].kwargs == \
        {"max_length": 8, "cache": 2}
    with pytest.raises(ModalforgeError, match=r"objective.rewards\[0\]: reward overlong needs max_length"):
        load_rewards([{"reward": "overlong", "cache": 2}])
    with pytest.raises(ModalforgeError, match="needs cache"):
        load_rewards([{"reward": "overlong", "max_length": 8}])
    with pytest.raises(ModalforgeError, match="0 < cache <= max_length"):
        load_rewards([{"reward": "overlong", "max_length": 8, "cache": 9}])
    with pytest.raises(ModalforgeError, match=r"unknown option\(s\) \['l_cache'\].*valid: max_length, cache"):
        load_rewards([{"reward": "overlong", "max_length": 8, "l_cache": 2}])


def test_rewards_are_scored_concurrently_in_column_order():
    lock, state = threading.Lock(), {"now": 0, "max": 0}

    def slow(value, pause):
        def fn(prompts, completions, **_):
            with lock:
                state["now"] += 1
                state["max"] = max(state["max"], state["now"])
            time.sleep(pause)
            with lock:
                state["now"] -= 1
            return [value] * len(completions)
        return fn

    # the first reward is the slower: finishing order is the reverse of the column order
    rewards = [Reward("a", slow(1.0, 0.3)), Reward("b", slow(2.0, 0.1)), Reward("c", slow(3.0, 0.0))]
    per = score(rewards, ["p", "p"], ["x", "y"], {}, ["f, line 1", "f, line 2"])
    torch.testing.assert_close(per, torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]))
    assert state["max"] > 1
    # errors keep the column order too: the first failing column is reported, even if it failed last
    rewards = [Reward("a", slow([1.0], 0.3)), Reward("b", lambda prompts, completions, **_: 1 / 0)]
    with pytest.raises(ModalforgeError, match=r"reward 'a' returned \[1.0\]"):
        score(rewards, ["p"], ["x"], {}, ["f, line 1"])


def test_max_length_defaults_to_the_objectives_max_completion_length():
    from hydra.utils import instantiate

    from modalforge.testing import compose_plugin

    for plugin in ("grpo", "ppo"):
        cfg = compose_plugin(plugin, ["objective.rewards=[exact_match,{reward: overlong, cache: 2}]",
                                      "objective.max_completion_length=6"])
        objective = instantiate(cfg.objective, _convert_="all")
        assert {r.name: r.kwargs for r in objective.rewards}["overlong"] == {"max_length": 6, "cache": 2}


def test_reward_models_are_scored_in_the_callers_thread_and_functions_in_threads():
    """A reward model's forward may all-gather (FSDP2): collectives from two threads could pair up wrongly."""
    import threading

    from torch import nn

    from modalforge.rl.rewards import Reward, score

    seen: dict[str, str] = {}

    class Scorer(nn.Module):
        def forward(self, prompts, completions, **_):
            seen["model"] = threading.current_thread().name
            return [1.0] * len(completions)

    def plain(prompts, completions, **_):
        seen[f"fn{len(seen)}"] = threading.current_thread().name
        return [0.5] * len(completions)

    rewards = [Reward("a", plain), Reward("m", Scorer()), Reward("b", plain)]
    out = score(rewards, ["p", "q"], ["x", "y"], {}, ["f:1", "f:2"])
    assert out.tolist() == [[0.5, 1.0, 0.5], [0.5, 1.0, 0.5]]
    assert seen["model"] == threading.current_thread().name
    assert all(v.startswith("reward") for k, v in seen.items() if k != "model")
