"""`--help` that shows defaults where they say something: shared by the command lines.

argparse's ArgumentDefaultsHelpFormatter appends "(default: None)" to flags whose default means
"not set" and "(default: False)" to switches, and repeats defaults that the help already states.
This formatter appends ` (default: X)` only when X is a real value the help does not mention.
"""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.HelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text.lower() or not action.option_strings or action.nargs == 0:
            return text  # already said, a positional, or a switch (store_true / store_const)
        if default is None or default is argparse.SUPPRESS or isinstance(default, bool) or default == []:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"
