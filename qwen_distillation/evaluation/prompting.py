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
    return render_messages(tokenizer, [{"role": "user", "content": user_text}], chat_template_kwargs)


def render_messages(tokenizer, messages: list[dict], chat_template_kwargs: dict | None = None) -> str:
    """:func:`render_prompt` for a whole conversation (optional system turn, earlier
    user/assistant turns, the last user turn): the prompt of the next assistant turn. Without a
    template, turns are ``"System: "``, ``"User: "``, ``"Assistant: "`` blocks joined by a blank
    line, as ``qwen_distillation.data.encode`` renders them."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             **(chat_template_kwargs or {}))
    headers = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}
    eos = {"assistant": tokenizer.eos_token or ""}  # encode closes an assistant turn with eos
    return "".join(f"{headers[m['role']]}{m['content']}{eos.get(m['role'], '')}\n\n" for m in messages) + "Assistant: "


def model_device(model):
    """The device of the model's first parameter (where its inputs go)."""
    return next(model.parameters()).device
