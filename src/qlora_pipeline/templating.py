"""Plain-text and Markdown files rendered from ``templates/`` (Jinja2): the compare report, GGUF's Modelfile and README.

HTML pages have their own autoescaping environments (human_eval/sheet.py, the chat page's static files).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def text_templates() -> Any:
    import jinja2

    # Not HTML: nothing to autoescape, but a '|' in a value would split a Markdown table cell.
    env = jinja2.Environment(loader=jinja2.PackageLoader("qlora_pipeline", "templates"), autoescape=False,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    env.filters["cell"] = lambda text: str(text).replace("|", "\\|")
    return env


def render(name: str, **values: Any) -> str:
    return text_templates().get_template(name).render(**values)
