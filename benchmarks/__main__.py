"""`python -m benchmarks NAME [args]`: run one benchmark and print its table."""
import importlib
import sys

# name -> module defining `main(argv) -> int`
BENCHMARKS = {
    "store_read": "benchmarks.store_read",
    "extract": "benchmarks.extract",
    "sae_train": "benchmarks.sae_train",
    "saelens_export": "benchmarks.saelens_export",
    "dictionary_learning_import": "benchmarks.dictionary_learning_import",
    "ms": "benchmarks.ms",
    "app_load": "benchmarks.app_load",
    "steer": "benchmarks.steer",
    "coact": "benchmarks.coact",
    "bands": "benchmarks.bands",
}


def main() -> int:
    if sys.argv[1:2] in (["-h"], ["--help"]):  # was "there is no benchmark '--help'", exit 2
        print(f"{__doc__}\nNAME is one of {', '.join(BENCHMARKS)}; `python -m benchmarks NAME --help` gives its "
              "options, README.md (Benchmarks) what each measures.")
        return 0
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        import difflib

        asked = sys.argv[1] if len(sys.argv) > 1 else None
        near = difflib.get_close_matches(asked or "", list(BENCHMARKS), n=1)
        said = "no benchmark was named" if asked is None else f"there is no benchmark {asked!r}"
        print(f"error: {said}{f' (did you mean {near[0]}?)' if near else ''}; run `python -m benchmarks NAME "
              f"[options]` with NAME one of {', '.join(BENCHMARKS)}.", file=sys.stderr)
        return 2
    from sae_core.errors import UserError

    try:
        return importlib.import_module(BENCHMARKS[sys.argv[1]]).main(sys.argv[2:]) or 0
    except UserError as e:  # one sentence, as the other commands say it
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
