"""Griffe extension for the docs build: show Sphinx roles in docstrings as inline code.

The docstrings follow the numpy convention, whose cross-references are Sphinx roles
(``:func:`open_run```, ``:class:`~source_callback.AnalysisResult```). mkdocstrings renders
Markdown, where a role would appear literally; this extension rewrites each role to inline code
of the name it shows in Sphinx (the last component after ``~``). Only the docs build loads it
(``mkdocs.yml``); the docstrings themselves are unchanged.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|meth|class|data|attr|mod|obj|exc|const):`(~?)([^`]+)`")


def _inline_code(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def replace_roles(text: str) -> str:
    """``text`` with every Sphinx cross-reference role replaced by inline code."""
    return ROLE.sub(_inline_code, text)


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every loaded object's docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite ``obj``'s docstring, if it has one."""
        if obj.docstring is not None:
            obj.docstring.value = replace_roles(obj.docstring.value)
