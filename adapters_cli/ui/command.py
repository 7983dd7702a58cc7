"""`adapters ui`: serve the read-only web view in the foreground (Werkzeug's threaded WSGI server)."""

from __future__ import annotations

import ipaddress
import secrets
import socket
from pathlib import Path

import click

from adapters_cli.common import UserError, run_guarded, store_options


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback requires --token.")
@click.option("--port", type=click.IntRange(0, 65535), default=8321, show_default=True, help="Port (0: any free).")
@click.option("--token", default=None, envvar="ADAPTERS_UI_TOKEN",
              help="Required on every request (Bearer header or ?token=); `--token auto` makes one.")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in a browser.")
@store_options
def ui(host: str, port: int, token: str | None, open_browser: bool, home: str | None, db_url: str | None,
       as_json: bool) -> None:
    """Serve a read-only web view of the store: versions, artifacts, lineage graphs, verify.

    \b
    Examples:
      adapters ui                       # http://127.0.0.1:8321/
      adapters ui --port 0 --open
      adapters ui --host 0.0.0.0 --token auto
    """
    from werkzeug.serving import make_server

    from adapters_cli.ui.app import create_app

    def setup():
        nonlocal token
        if token == "auto":
            token = secrets.token_urlsafe(24)
        if not _loopback(host) and not token:
            raise UserError(f"--host {host}: serving beyond this machine needs --token (or --token auto)")
        if token is not None and len(token) < 16:
            raise UserError("--token: use at least 16 characters (or --token auto)")
        try:
            return make_server(host, port, create_app(Path(home) if home else None, db_url, token), threaded=True)
        except (OSError, socket.gaierror) as exc:
            raise UserError(f"--host {host} --port {port}: cannot listen ({exc.strerror or exc})") from None

    server = run_guarded(setup)
    url = f"http://{host if ':' not in host else f'[{host}]'}:{server.server_port}/"
    shown = url + (f"?token={token}" if token else "")
    click.echo(f"serving the registry read-only at {shown}  (Ctrl-C stops)", err=True)
    if open_browser:
        import webbrowser

        webbrowser.open(shown)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
