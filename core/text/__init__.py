"""``modalforge.text``: the public text API that text plugins (built-in or third-party) build on.

One place for what several paradigms share, so that no plugin imports another:

- record formats and published dataset layouts: :mod:`.formats`, :mod:`.mapping`
  (``data.columns`` / ``data.roles``), :mod:`.oasst`, :mod:`.preferences` (UltraFeedback,
  HH-RLHF, SHP, ranked lists);
- chat templates rendered exactly, with the assistant spans to learn: :mod:`.templates`,
  :mod:`.spans`, :mod:`.tokenizer` (a tokenizer trained offline for the demos);
- tokenisation with an assistant-token mask and packing: :mod:`.tokenize`, :mod:`.packing`;
- generation that stops at the end of a turn: :mod:`.generate`, :mod:`.stops`;
- the causal-LM builder and its transformer block classes (FSDP units, activation
  checkpointing): :mod:`.models`;
- preference pairs / KTO completions as a DataModule: :mod:`.preference_data`;
- the offline demo data (arithmetic conversations and preference sets): :mod:`.synthetic`.

It uses only the rest of the public core API.
"""
