"""`python -m xwin_operator`: run the AlignmentRun operator (kopf) against the current cluster.

Equivalent to `kopf run --standalone -m xwin_operator.kube.handlers [-n NS ... | -A]` with
the settings of handlers.configure and an OperatorConfig handed over in kopf's memo: its
XWIN_* variables (images, backoff, XWIN_RECONCILE_INTERVAL...) and this command's flags.
Credentials: the in-cluster service account, else $KUBECONFIG / ~/.kube/config. S3: each
run's own storage.secretRef; the usual AWS_* environment for a run without one. Prometheus
metrics: /metrics on XWIN_METRICS_PORT (default 8080; 0: none), never the --liveness port.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from urllib.parse import urlsplit

from .core.config import OperatorConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m xwin_operator",
                                description="Run the AlignmentRun operator (kopf).")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[],
                       help="namespace to watch (repeatable; default $XWIN_NAMESPACE, else all)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    p.add_argument("--interval", type=float, default=None,
                   help="seconds between reconciles of an unfinished run that waits on what no event announces "
                        "(a Secret, an input, a backoff); ten times that for one waiting on its children "
                        "(default $XWIN_RECONCILE_INTERVAL or 3)")
    p.add_argument("--liveness", default=None, help="liveness endpoint, e.g. http://0.0.0.0:8081/healthz "
                   "(not the metrics port, $XWIN_METRICS_PORT or 8080)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = OperatorConfig.from_env()
    if args.interval is not None:
        if args.interval <= 0:
            print("error: --interval must be positive", file=sys.stderr)
            return 2
        config = dataclasses.replace(config, reconcile_interval=args.interval)
    if args.liveness and config.metrics_port and urlsplit(args.liveness).port == config.metrics_port:
        print(f"error: --liveness {args.liveness} is on the metrics port {config.metrics_port}: give it another "
              "port, or the metrics another one (XWIN_METRICS_PORT; 0 turns them off)", file=sys.stderr)
        return 2
    namespaces = args.namespace or ([os.environ["XWIN_NAMESPACE"]] if os.environ.get("XWIN_NAMESPACE") else [])

    import kopf

    kopf.configure(verbose=args.verbose, quiet=args.quiet)
    from .kube import handlers  # noqa: F401  (registers the handlers)

    kopf.run(standalone=True, clusterwide=args.all_namespaces or not namespaces,
             namespaces=namespaces, liveness_endpoint=args.liveness, memo=kopf.Memo(config=config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
