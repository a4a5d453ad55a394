"""The merging family's plug-in: the ``edgetune merge JOB.yaml`` command."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgetune.core.plugins import COMMANDS
from edgetune.merging import bench, stage  # noqa: F401  (the bench suites, the merge step)


def _merge(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from edgetune.merging.job import check_job, load_job, run_merge

    job = load_job(args.job, args.args, output=args.out)
    if args.dry_run:
        check_job(job)
        print(f"{args.job}: {len(job.models)} model(s), method {job.merge.method}, base {job.base or '(none)'}, "
              f"output {job.output}: valid")
        return 0
    with tqdm(total=None, unit="tensor", desc="merging", disable=None, leave=False) as bar:
        def progress(done: int, total: int, name: str) -> None:
            bar.total = total
            bar.update(1)

        rep = run_merge(job, progress=progress, compare_read=args.compare_read)
    read = f", reading the inputs once takes {rep.read_once_seconds:.2f} s" if rep.read_once_seconds is not None else ""
    print(f"merged {len(job.models)} model(s) with {job.merge.method} into {rep.out_path}: {rep.tensors} tensors, "
          f"{rep.bytes_written / 2**20:.1f} MiB in {rep.seconds:.2f} s{read}; peak memory +"
          f"{rep.peak_rss_delta_bytes / 2**20:.1f} MiB (inputs {rep.bytes_read / 2**20:.1f} MiB)")
    return 0


def add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge models (task arithmetic, TIES, DARE, ...) from a job file or a mergekit "
                                     "YAML, streaming tensor by tensor")
    p.add_argument("job", type=Path, metavar="JOB.yaml",
                   help="method:, models:, base:, output: (or a mergekit file with merge_method:)")
    p.add_argument("args", nargs="*", metavar="key=value", help="overrides of the job file (density=0.3)")
    p.add_argument("--out", type=Path, help="where the merged model goes (replaces the file's output:)")
    p.add_argument("--dry-run", action="store_true", help="check the job file and stop")
    p.add_argument("--compare-read", action="store_true",
                   help="also time one plain read of the inputs, to compare with the merge's time")
    p.set_defaults(func=_merge)


COMMANDS.add("merge", add_merge, summary="merge models from a job file or a mergekit YAML")
