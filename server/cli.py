"""`sae serve DICT_DIR... [--host --port ...]`: serve dictionaries over HTTP with uvicorn.

Every option of `ServerSettings` is a flag and an `SAE_SERVE_*` variable (flags win). Prefer
the variable for the API key: a flag is visible in the process list. With no key set, a random
one is made for the run and printed with a browser URL that carries it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import secrets

from sae.dataclass_cli import add_dataclass_args
from server.settings import ServerSettings

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="serve dictionaries (and their feature stores) over HTTP, with a web browser at /",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "dict_dirs",
        nargs="*",
        metavar="DICT_DIR",
        help="dictionary directories, each PATH or NAME=PATH (or SAE_SERVE_DICTIONARIES=a,b)",
    )
    add_dataclass_args(p, ServerSettings)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app
    from server.deps import load_state
    from server.security import trusted_hosts
    from server.settings import settings_from_env

    names = {f.name for f in dataclasses.fields(ServerSettings)}
    given = {k: v for k, v in vars(args).items() if k in names}
    if args.dict_dirs:
        given["dictionaries"] = list(args.dict_dirs)
    settings = settings_from_env(**given)
    generated = settings.api_key is None and settings.generate_api_key
    if generated:
        settings = dataclasses.replace(settings, api_key=secrets.token_urlsafe(18))
    logging.getLogger().setLevel(settings.log_level.upper())
    if settings.worker_process:
        import torch

        # The model runs in its own process; here torch computes only small things (logit
        # effects of an unanalysed feature), and more threads would contend with the reads.
        torch.set_num_threads(1)
    # Load before listening: a bad dictionary is a one-line error, not a failed lifespan.
    state = load_state(settings)
    app = create_app(state=state)
    url = f"http://{settings.host}:{settings.port}/"
    print(f"serving {len(state.dictionaries)} dictionaries at {url}")
    if generated:
        # The key rides in the URL fragment, which browsers never send to the server.
        print(f"API key for labels and steering (this run only): {settings.api_key}")
        print(f"open the browser with it: {url}#key={settings.api_key}", flush=True)
    elif settings.api_key is None:
        log.warning("no API key: labels and steering are disabled (set SAE_SERVE_API_KEY)")
    hosts = trusted_hosts(settings.host, settings.allowed_hosts)
    log.info("answering Host names: %s (add more with --allowed-hosts)", ", ".join(sorted(hosts)))
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    finally:
        state.close()  # ends the model process too
    return 0
