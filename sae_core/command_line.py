"""argparse as every command line here uses it (precompute, app, benchmarks): refusals in one line, defaults in --help."""
import argparse
import re
import sys


NEGATIVE_NUMBER_LIST = re.compile(r"^-\.?\d[\w.+\-]*(,[\w.+\-]*)+$")  # "-5,3", "-0.5,2e-3,inf"; "-5" argparse reads


class HelpWithDefaults(argparse.HelpFormatter):
    """--help gives each option's default, where its help does not already say it (42 options did not)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default is argparse.SUPPRESS or default in ("", [])
        if action.option_strings and not unset and "default" not in text.lower():
            text += " (default: %(default)s)"
        return text


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors in one line, as every other refusal here, instead of the usage block first
    (9-12 lines for most commands); --help still prints the usage and, unless another formatter_class is
    given, every default. Subcommands inherit the class."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpWithDefaults)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        # argparse takes "-5,3" for an option (only a lone negative number passes as a value): `steer --value -5,3`
        # was refused until 2026-12-05, and learned deltas usually start negative; glued to its option it is a value
        args, glued = list(sys.argv[1:] if args is None else args), []
        for a in args:
            action = self._option_named(glued[-1]) if glued else None
            if action is not None and action.nargs is None and NEGATIVE_NUMBER_LIST.match(a):
                glued[-1] = f"{glued[-1]}={a}"
            else:
                glued.append(a)
        return super().parse_known_args(glued, namespace)

    def _option_named(self, word: str):
        """The action of option `word`, spelt whole or, as argparse takes it, as an unambiguous prefix; else None."""
        if word in self._option_string_actions:
            return self._option_string_actions[word]
        if not word.startswith("--") or "=" in word:
            return None
        found = {a for o, a in self._option_string_actions.items() if o.startswith(word)}
        return found.pop() if len(found) == 1 else None

    def error(self, message):
        self.exit(2, f"error: {message} (`{self.prog} --help` lists the options).\n")
