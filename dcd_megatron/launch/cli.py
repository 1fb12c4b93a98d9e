"""`python -m dcd_recipes.run`: run a recipe on an executor through NeMo-Run.

    python -m dcd_recipes.run RECIPE [key=value ...] [--executor local|slurm|docker] [options] [--dryrun]

Overrides are dcd-train's (`train.steps=20`, `tp=2`, ...), checked before anything is launched.
`--dryrun` prints what would be submitted (the sbatch script, the container spec, the torchrun
command) and exits without running anything.
"""

from __future__ import annotations

import argparse
import os
import sys

PROG = "python -m dcd_recipes.run"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from dcd_megatron.launch import EXECUTORS
    from dcd_megatron.recipes import RECIPES

    p = argparse.ArgumentParser(
        prog=PROG,
        description="Run a dcd-train recipe through NeMo-Run on this machine (torchrun), Slurm (pyxis) or Docker.",
        epilog="Examples: %(prog)s tiny_cpu --nproc 2 train.steps=20 | "
        "%(prog)s qwen25_1p5b_h100_bf16 --executor slurm --account ACC --partition PART --dryrun",
    )
    p.add_argument("recipe", choices=sorted(RECIPES), metavar="RECIPE",
                   help=f"one of: {', '.join(sorted(RECIPES))}")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dcd-train overrides, e.g. train.steps=20 tp=2")
    p.add_argument("--executor", default="local", choices=EXECUTORS, help="where to run (default: local)")
    p.add_argument("--name", default=None, help="experiment/job name (default: the recipe name)")
    p.add_argument("--dryrun", action="store_true", help="print what would be submitted and exit")
    p.add_argument("--detach", action="store_true", help="submit and return without waiting (Slurm, Docker)")
    p.add_argument("--nproc", type=int, default=1, help="local/docker: torchrun ranks (default 1)")
    slurm = p.add_argument_group("slurm")
    slurm.add_argument("--account", default=os.environ.get("SBATCH_ACCOUNT"), help="sbatch --account (default $SBATCH_ACCOUNT)")
    slurm.add_argument("--partition", default=os.environ.get("SBATCH_PARTITION"), help="sbatch --partition (default $SBATCH_PARTITION)")
    slurm.add_argument("--nodes", type=int, default=8, help="nodes (default 8)")
    slurm.add_argument("--gpus-per-node", type=int, default=8, help="GPUs = Slurm tasks per node (default 8)")
    slurm.add_argument("--time", default="04:00:00", help="time limit (default 04:00:00)")
    slurm.add_argument("--job-dir", default="nemo_runs", help="NeMo-Run's job files on the shared filesystem (default ./nemo_runs)")
    slurm.add_argument("--ssh-host", default=None, help="submit over SSH to this login node (default: sbatch here)")
    slurm.add_argument("--ssh-user", default=None, help="SSH user (default $USER)")
    container = p.add_argument_group("slurm and docker")
    container.add_argument("--image", default=None,
                           help="slurm: pyxis --container-image (default ./dcd-megatron.sqsh); "
                           "docker: image (default dcd-megatron:latest)")
    container.add_argument("--mount", action="append", default=[], metavar="SRC:DST",
                           help="a container mount (repeatable); slurm: --container-mounts, docker: -v")
    return p.parse_intermixed_args(argv)


def build_executor(args: argparse.Namespace):
    from dcd_megatron.launch import nemo

    if args.executor == "local":
        return nemo.local_executor(nproc=args.nproc)
    if args.executor == "slurm":
        return nemo.slurm_executor(
            account=args.account, partition=args.partition, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
            time=args.time, container_image=args.image or "dcd-megatron.sqsh", container_mounts=args.mount,
            job_dir=args.job_dir, ssh_host=args.ssh_host, ssh_user=args.ssh_user,
        )
    return nemo.docker_executor(image=args.image or nemo.DEFAULT_DOCKER_IMAGE, nproc=args.nproc, volumes=args.mount)


def main(argv: list[str] | None = None) -> int:
    from dcd_megatron.cli.errors import user_error_types

    args = parse_args(argv)
    from dcd_megatron.launch import nemo

    try:
        cfg = nemo.recipe(args.recipe, args.overrides)
        executor = build_executor(args)
    except user_error_types() + (ValueError,) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    name = args.name or args.recipe
    if args.dryrun:
        print(nemo.launch(cfg, executor, name=name, dryrun=True))
        return 0
    try:
        state = nemo.launch(cfg, executor, name=name, detach=args.detach)
    except RuntimeError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    print(f"{PROG}: {name} on {args.executor}: {state}")
    return 0
