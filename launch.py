"""Entry point: read flags, load the experiment config, call train_and_evaluate.

    python launch.py                                   # the main job: experiments/lenet5_digits.py
    python launch.py --config experiments/NAME.py[:ARG] [--config.FIELD=VALUE ...] [--workdir DIR]
    python launch.py --config experiments/NAME.py --sweep   # run config.sweep (see README, Sweeps)
    python launch.py ... --coordinator_address HOST:PORT --num_processes N --process_id I

Running the same command again in the same workdir resumes from its latest checkpoint.
Set CNNJAX_TRACEBACK=1 to see the traceback behind a one-line error, CNNJAX_COMPILATION_CACHE=off
(or a directory) for the persistent XLA compilation cache (default ~/.cache/cnnjax/jax).
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
    """Splits argv into the launcher's flags and the (field, value) config overrides."""
    overrides, rest = [], []
    args = iter(argv)
    for arg in args:
        if arg.startswith("--config."):
            field, eq, value = arg[len("--config.") :].partition("=")
            if not eq:
                value = next(args, None)
                if value is None:
                    raise SystemExit(
                        f"error: --config.{field} needs a value (--config.{field}=VALUE)"
                    )
            overrides.append((field, value))
        else:
            rest.append(arg)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument(
        "--config",
        default="experiments/lenet5_digits.py",
        help="experiments/NAME.py[:ARG]; --config.FIELD=VALUE overrides any field",
    )
    parser.add_argument(
        "--workdir",
        default="",
        help="run directory (default: <workdir_root>/NAME[_ARG]); resumes if present",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="run the config's sweep (default workdir <workdir_root>/NAME[_ARG]_sweep)",
    )
    parser.add_argument("--coordinator_address", default="", help="HOST:PORT of process 0")
    parser.add_argument("--num_processes", type=int, default=0)
    parser.add_argument("--process_id", type=int, default=-1)
    return parser.parse_args(rest), overrides


def main(argv: list[str]) -> int:
    flags, overrides = parse_args(argv)
    # Imported after flag parsing so --help is instant; JAX must not start before initialize().
    from cnnjax import config as config_lib
    from cnnjax import distributed
    from cnnjax.compile_cache import enable_compilation_cache
    from cnnjax.train.loop import NonFiniteLossError, train_and_evaluate

    try:
        distributed.initialize(flags.coordinator_address, flags.num_processes, flags.process_id)
        enable_compilation_cache()  # a rerun or resume of the same config skips XLA compilation
        config, name = config_lib.load_config(flags.config, overrides)
        if flags.sweep:
            from cnnjax.sweep import run_sweep

            workdir = flags.workdir or os.path.join(config.workdir_root, f"{name}_sweep")
            summary = run_sweep(config, workdir)
            print(f"sweep {summary['status']}: best {summary['best']}; report {workdir}/report.md")
        else:
            train_and_evaluate(config, flags.workdir or os.path.join(config.workdir_root, name))
    except (ValueError, NonFiniteLossError) as error:
        if os.environ.get("CNNJAX_TRACEBACK"):
            raise
        lines = str(error).strip().splitlines() or [type(error).__name__]
        more = " (set CNNJAX_TRACEBACK=1 for details)" if len(lines) > 1 else ""
        print(f"error: {lines[0]}{more}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
