"""Where the user commands find the server and the key, `condenser login` and `condenser config show`.

The server's URL and API key come from, in this order: the --url / --api-key options (before the
sub-command), the CONDENSER_URL / CONDENSER_API_KEY environment variables, the config file that
`condenser login` writes (~/.config/condenser/config.toml; CONDENSER_CONFIG names another).
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from app.client_cli.common import CliError

if TYPE_CHECKING:
    from app.client import Client

DEFAULT_URL = "http://127.0.0.1:8000"
KEY_ENV, URL_ENV, CONFIG_ENV = "CONDENSER_API_KEY", "CONDENSER_URL", "CONDENSER_CONFIG"


@dataclass
class Connection:
    """What the root options said; the rest is filled from the environment and the config file."""

    url: str | None = None
    api_key: str | None = None


config_app = typer.Typer(help="Where the CLI finds the server and the key.", no_args_is_help=True)


def config_path() -> Path:
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "condenser" / "config.toml"


def read_config() -> dict[str, str]:
    path = config_path()
    try:
        with open(path, "rb") as handle:
            values = tomllib.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CliError(f"cannot read the config file {path}: {exc}") from exc
    return {name: value for name, value in values.items() if isinstance(value, str)}


def write_config(values: dict[str, str]) -> Path:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    # Created readable by the owner only: it holds an API key. JSON strings are valid TOML strings.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write("".join(f"{name} = {json.dumps(value)}\n" for name, value in values.items()))
    temporary.replace(path)
    return path


def resolve(connection: Connection) -> tuple[str, str | None, str]:
    """(url, api key, where the key came from)."""
    stored = read_config()
    url = connection.url or os.environ.get(URL_ENV) or stored.get("url") or DEFAULT_URL
    for value, source in ((connection.api_key, "--api-key"), (os.environ.get(KEY_ENV), KEY_ENV),
                          (stored.get("api_key"), str(config_path()))):
        if value:
            return url, value, source
    return url, None, "nowhere"


def _connection(ctx: typer.Context) -> Connection:
    root = ctx.find_root()
    if not isinstance(root.obj, Connection):
        root.obj = Connection()
    return root.obj


def open_client(ctx: typer.Context) -> Client:
    from app.client import Client

    url, key, _ = resolve(_connection(ctx))
    if not key:
        raise CliError(f"no API key: pass --api-key, set {KEY_ENV}, or run `condenser login`")
    return Client(url, key)


@contextmanager
def connected(ctx: typer.Context) -> Iterator[Client]:
    with open_client(ctx) as client:
        yield client


def login(
    ctx: typer.Context,
    url: Annotated[str | None, typer.Option(help=f"The server (default: {DEFAULT_URL}).")] = None,
    api_key: Annotated[str | None, typer.Option(help="Your key (asked for when not given).")] = None,
) -> None:
    """Check a URL and key against the server and save them in the config file."""
    from app.client import Client

    root = _connection(ctx)
    url = url or root.url or os.environ.get(URL_ENV) or read_config().get("url") or DEFAULT_URL
    key = api_key or root.api_key or os.environ.get(KEY_ENV) or typer.prompt("API key", hide_input=True)
    with Client(url, key) as client:
        me = client.whoami()
    path = write_config({**read_config(), "url": url, "api_key": key})
    typer.echo(f"logged in to {url} as tenant {me['tenant']} (key cnd_{me['key_prefix']}); saved to {path}")


@config_app.command("show")
def config_show(ctx: typer.Context) -> None:
    """The URL and key the other commands would use, and where they come from."""
    url, key, source = resolve(_connection(ctx))
    shown = f"{key[:12]}... (from {source})" if key else f"none: pass --api-key, set {KEY_ENV} or run `condenser login`"
    typer.echo(f"url      {url}\napi key  {shown}\nconfig   {config_path()}")
