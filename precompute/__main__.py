"""Command line: `python -m precompute COMMAND ...`; each command lives in its own module."""
import argparse
import difflib
import importlib
import os
import sys

from sae_core.command_line import OneLineParser
from sae_core.errors import UserError, not_utf8_argument, write_failure

# name -> (module, one-line help). A module defines `add_arguments(parser)` and `run(args) -> int`.
# Modules are imported only when their command runs, so `train` never pays for transformers.
COMMANDS = {
    "train": ("precompute.train", "Train a sparse autoencoder on stored activations."),
    "export": ("precompute.export", "Export a trained SAE to another library's layout."),
    "world": ("precompute.world", "Build the embedded world: synthetic images, a tiny CLIP and a tiny LLaVA."),
    "extract": ("precompute.extract", "Extract a vision encoder's activations to sharded stores (torchrun-ready)."),
    "ms": ("precompute.ms", "Monosemanticity Score of any neurons from activations and image embeddings (one pass)."),
    "ms-agreement": ("precompute.ms_agreement", "Alignment of MS with users' preferences over neuron pairs (pairs.csv)."),
    "atlas": ("precompute.atlas", "Build a bundle: per-neuron atlas (top images, MS, histograms), labels, hierarchy, index."),
    "inspect": ("precompute.inspect", "What a bundle (finished or not), an SAE, an activation store, a training run or a "
                                      "world holds (--json for machines)."),
    "demo": ("precompute.demo", "The whole pipeline on the embedded world in one command: world, extract, train, atlas."),
    "steer": ("precompute.steer", "Three answers about an image: original LLaVA, SAE inserted, SAE with latents clamped."),
    "steer-eval": ("precompute.steer_eval", "Steering figures of a world bundle: paper CLIP protocol and ground-truth success."),
    "ood": ("precompute.ood", "OOD detection from SAE features vs raw activations (AUROC, FPR@95, ROC plot)."),
    "ontology": ("precompute.ontology", "Tree agreement of SAE-latent and raw-neuron clusterings with the dataset's taxonomy."),
    "crossmodal": ("precompute.crossmodal", "SAE on the tiny LLaVA's language-model residuals (image + text tokens): cross-modal latents, bundle."),
    "probes": ("precompute.probes", "Linear probes of world factors from SAE codes vs raw activations, held-out combinations."),
}

DESCRIPTION = ("The offline jobs: extract activations, train an SAE, build a bundle (atlas) for the explorer "
               "(python -m app), steer, evaluate; `demo` runs the whole pipeline on the embedded world. "
               "`python -m precompute COMMAND --help` gives a command's options.")


def parser_for(argv: list[str]) -> argparse.ArgumentParser:
    """The parser of every command, with the arguments of the one `argv` names (its parser is `.command_parser`)."""
    parser = OneLineParser(prog="python -m precompute", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = argv[0] if argv and not argv[0].startswith("-") else None
    parser.command_parser = None
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # only the chosen command's module is imported
            importlib.import_module(module).add_arguments(p)
            parser.command_parser = p
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """`argv` (COMMAND and its arguments) parsed, keeping `argv` itself for `command_line` (precompute.args).
    What the command does not take is refused by the command's own parser, before a missing required option
    (`--embedings` said only that --embeddings was missing), with the nearest option of a misspelt one
    (argparse's top parser pointed to `python -m precompute --help`, which lists no option)."""
    parser = parser_for(argv)
    command = parser.command_parser
    if (bad := not_utf8_argument(argv)) is not None:
        (command or parser).error(bad)
    if command is not None:
        options = [o for a in command._actions for o in a.option_strings if o.startswith("--")]
        unknown = []
        for x in argv[1:]:
            if x == "--":  # what follows is positional
                break
            name = x.split("=", 1)[0]
            if x.startswith("--") and not any(o.startswith(name) for o in options):  # argparse takes prefixes
                unknown.append(x)
        if unknown:
            # compared without the dashes every option shares ("--quiet" was near "--out")
            bare = {o[2:]: o for o in options}
            near = [bare[m] for x in unknown
                    for m in difflib.get_close_matches(x.split("=", 1)[0][2:], list(bare), n=1, cutoff=0.6)]
            command.error(f"unrecognized arguments: {' '.join(unknown)}"
                          + (f" (did you mean {' or '.join(dict.fromkeys(near))}?)" if near else ""))
    args, extra = parser.parse_known_args(argv)
    if extra:
        (command or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = list(argv)
    return args


def out_of_memory_advice(args: argparse.Namespace) -> str:
    """What to do when `args.command` ran out of memory: the options of that command that need less, then
    freeing memory or a larger device (the end of one sentence)."""
    ways = []
    if (getattr(args, "batch_size", None) or 0) > 1:
        ways.append(f"a smaller --batch-size than {args.batch_size}"
                    + (" (a different run: give it a new --out)" if args.command == "train" else
                       " (the results do not depend on it)"))
    for option in ("memory_gib", "chunk"):  # the atlas's memory budget for a batch; ms's images per chunk
        value = getattr(args, option, None)
        if value and value > (0 if option == "memory_gib" else 1):
            ways.append(f"a smaller --{option.replace('_', '-')} than {value:g}")
    if args.command in ("steer", "steer-eval"):
        from sae_core.steering import lighter_precisions

        if lighter := lighter_precisions(args.precision):
            ways.append(f"--precision {lighter}")
    rest = "free some memory or use a larger device."
    return f"try {', '.join(ways)}; or {rest}" if ways else rest


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        rc = importlib.import_module(COMMANDS[args.command][0]).run(args) or 0
        sys.stdout.flush()  # here, so a reader that went away is caught below and not reported at exit
        return rc
    except BrokenPipeError:
        # stdout's reader stopped reading (`inspect B | head`): nothing is wrong and nothing more can be said;
        # stdout goes to /dev/null so that Python's own flush at exit does not print a second traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a tool killed by the signal
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        from sae_core.precision import out_of_memory

        said = out_of_memory(e)
        if said is None:
            raise
        print(f"error: {args.command} ran out of memory ({said}); {out_of_memory_advice(args)}", file=sys.stderr)
        return 2
    except PermissionError as e:  # reading or writing: `inspect` of a bundle it may not read was told to free its --out
        path = f" {e.filename}" if e.filename else ""
        print(f"error: permission denied on{path}; give this user access to it (read for an input, write for an "
              "--out), or use another path.", file=sys.stderr)
        return 2
    except (FileExistsError, IsADirectoryError, NotADirectoryError) as e:
        # the file system refused a path the user gave (--out names a file where a folder goes, or the reverse)
        path = f" {e.filename}" if e.filename else ""
        print(f"error: cannot write{path}: {e.strerror or e}; give an --out (or other path) that is free, or remove "
              "what is there.", file=sys.stderr)
        return 2
    except Exception as e:  # the storage refused a write (full, read-only, ...): a traceback until 2026-12-05
        said = write_failure(e)
        if said is None:
            raise
        path = f" {e.filename}" if getattr(e, "filename", None) else ""
        failing = "input/output" in said  # a read as much as a write
        fix = ("give an --out on a writable disk" if "read-only" in said else
               "raise the limit (ulimit -f unlimited)" if "size limit" in said else
               "check the disk (the kernel's log names it) or use another" if failing else
               "free some space (or give an --out on another disk)")
        print(f"error: {args.command} could not {'read or write' if failing else 'write'}{path}: {said}; {fix} and run "
              "the same command again: it goes on from its last finished stage or checkpoint.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: a traceback read as a crash, where the work done is kept
        print("\ninterrupted; the same command again resumes the long jobs (extract, train, ms, atlas, demo, "
              "steer-eval with --out, ...) from their finished stages and checkpoints.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
