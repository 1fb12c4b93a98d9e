"""Chat templates (Jinja) that turn the prompt side of a trace into text; the response is never templated."""

from __future__ import annotations

from functools import lru_cache

from dcd_megatron.errors import UserError

BUILTIN_TEMPLATE_SOURCES: dict[str, str] = {
    # The message contents, one per line: for traces whose prompts are already formatted.
    "plain": "{% for m in messages %}{{ m.content }}{% if not loop.last %}\n{% endif %}{% endfor %}",
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama3": (
        "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>"
        "\n\n{{ m.content | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
}


class TemplateError(UserError, ValueError):
    """A chat template failed to compile or render."""


@lru_cache(maxsize=16)
def _compile(source: str):
    from jinja2 import StrictUndefined, TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        keep_trailing_newline=True, undefined=StrictUndefined, autoescape=False
    )
    try:
        return env.from_string(source)
    except TemplateSyntaxError as exc:
        raise TemplateError(f"data.chat_template does not compile: {exc}") from None


def render_prompt(
    source: str,
    messages: list[dict[str, str]],
    *,
    bos_token: str = "",
    eos_token: str = "",
) -> str:
    """Render the prompt messages with ``add_generation_prompt=True`` (the assistant turn opens)."""
    template = _compile(source)
    try:
        return template.render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except Exception as exc:  # jinja raises many types from user templates
        raise TemplateError(f"chat template failed to render: {type(exc).__name__}: {exc}") from None


def check_template(source: str) -> None:
    """Compile the template, so a syntax error fails at config time (rendering is per row)."""
    _compile(source)
