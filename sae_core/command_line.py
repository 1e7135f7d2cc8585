"""argparse as every command line here uses it (precompute, app, benchmarks): refusals in one line, defaults in --help."""
import argparse


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

    def error(self, message):
        self.exit(2, f"error: {message} (`{self.prog} --help` lists the options).\n")
