"""Extend an LLM's own chat template so that `{"type": "image"}` content parts render the image placeholder.

The LLM's template is kept verbatim. A short prelude rewrites only messages whose `content` is a list of parts into
the plain string the LLM template expects (text parts joined, each image part → the image token, each video part →
the video token). Messages with string content are passed through untouched, so a text-only conversation renders
byte-identical to the LLM's template, and system prompts, tools, tool calls and the thinking switch keep working.
"""

from __future__ import annotations

PRELUDE_MARK = "{#- vlmgraft: image parts -> placeholders #}"

_PRELUDE = """{#- vlmgraft: image parts -> placeholders #}
{%- set _vg = namespace(messages=[]) %}
{%- for _m in messages %}
{%- if _m.content is string or _m.content is none or _m.content is not defined %}
{%- set _vg.messages = _vg.messages + [_m] %}
{%- else %}
{%- set _vg_text = namespace(value='') %}
{%- for _part in _m.content %}
{%- if _part.type == 'image' or _part.type == 'image_url' %}{%- set _vg_text.value = _vg_text.value + IMAGE %}
{%- elif _part.type == 'video' %}{%- set _vg_text.value = _vg_text.value + VIDEO %}
{%- elif _part.type == 'text' %}{%- set _vg_text.value = _vg_text.value + _part.text %}
{%- endif %}
{%- endfor %}
{%- set _vg.messages = _vg.messages + [dict(_m, content=_vg_text.value)] %}
{%- endif %}
{%- endfor %}
{%- set messages = _vg.messages %}
"""


def extend_chat_template(template: str, image_token: str, video_token: str) -> str:
    if PRELUDE_MARK in template:
        return template
    prelude = _PRELUDE.replace("IMAGE", repr(image_token)).replace("VIDEO", repr(video_token))
    return prelude + template
