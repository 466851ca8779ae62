"""``modalforge.rl``: the public online-RL API that RL plugins (built-in or third-party) build on.

- :class:`~modalforge.rl.objective.RolloutObjective`: sampling inside the step (the policy's
  ``generate`` or a ``rollout_func``), stop tokens, rewards, the reference policy
  (``auto|copy|adapter|none``), old / reference log-probs, and the checkpointed rollout buffer
  with exact resume; a paradigm writes its ``_new_rollout`` (rewards to advantages) and ``_loss``;
- :class:`~modalforge.rl.rollout.Rollout`: one rollout, as the buffer keeps it;
- :class:`~modalforge.rl.environment.Environment` / :class:`~modalforge.rl.environment.ToolEnvironment`: multi-turn
  episodes (``objective.environment``; rolled out by :mod:`~modalforge.rl.episodes`; shipped ones in ``envs/``);
- :mod:`~modalforge.rl.rewards`: reward functions, files, ``reward_model:/path``, and their scoring;
- :mod:`~modalforge.rl.prompts`: prompt data yielded ``repeat`` times per rollout
  (:class:`~modalforge.rl.prompts.PromptDataModule`), and the arithmetic demo prompts;
- :mod:`~modalforge.rl.warmstart`: the offline default policy (a tiny Llama taught the demo task).
"""

from modalforge.rl.environment import Environment, ToolEnvironment, parse_tool_calls
from modalforge.rl.objective import RolloutObjective
from modalforge.rl.rollout import Rollout

__all__ = ["Environment", "Rollout", "RolloutObjective", "ToolEnvironment", "parse_tool_calls"]
