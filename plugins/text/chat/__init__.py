"""Shared conversation handling of the text alignment plugins (sft, dpo, reward_model).

Not a plugin: record formats, chat templates, tokenisation with an assistant-token
mask, and packing. It uses only the public core API.
"""
