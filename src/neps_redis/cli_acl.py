"""``neps-redis acl``: the ACL SETUSER lines of a run's least-privilege users.

Attached to the ``neps-redis`` group with one line. It prints, and never
runs, the lines: creating users is the server administrator's decision, and
the password in them is a placeholder to replace.
"""

from __future__ import annotations

import click

from neps_redis.acl import ROLES, acl_line
from neps_redis.cli_export import _one_line_errors, _redis_option, _url
from neps_redis.cli_output import UsageFailure
from neps_redis.connection import client_from_url, describe_server
from neps_redis.keys import validate_run_name


@click.command("acl")
@click.argument("run")
@click.option(
    "--role",
    type=click.Choice(ROLES),
    multiple=True,
    help="The role to print (repeatable) [default: all three].",
)
@click.option(
    "--user",
    metavar="NAME",
    help="The user's name [default: neps-<role>-<run>, with a hash of the run"
    " name added when the name has characters other than letters, digits and"
    " _.-].",
)
@click.option(
    "--for-server",
    is_flag=True,
    help="Ask the server which commands it knows and add CLIENT SETINFO and"
    " WAITAOF where it has them; without it the lines suit Redis 6.2 and later.",
)
@_redis_option
def acl_command(
    run: str,
    role: tuple[str, ...],
    user: str | None,
    for_server: bool,
    redis_url: str | None,
) -> None:
    """Print an ACL SETUSER line per role for users limited to RUN's keys.

    worker: every transition of a run; monitor: status, check and the event
    stream, read-only; exporter: what `export` reads. Replace CHANGE-ME with
    a password before running a line in redis-cli.
    """
    try:
        validate_run_name(run)
    except ValueError as error:
        raise UsageFailure(str(error)) from None
    server = None
    if for_server:
        url = _url(redis_url)
        with _one_line_errors(url):
            client = client_from_url(url)
            try:
                server = describe_server(client)
            finally:
                client.close()
    for name in role or ROLES:
        click.echo(acl_line(run, name, user=user, server=server))
