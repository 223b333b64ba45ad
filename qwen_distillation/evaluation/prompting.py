"""One user turn -> the prompt text a model continues with its answer."""

from __future__ import annotations


def render_prompt(tokenizer, user_text: str, chat_template_kwargs: dict | None = None) -> str:
    """The chat prompt for one user turn, ending where the assistant's reply begins.

    Uses the tokenizer's chat template with ``add_generation_prompt=True`` (extra template
    variables, e.g. ``{"enable_thinking": False}`` for Qwen3, go in ``chat_template_kwargs``).
    Tokenizers without a template get the plain ``"User: ...\\n\\nAssistant: "`` form that
    ``qwen_distillation.data.encode`` trains with. Tokenise the result with
    ``add_special_tokens=False``: templates write their own special tokens.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True,
            **(chat_template_kwargs or {}))
    return f"User: {user_text}\n\nAssistant: "


def model_device(model):
    """The device of the model's first parameter (where its inputs go)."""
    return next(model.parameters()).device
