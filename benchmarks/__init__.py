"""Speed and memory benchmarks; each prints a table with ratios against a baseline from the same run."""


def argument_parser(name: str, **kwargs):
    """The parser of `python -m benchmarks NAME`: a refused option is one line, as for precompute's commands
    (argparse printed its usage block first); --help keeps the usage, with the defaults."""
    from sae_core.command_line import OneLineParser

    return OneLineParser(prog=f"python -m benchmarks {name}", **kwargs)


def precisions_to_run(asked: str | None, device: str) -> list[str]:
    """The precisions a benchmark times: `asked` (comma-separated) as given, else fp32 and bf16, without
    bf16 (and saying why) where the device emulates it (sae_core.precision.slow_half_reason)."""
    import sys

    import torch

    from sae_core.precision import slow_half_reason

    if asked:
        return asked.split(",")
    slow = slow_half_reason(device, torch.bfloat16)
    if slow:
        print(f"skipping the bf16 rows: {slow}; `--precisions fp32,bf16` runs them anyway.", file=sys.stderr)
    return ["fp32"] if slow else ["fp32", "bf16"]
