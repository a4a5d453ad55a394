"""``python -m edgetune.sparse.native build``: compile the native sparse kernels into the cache and check
them against ``torch`` on a small layer (``make setup`` runs this). ``status`` says where they are.
Exit status 1 when they cannot be built or give wrong results."""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from edgetune.sparse import native
from edgetune.sparse.kernels import Topology


def self_check(kernels: native.NativeKernels) -> float:
    """Largest absolute error of the output, input, value and bias gradients of a random 37x53 layer (5%
    dense, batch 141, ReLU) against dense float64 products."""
    g = torch.Generator().manual_seed(0)
    out_f, in_f, n = 37, 53, 141
    mask = torch.rand(out_f, in_f, generator=g) < 0.05
    rows, cols = mask.nonzero().t().to(torch.int32)
    topo = Topology(torch.stack([rows, cols]), (out_f, in_f))
    vals, bias = torch.randn(rows.numel(), generator=g), torch.randn(out_f, generator=g)
    x, gyt = torch.randn(n, in_f, generator=g), torch.randn(out_f, n, generator=g)
    yt, _, relu_mask = kernels.forward(topo.crow, topo.cols, vals, bias, x, relu=True, relu_mask=True)
    gx, gv, gb = kernels.backward(topo.crow, topo.cols, topo.transposed(), vals, gyt, relu_mask, x, True, True)
    w = torch.zeros(out_f, in_f, dtype=torch.float64)
    w[rows.long(), cols.long()] = vals.double()
    ref_yt = (w @ x.double().t() + bias.double()[:, None]).relu()
    ref_g = gyt.double() * (ref_yt > 0)
    errors = [yt - ref_yt, gx - (w.t() @ ref_g).t(), gb - ref_g.sum(1),
              gv - (ref_g @ x.double())[rows.long(), cols.long()]]
    return max(float(e.abs().max()) for e in errors)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgetune.sparse.native", description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["build", "status"])
    ap.add_argument("--force", action="store_true", help="rebuild even when cached")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "status":
        path = native.library_path()
        print(f"native sparse kernels: {path} ({'built' if path.exists() else 'not built'})")
        return 0
    try:
        path = native.build(force=args.force)
        err = self_check(native.NativeKernels(path))
    except (native.NativeBuildError, OSError) as exc:
        print(f"native sparse kernels not built: {exc}", file=sys.stderr)
        return 1
    if not err < 1e-3:
        print(f"native sparse kernels give wrong results (max error {err:.3g}); not used", file=sys.stderr)
        path.unlink(missing_ok=True)
        return 1
    print(f"native sparse kernels built and checked (max error {err:.1e}): {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
