"""``fastpull login`` and ``fastpull logout``: a registry's credentials, checked and saved where
Docker or podman would save them, or forgotten."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fastpull.cli.main import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

AUTH_FILE_HELP = ("the auth file to write (default: $REGISTRY_AUTH_FILE, else Docker's config, "
                  "$DOCKER_CONFIG/config.json or ~/.docker/config.json)")


def add_parsers(sub) -> None:
    p = sub.add_parser("login", help="check a registry's credentials and save them for pulls")
    p.add_argument("registry", type=_registry, metavar="REGISTRY",
                   help="host[:port] (docker.io for Docker Hub), or host[:port]/namespace for that namespace only")
    p.add_argument("-u", "--username", help="user name (default: asked on the terminal)")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from stdin (default: asked on the terminal, not echoed)")
    p.add_argument("--authfile", type=Path, metavar="FILE", help=AUTH_FILE_HELP)
    p.add_argument("--insecure", action="store_true",
                   help="accept any certificate from the registry, or plain HTTP if it does not speak TLS")
    p.set_defaults(func=_cmd_login)

    p = sub.add_parser("logout", help="forget a registry's saved credentials")
    p.add_argument("registry", type=_registry, metavar="REGISTRY", help="as given to login")
    p.add_argument("--authfile", type=Path, metavar="FILE", help=AUTH_FILE_HELP.replace("write", "edit"))
    p.set_defaults(func=_cmd_logout)


def _registry(text: str) -> str:
    """``host[:port][/namespace]`` as auth files key it: a URL (``https://index.docker.io/v1/``)
    stands for its host, and Docker Hub's host names for ``docker.io``."""
    import argparse

    from fastpull.oci.reference import DOCKER_HUB, DOCKER_HUB_API_HOST

    if "://" in text:
        text = text.split("://", 1)[1].partition("/")[0]
    host, slash, namespace = text.strip("/").partition("/")
    if not host or "@" in text or ":" in namespace:
        raise argparse.ArgumentTypeError(f"expected host[:port] or host[:port]/namespace, got {text!r}")
    return (DOCKER_HUB if host in (DOCKER_HUB_API_HOST, "index.docker.io") else host) + slash + namespace


def _auth_file(args: argparse.Namespace) -> tuple[Path, bool]:
    """The file to edit, and whether it is Docker's config (which keys Docker Hub its own way)."""
    from fastpull.registry.auth import docker_config_path

    path = args.authfile or Path(os.environ.get("REGISTRY_AUTH_FILE") or docker_config_path())
    return path, os.path.realpath(path) == os.path.realpath(docker_config_path())


def _cmd_login(args: argparse.Namespace) -> int:
    from fastpull.registry.auth import Credentials, auth_file_paths, load_credentials, store_credentials
    from fastpull.registry.client import RegistryClient

    if args.password_stdin and not args.username:
        raise UsageError("--password-stdin needs --username")
    username = args.username or _ask("Username: ", echo=True)
    password = sys.stdin.read().rstrip("\r\n") if args.password_stdin else _ask("Password: ", echo=False)
    if not username or not password:
        raise UsageError("a user name and a password are needed")
    credentials = Credentials(username, password)
    host, _, namespace = args.registry.partition("/")
    RegistryClient(host, insecure=True if args.insecure else None, credentials=credentials).check_login()
    path, docker = _auth_file(args)
    where = store_credentials(path, args.registry, credentials, docker=docker)
    print(f"login succeeded: credentials for {args.registry} saved in {where}")
    read = [p.resolve() for p in auth_file_paths()]
    if path.resolve() not in read:
        print(f"fastpull login: warning: pulls do not read {path}; set REGISTRY_AUTH_FILE to it", file=sys.stderr)
        return 0
    for earlier in read[:read.index(path.resolve())]:
        if load_credentials(host, [earlier]).for_repository(namespace or None) is not None:
            print(f"fastpull login: warning: pulls read {earlier} first, which has other credentials for "
                  f"{args.registry}", file=sys.stderr)
    return 0


def _cmd_logout(args: argparse.Namespace) -> int:
    from fastpull.registry.auth import remove_credentials

    path, _ = _auth_file(args)
    if remove_credentials(path, args.registry):
        print(f"removed the credentials for {args.registry} from {path}")
    else:
        print(f"fastpull logout: not logged in to {args.registry} in {path}", file=sys.stderr)
    return 0


def _ask(prompt: str, *, echo: bool) -> str:
    """Ask on the terminal (a password without echo); a usage error without one."""
    if not sys.stdin.isatty():
        raise UsageError(f"no terminal to ask for the {'user name' if echo else 'password'} on: use "
                         f"{'--username' if echo else '--password-stdin'}")
    if echo:
        return input(prompt)
    import getpass

    return getpass.getpass(prompt)
