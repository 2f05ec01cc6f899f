"""What every entry point shares on the command line: bad input ends in one line that says what to do.

- `ArgumentParser`: argparse's, but an error is one line (`prog: error: ...`, exit code 2) instead of
  the whole usage text followed by the error, and `--help` shows every option's default exactly once
  (`HelpFormatter`).
- `number(...)`: an argparse `type` that range-checks a flag while parsing, so a bad value fails
  before anything is loaded or built (`--device-batch-size 0` used to die in a ZeroDivisionError).
- `run_main(main, prog, errors)`: main(), with the project's own bad-input errors (DataError,
  BundleError, CheckpointError, TokenizerError, ...: each entry point names the ones it can meet)
  turned into `prog: message` on one line and exit code 1. Anything else is a bug and keeps its
  traceback.

The only module of the package about the command line; it parses nothing itself.
"""

import argparse
import math
import sys


def one_line(message):
    return " ".join(str(message).split())


DEFAULT_MARK = "(default"


def shown_default(value):
    """A default as the user could type it: lists and tuples comma-separated (the way their flags take them),
    large integers grouped with '_' (2_000_000_000, which int() parses)."""
    if isinstance(value, (list, tuple)):
        return ",".join(shown_default(v) for v in value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 100_000:
        return f"{value:_}"
    return str(value)


class HelpFormatter(argparse.HelpFormatter):
    """Every option that takes a value shows its default once: argparse's value, unless the help text already
    says "(default: ...)" in words (a default like '' or None means "derive it", and only words can say how).

    Flags (store_true, ...), required options and positionals show none. An empty or None default
    (or an empty list) without words shows none either: tests/test_entry_points.py reads every --help
    and names the option."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (DEFAULT_MARK in text or action.required or action.nargs == 0 or not action.option_strings
                or action.default is None or action.default is argparse.SUPPRESS or shown_default(action.default) == ""):
            return text
        return f"{text} (default: {shown_default(action.default).replace('%', '%%')})"


class RawDescriptionHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """HelpFormatter with the description and epilog kept as written (a module docstring with its examples)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage text would bury the line that says what is wrong) and one help style.

    The formatter is always this module's: a formatter_class of argparse's only says whether the
    description keeps its line breaks (RawDescriptionHelpFormatter) or is re-wrapped. argparse's
    ArgumentDefaultsHelpFormatter appended a second "(default: )" to help texts that name their default."""

    def __init__(self, *args, formatter_class=None, **kwargs):
        raw = formatter_class is not None and issubclass(formatter_class, argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, formatter_class=RawDescriptionHelpFormatter if raw else HelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (--help lists every flag)\n")


def number(kind=int, low=None, high=None, also=()):
    """An argparse type: kind(text) within [low, high] (None: unbounded), or one of the sentinel values `also`
    (such as -1 for 'derive it'). Floats must be finite. The error says what the flag accepts."""
    noun = "an integer" if kind is int else "a number"
    if low is not None and high is not None:
        accepted = f"{noun} in [{low}, {high}]"
    elif low is not None:
        accepted = f"{noun} >= {low}"
    elif high is not None:
        accepted = f"{noun} <= {high}"
    else:
        accepted = f"a finite {noun.split()[-1]}"
    accepted += "".join(f" or {v}" for v in also)

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}; expected {accepted}") from None
        if value in also:
            return value
        if ((kind is float and not math.isfinite(value)) or (low is not None and value < low)
                or (high is not None and value > high)):
            raise argparse.ArgumentTypeError(f"got {text}, expected {accepted}")
        return value
    return parse


def run_main(main, prog, errors):
    """main()'s return value; an exception of the types in `errors` (bad input whose message says what to
    do) exits with `prog: message` on one line and code 1. Other exceptions propagate with their traceback."""
    try:
        return main()
    except errors as e:
        print(f"{prog}: {one_line(e)}", file=sys.stderr)
        raise SystemExit(1) from None
