"""Command line: `python -m cnnjax.sweep --config experiments/X.py[:ARG] [--config.F=V ...] [--workdir D]`.

Runs the config's `sweep` (printing the cost sheet first) and writes WORKDIR/report.md. Running the
same command again resumes: finished trials are skipped, an unfinished one resumes from its checkpoint.
`--costs_only` prints and saves the cost sheet without training; `--max_runs N` stops after N runs.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str]) -> int:
    overrides, rest = [], []
    args = iter(argv)
    for arg in args:
        if arg.startswith("--config."):
            field, eq, value = arg[len("--config."):].partition("=")
            overrides.append((field, value if eq else next(args, "")))
        else:
            rest.append(arg)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--config", required=True, help="experiments/NAME.py[:ARG] with a config.sweep")
    parser.add_argument("--workdir", default="", help="sweep directory (default <workdir_root>/NAME[_ARG]_sweep)")
    parser.add_argument("--costs_only", action="store_true", help="print the cost sheet and stop")
    parser.add_argument("--max_runs", type=int, default=None, help="stop after this many training runs")
    flags = parser.parse_args(rest)

    from cnnjax import config as config_lib
    from cnnjax.sweep import costs, runner, space

    try:
        config, name = config_lib.load_config(flags.config, overrides)
        workdir = flags.workdir or os.path.join(config.workdir_root, f"{name}_sweep")
        if flags.costs_only:
            if "sweep" not in config:
                raise ValueError(f"{flags.config} has no config.sweep; add one (cnnjax.sweep.sweep_config)")
            params = space.parse_space(config.sweep.params)
            variants = space.planned_variants(config.sweep, params)
            print(costs.write(costs.cost_sheet(config, variants), workdir))
            return 0
        summary = runner.run_sweep(config, workdir, max_runs=flags.max_runs)
    except ValueError as error:
        if os.environ.get("CNNJAX_TRACEBACK"):
            raise
        print(f"error: {str(error).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"sweep {summary['status']}: best {summary['best']}; report {os.path.join(workdir, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
