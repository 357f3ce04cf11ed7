"""The LLM service's command: GPT-2 loaded in-process, run as a resident HTTP service or for one cell.

    python llm_server.py serve --port 8000 --config psi           # the resident service (http_app.py)
    python llm_server.py --config baseline --concurrency 4        # one cell, as the paper's README shows
                                                                  # (= request_generator.py; -> runs/baseline_c4.csv)

What runs where: ``engine/`` holds the model and its decode loops, ``service/lifecycle.py`` the request lifecycle
(admit, generate, release), ``service/http_app.py`` the HTTP routes; the load generator is a
client of the Service, in-process or over HTTP (``request_generator.py --target``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys

from llm_psi import cli
from llm_psi.cli import UsageError
from llm_psi.config import API_KEY_ENV, DRAIN_TIMEOUT_S, MAX_BODY_BYTES, SERVE_DEFAULTS, SERVE_THREADS, ServiceConfig
from llm_psi.service import headroom
from llm_psi.service import lifecycle as service
from llm_psi.service.protocol import BODY_TIMEOUT_S, HEADER_TIMEOUT_S

PROG = "llm_server.py serve"


def _api_key(value: str) -> str:
    """A key, never empty (argparse checks a default string too: $LLM_PSI_API_KEY set empty)."""
    if not value.strip():
        raise UsageError("--api-key is empty: give a key, or omit the option (and $%s) for none" % API_KEY_ENV)
    return value


def build_serve_parser():
    p = cli.OptionParser(prog=PROG, description="Serve GPT-2 over HTTP behind the configured admission "
                             "controller (routes, limits and overload behaviour: docs/SERVICE.md). A --config label presets "
                             "the service options it names; an explicit option wins.")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    g.add_argument("--port", type=cli.finite_number(int, ge=0, le=65535), default=8000,
                   help="TCP port (default: %(default)s)")
    g.add_argument("--retry-after-s", type=cli.finite_number(float, gt=0), default=1.0,
                   help="Retry-After of a 503, seconds, rounded up (default: %(default)s)")
    g.add_argument("--drain-timeout-s", type=cli.finite_number(float, gt=0), default=DRAIN_TIMEOUT_S,
                   help="after SIGTERM/SIGINT, wait this long for requests in flight, then cancel them and exit; "
                        "a second signal exits at once (default: %(default)s)")
    g.add_argument("--max-body-bytes", type=cli.finite_number(int, ge=1), default=MAX_BODY_BYTES,
                   help="largest request body, bytes; a larger one gets 413 (default: %(default)s)")
    g.add_argument("--header-timeout-s", type=cli.finite_number(float, gt=0), default=HEADER_TIMEOUT_S,
                   help="a request's whole header must arrive within this of its first byte, else 408 and the "
                        "connection closes (slow clients; default: %(default)s)")
    g.add_argument("--body-timeout-s", type=cli.finite_number(float, gt=0), default=BODY_TIMEOUT_S,
                   help="a request's whole body must arrive within this of its header, else 408 and the "
                        "connection closes (default: %(default)s)")
    g.add_argument("--api-key", type=_api_key, default=os.environ.get(API_KEY_ENV),
                   help=f"require Authorization: Bearer KEY on the /v1/ routes (/health and /metrics stay open); "
                        f"an empty key is an error (default: ${API_KEY_ENV}, else none)")
    g.add_argument("--allowed-hosts", default=None,
                   help="comma-separated Host header names to accept, * for any (default: the loopback names and "
                        "the bound address when bound to loopback, else any)")
    g.add_argument("--agent-port", type=cli.finite_number(int, ge=1, le=65535), default=None,
                   help=f"answer HAProxy's agent check on this port (one line per connection); {headroom.LAW.replace('%', '%%')} "
                        f"(default: off)")
    g.add_argument("--instance-name", default=None,
                   help=f"name every response in an {headroom.INSTANCE_HEADER} header (balancers; default: none)")
    g.add_argument("-v", "--verbose", action="store_true", help="log every admission decision")
    cli.add_config_option(g)
    p.set_defaults(config=None)  # None: not given; then SERVE_DEFAULTS apply
    # the help shows the service's own defaults (SERVE_DEFAULTS, used where no --config is given)
    cli.add_service_options(p, dataclasses.replace(ServiceConfig(), **SERVE_DEFAULTS))
    return p


def parse_serve(argv) -> tuple[ServiceConfig, dict]:
    """The service's config: without --config, the 'baseline' label with the resident service's own defaults
    (SERVE_DEFAULTS: the fastest engine setting within the accuracy guard); with one, its preset."""
    a = vars(build_serve_parser().parse_args(argv))
    server = {k: a.pop(k) for k in ("host", "port", "retry_after_s", "drain_timeout_s", "verbose", "api_key",
                                    "allowed_hosts", "max_body_bytes", "agent_port", "instance_name",
                                    "header_timeout_s", "body_timeout_s")}
    if a["config"] is None:
        a["config"] = ServiceConfig.config
        if a.get("dtype") is None and a.get("quantize") is None:   # an explicit precision replaces them all
            a.update({key: value for key, value in SERVE_DEFAULTS.items() if a.get(key) is None})
        for key, value in SERVE_THREADS.items():   # not the paper's threads: those of the CPU it may use
            a[key] = value if a.get(key) is None else a[key]
    cli.resolve(a, ServiceConfig)
    return ServiceConfig(**a), server


def main(argv=None) -> int:
    """`llm_server.py serve ARGS`: argv is ARGS, without the word serve."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg, server = parse_serve(argv)
        service.check_limits(cfg.config)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if server["verbose"] else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("service").info("serve config: %s (pid %d)", json.dumps(dataclasses.asdict(cfg)), os.getpid())
    from llm_psi.service import http_app as http_api
    server.pop("verbose")
    server["instance"] = server.pop("instance_name")
    rc = http_api.serve(cfg, **server)
    # drained: exit now, without the interpreter's teardown of torch and the model (seconds on a loaded host),
    # which would eat into the drain deadline that a supervisor enforces
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
