"""`dcd-train`: train a student with the distribution-corrected loss.

    dcd-train [--recipe NAME | --config FILE.yaml] [key=value ...]

Runs as one process, or under torchrun / srun at any layout (`tp=2 pp=2`, the rest of the
world is data parallel). `--print-config` shows the resolved config and exits.
`dcd-train --sync-tracking OUTPUT_DIR [tracking.tracking_uri=URI]` sends a finished or crashed
run's missing steps (from its metrics.jsonl) and its real status to MLflow (docs/tracking.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys

import yaml


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from dcd_megatron.recipes import RECIPES

    parser = argparse.ArgumentParser(
        prog="dcd-train",
        description="Distil teacher traces into a student with the DCD loss on megatron-core.",
        epilog="Overrides are dotted key=value pairs, e.g. train.steps=200 loss.tau=0.5 tp=2 pp=2. "
        "Short keys: tp, pp, cp, steps, lr, method, output_dir, seed.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--recipe", choices=sorted(RECIPES), help="start from a named recipe")
    source.add_argument("--config", help="start from a YAML config file")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--verbose", action="store_true",
                        help="show megatron-core's own start-up warnings (missing Transformer Engine / Apex)")
    parser.add_argument("--sync-tracking", metavar="OUTPUT_DIR",
                        help="send the steps MLflow missed (from OUTPUT_DIR/metrics.jsonl) and the run's real "
                        "status to its MLflow run, then exit; the only override it takes is tracking.tracking_uri=URI")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    return parser.parse_args(argv)


def sync_tracking(output_dir: str, overrides: list[str]) -> int:
    """`--sync-tracking`: bring the MLflow run of a finished or crashed run up to date; the exit code."""
    from pathlib import Path

    from dcd_megatron.cli.errors import report_user_error
    from dcd_megatron.errors import UserError
    from dcd_megatron.runtime.output_lock import acquire
    from dcd_megatron.tracking.sync import sync_run

    uri = None
    for item in overrides:
        key, sep, value = item.partition("=")
        if key != "tracking.tracking_uri" or not sep or not value:
            print(f"dcd-train: error: --sync-tracking takes only tracking.tracking_uri=URI, got {item!r}", file=sys.stderr)
            return 2
        uri = value
    if not Path(output_dir).is_dir():
        print(f"dcd-train: error: --sync-tracking {output_dir}: not a directory; pass a run's train.output_dir",
              file=sys.stderr)
        return 2
    try:
        with acquire(output_dir, setting="--sync-tracking"):  # a live run there still logs for itself
            result = sync_run(output_dir, tracking_uri=uri)
    except UserError as exc:  # SyncError, OutputDirError
        return report_user_error("dcd-train", exc)
    print(f"synced {result.line()}")
    return 0


def resolve_config(args: argparse.Namespace):
    """The TrainConfig from a recipe, a YAML file or the defaults, with overrides applied."""
    from dcd_megatron.configs import apply_overrides, load_config
    from dcd_megatron.recipes import RECIPES
    from dcd_megatron.configs.train import ALIASES, TrainConfig

    if args.recipe:
        return apply_overrides(RECIPES[args.recipe](), args.overrides, aliases=ALIASES)
    return load_config(TrainConfig, args.config, args.overrides, aliases=ALIASES)


def main(argv: list[str] | None = None) -> int:
    from dcd_megatron.tracking.redact import redacted_console

    with redacted_console():  # no secret (env values, URI passwords) reaches the console in clear
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    from dcd_megatron.cli.errors import report_user_error, user_error_types
    from dcd_megatron.runtime.quiet import quiet_megatron_warnings

    args = parse_args(argv)
    if args.sync_tracking:
        return sync_tracking(args.sync_tracking, args.overrides)
    if not args.print_config:
        quiet_megatron_warnings(args.verbose, prog="dcd-train")
    try:
        cfg = resolve_config(args)
    except user_error_types() as exc:
        return report_user_error("dcd-train", exc)
    code = run_config(cfg, print_config=args.print_config)
    # Everything is written and closed by now: freeze the heap so interpreter shutdown does not
    # walk it (about 3 s with torch, megatron-core and mlflow loaded, on every rank).
    gc.freeze()
    return code


def run_config(cfg, print_config: bool = False) -> int:
    """Train with a resolved TrainConfig on this rank; the exit code (2: a user error, printed).

    `dcd-train` and the NeMo-Run entrypoint (`dcd_megatron.launch.nemo.train`) both end here.
    """
    from dcd_megatron.cli.errors import report_user_error, user_error_types
    from dcd_megatron.configs import to_dict

    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    config_text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if print_config:
        print(config_text)
        return 0

    from dcd_megatron.runtime import distributed
    from dcd_megatron.train.loop import train

    previous = _stop_setup_on_signals()
    try:
        result = train(cfg, config_text=config_text)
    except user_error_types() as exc:
        return report_user_error("dcd-train", exc, rank)
    except KeyboardInterrupt as exc:  # Ctrl-C anywhere, or SIGTERM / SIGUSR1 before the steps began
        name = str(exc) or "SIGINT"
        print(f"dcd-train: stopped by {name} (rank {rank}); the output directory's lock is released and "
              "unfinished token caches are removed; rerun the same command to go on (from the last checkpoint, "
              "if any)", file=sys.stderr)
        return 128 + getattr(signal.Signals, name, signal.SIGINT).value
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        distributed.shutdown()
    if rank == 0:
        scalars = {k: round(v, 6) for k, v in result.metrics.items() if isinstance(v, float)}
        print("final metrics: " + json.dumps(scalars, sort_keys=True))
        print(f"checkpoint: {result.checkpoint}")
        print(f"MLflow: {result.run_description}")
    return 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _stop_setup_on_signals() -> dict:
    """Until the training steps take SIGTERM / SIGUSR1 over (a checkpoint, then a clean stop), they stop the
    setup as Ctrl-C does: cleaned up (lock, temporary caches), one line. The handlers replaced."""
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        try:
            previous[sig] = signal.signal(sig, _raise_interrupt)
        except ValueError:  # not the main thread (an embedding caller): leave signals alone
            pass
    return previous


if __name__ == "__main__":
    sys.exit(main())
