"""``python -m bench``: accessflow against the floor of dramatiq and RabbitMQ, in one run.

Prints a table on stdout and writes the JSON to ``bench/results/<timestamp>.json``; progress
goes to stderr. Exit status 0 when the run completed (whatever its figures), 1 when the
harness could not finish it (requests never completed, a process died). See bench/README.md.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType

from bench.harness import PRODUCT_QUEUES, Bench, Options, save
from bench.report import render
from bench.world import PoolSpec


def shape(text: str) -> tuple[int, int]:
    """``2x8`` -> (2, 8)."""
    processes, x, threads = text.lower().partition("x")
    if not x:
        raise argparse.ArgumentTypeError(f"expected PROCESSESxTHREADS, not {text!r}")
    return int(processes), int(threads)


def parse(argv: list[str]) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--requests", type=int, default=10_000, help="burst size (default 10000)")
    parser.add_argument("--manual-share", type=float, default=0.2, help="share of manual requests (0.2)")
    parser.add_argument(
        "--pool",
        action="append",
        type=PoolSpec.parse,
        help="a worker pool, QUEUES:PxT, e.g. requests,decisions:1x4 (repeatable); "
        "default one pool on every queue, --processes x --threads",
    )
    parser.add_argument("--processes", type=int, default=2, help="processes of the default pool (2)")
    parser.add_argument("--threads", type=int, default=8, help="threads of the default pool (8)")
    parser.add_argument("--floor-pool", type=shape, help="PxT of the floor's pool (default: like the pools)")
    parser.add_argument(
        "--latency-shares", default="0.5,0.8", help="latency rates as shares of the burst rate"
    )
    parser.add_argument("--latency-seconds", type=float, default=20.0, help="length of a latency run (20)")
    parser.add_argument("--latency-max-requests", type=int, default=1000, help="at most this many per run")
    parser.add_argument(
        "--scaling", default="1x8,2x8,1x1,1x4", help="pool shapes PxT for the scaling runs ('' for none)"
    )
    parser.add_argument(
        "--scaling-requests", type=int, default=2000, help="requests per scaling run, at most"
    )
    parser.add_argument(
        "--scaling-seconds",
        type=float,
        default=30.0,
        help="fewer scaling requests if the burst rate would take longer than this (30)",
    )
    parser.add_argument("--soak", type=int, help="also run this many requests and report RSS growth")
    parser.add_argument(
        "--stall-timeout", type=float, default=120.0, help="give up after this long without progress"
    )
    parser.add_argument("--phase-timeout", type=float, default=3600.0, help="give up a wait after this long")
    parser.add_argument("--results-dir", type=Path, default=Options().results_dir)
    parser.add_argument("--keep-logs", action="store_true", help="keep the work directory with the pool logs")
    parser.add_argument(
        "--smoke", action="store_true", help="200 requests, one short latency run, one scaling point"
    )
    parser.add_argument("--amqp-host", default="127.0.0.1")
    parser.add_argument("--amqp-port", type=int, default=5672)
    args = parser.parse_args(argv)

    pools = args.pool or [PoolSpec(PRODUCT_QUEUES, args.processes, args.threads)]
    floor_pool = PoolSpec((), *args.floor_pool) if args.floor_pool else None
    options = Options(
        requests=args.requests,
        manual_share=args.manual_share,
        pools=pools,
        floor_pool=floor_pool,
        latency_shares=[float(x) for x in args.latency_shares.split(",") if x.strip()],
        latency_seconds=args.latency_seconds,
        latency_max_requests=args.latency_max_requests,
        scaling=[shape(x) for x in args.scaling.split(",") if x.strip()],
        scaling_requests=args.scaling_requests,
        scaling_seconds=args.scaling_seconds,
        soak=args.soak,
        stall_timeout=args.stall_timeout,
        phase_timeout=args.phase_timeout,
        results_dir=args.results_dir,
        keep_logs=args.keep_logs,
        smoke=args.smoke,
        amqp_host=args.amqp_host,
        amqp_port=args.amqp_port,
    )
    if args.smoke:
        options.requests = 200
        options.latency_shares = options.latency_shares[:1]
        options.latency_max_requests = 100
        options.latency_seconds = 10.0
        options.scaling = [(1, pools[0].threads)]
        options.scaling_requests = 200
        options.soak = None
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse(sys.argv[1:] if argv is None else argv)

    def stop(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # unwinds through every cleanup

    signal.signal(signal.SIGTERM, stop)
    bench = Bench(options)
    result = bench.run()
    path = save(result, options.results_dir, bench.stamp)
    sys.stdout.write(render(result))
    print(f"\nJSON: {path}", flush=True)
    if result.get("error"):
        print(f"bench failed: {result['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
