"""The registry's commands: push, pull, list, show, tag, untag, rm, lineage, verify, gc, audit, db.

Every command takes `--home`, `--db-url` and `--json`; errors are one `error: ...` line on
stderr (see adapters_cli.common). This module imports click and registry only: no torch,
transformers or alembic (`adapters push` reaches torch through mora_core inside the push).
"""

from __future__ import annotations

import json
import sys

import click

from adapters_cli.common import (
    ProgressLine,
    blob_url,
    complete_ref,
    emit_json,
    guarded,
    human_size,
    one_line,
    store_options,
    table,
    version_options,
)
from registry.names import MAX_INT

command = guarded  # every command: library errors become one `error:` line and their exit code
COUNT = click.IntRange(0, MAX_INT)  # --limit/--offset: what the database can take


def _open(home: str | None, db_url: str | None, create: bool = False):
    """The store; only commands that write a new version (`push`) create it (see Registry.open)."""
    import gc

    import sqlalchemy.orm  # noqa: F401

    # A short-lived process: move SQLAlchemy's freshly imported heap out of the collector's
    # sight, so defining the models does not pay full gen-2 collections (~40 ms of `list`).
    gc.freeze()
    from registry.api import Registry

    reg = Registry.open(home=home, db_url=db_url, blob_url=blob_url(), create=create)
    ctx = click.get_current_context(silent=True)
    if ctx is not None:  # closed with the command: its pooled connections go back to the server
        ctx.call_on_close(reg.close)
    return reg


def _where(reg) -> str:
    """The store in words: its home (SQLite) or its database URL without the password."""
    if reg.url.startswith("sqlite"):
        return f"the registry at {reg.home}"
    from sqlalchemy.engine import make_url

    return f"the registry database {make_url(reg.url).render_as_string(hide_password=True)}"


@click.command("push")
@click.argument("folder", type=click.Path())
@version_options
@store_options
@command
def push(folder: str, name: str, base_model: str | None, base_revision: str | None, base_dir: str | None,
         parent: str | None, tags: tuple[str, ...], meta: tuple[str, ...], message: str | None,
         home: str | None, db_url: str | None, as_json: bool) -> None:
    """Store FOLDER (a PEFT adapter) as the next immutable version of NAME; print its reference.

    Identical content answers the existing version. LoRA, DoRA, rsLoRA and MoRA folders are
    validated first; pickles are refused.

    \b
    Examples:
      adapters push ./my-mora --name team/llama-mora --base-model meta-llama/Llama-3-8B --tag prod
      adapters push ./my-mora-v2 --name team/llama-mora --parent team/llama-mora:1 --meta dataset=alpaca
    """
    reg = _open(home, db_url, create=True)
    prog = ProgressLine(verb="push")
    info = reg.push(folder, name, base_model=base_model, base_revision=base_revision, base_dir=base_dir,
                    parent=parent, tags=tags, meta=list(meta), message=message, progress=prog.add)
    prog.close()
    emit_json(info.to_dict()) if as_json else click.echo(info.ref)


@click.command("pull")
@click.argument("ref", shell_complete=complete_ref)
@click.option("-o", "--output", type=click.Path(),
              help="Output folder (default ./<name>-<N>); must not exist yet (an empty folder neither).")
@store_options
@command
def pull(ref: str, output: str | None, home: str | None, db_url: str | None, as_json: bool) -> None:
    """Write REF as a PEFT adapter folder, verifying every digest.

    \b
    Examples:
      adapters pull team/llama-mora@prod -o ./prod-adapter
      adapters pull team/llama-mora:2 --json
    """
    reg = _open(home, db_url)
    prog = ProgressLine(verb="pull")
    path = reg.pull(ref, output, progress=prog.add)
    prog.close()
    info = reg.resolve(ref)
    if as_json:
        emit_json({"ref": info.ref, "digest": info.digest, "path": str(path)})
    else:
        click.echo(f"{info.ref} -> {path}")


@click.command("list")
@click.argument("name", required=False, shell_complete=complete_ref)
@click.option("--base-model", help="Only versions on this base model.")
@click.option("--where", multiple=True, help="KEY=VALUE on metadata or kind/author/r/mora_type/base_revision.")
@click.option("--limit", default=50, show_default=True, type=COUNT, help="At most N versions (0: all).")
@click.option("--offset", default=0, type=COUNT, help="Skip the N newest (pagination).")
@store_options
@command
def list_(name: str | None, base_model: str | None, where: tuple[str, ...], limit: int, offset: int,
          home: str | None, db_url: str | None, as_json: bool) -> None:
    """Versions, newest first (all, or those of NAME).

    \b
    Examples:
      adapters list
      adapters list team/llama-mora --where dataset=alpaca --where kind=mora
      adapters list --base-model meta-llama/Llama-3-8B --limit 20 --offset 20 --json
    """
    from registry.errors import StoreMissing

    try:
        reg = _open(home, db_url)
    except StoreMissing as exc:  # nothing to list is an answer, not a mistake: say why
        emit_json([]) if as_json else None
        click.echo(f"no versions: {exc}", err=True)
        return
    rows = reg.list(name, base_model=base_model, where=list(where), limit=limit, offset=offset)
    if as_json:
        emit_json([v.to_dict() for v in rows])
        return
    if not rows:  # say so (on stderr: stdout stays a table, empty here)
        filtered = name is not None or base_model is not None or where or offset
        click.echo("no versions match" if filtered else f"no versions in {_where(reg)} yet "
                   "(`adapters push` adds one)", err=True)
        return
    table([[v.ref, v.kind + (f" r={v.r}" if v.r else ""), v.digest[7:19], human_size(v.size),
             v.created.strftime("%Y-%m-%d %H:%M"), ",".join(v.aliases), v.base_model or ""] for v in rows],
           ["REF", "KIND", "DIGEST", "SIZE", "CREATED", "ALIASES", "BASE"])


@click.command("show")
@click.argument("ref", shell_complete=complete_ref)
@store_options
@command
def show(ref: str, home: str | None, db_url: str | None, as_json: bool) -> None:
    """Everything recorded about a version (or an artifact:ID).

    \b
    Examples:
      adapters show team/llama-mora@prod
      adapters show artifact:3 --json
    """
    reg = _open(home, db_url)
    info = reg.show(ref)
    d = info.to_dict()
    if as_json:
        emit_json(d)
        return
    for k, v in d.items():
        if v in (None, [], {}):
            continue
        if isinstance(v, (dict, list)):
            v = json.dumps(v, sort_keys=True)  # whole: `show` never cuts a field (--json for parsing)
        click.echo(f"{k + ':':<15} {one_line(str(v))}")


@click.command("tag")
@click.argument("ref", shell_complete=complete_ref)
@click.argument("alias")
@store_options
@command
def tag(ref: str, alias: str, home: str | None, db_url: str | None, as_json: bool) -> None:
    """Point NAME@ALIAS at REF (moves it if it exists; audited).

    \b
    Example:
      adapters tag team/llama-mora:2 prod
    """
    info = _open(home, db_url).tag(ref, alias)
    if as_json:
        emit_json({"alias": f"{info.name}@{alias}", "ref": info.ref, "digest": info.digest})
    else:
        click.echo(f"{info.name}@{alias} -> {info.ref}")


@click.command("untag")
@click.argument("name", shell_complete=complete_ref)
@click.argument("alias")
@store_options
@command
def untag(name: str, alias: str, home: str | None, db_url: str | None, as_json: bool) -> None:
    """Remove NAME@ALIAS (audited).

    \b
    Example:
      adapters untag team/llama-mora staging
    """
    was = _open(home, db_url).untag(name, alias)
    emit_json({"alias": f"{name}@{alias}", "was": was}) if as_json else click.echo(f"{name}@{alias} removed (was {was})")


@click.command("rm")
@click.argument("ref", shell_complete=complete_ref)
@click.option("--delete-files", is_flag=True, help="With artifact:N, also delete the files it records.")
@store_options
@command
def rm(ref: str, delete_files: bool, home: str | None, db_url: str | None, as_json: bool) -> None:
    """Delete a version nothing derives from, or forget an artifact (audited).

    A version's bytes go at the next gc. An artifact's files stay where they are unless
    --delete-files; once its artifacts are forgotten, a version can be deleted.

    \b
    Examples:
      adapters rm team/llama-mora:3
      adapters rm artifact:7 --delete-files
    """
    from registry.names import parse_ref

    reg = _open(home, db_url)
    if parse_ref(ref).is_artifact:
        out = reg.forget_artifact(ref, delete_files)
        extra = f", {out['files_deleted']} files deleted" if delete_files else f" (files kept at {out['path']})"
        emit_json(out) if as_json else click.echo(f"forgot {out['forgotten']}{extra}")
        return
    if delete_files:
        from registry.errors import RegistryError

        raise RegistryError("--delete-files goes with an artifact reference (artifact:N)")
    label = reg.delete(ref)
    emit_json({"deleted": label}) if as_json else click.echo(f"deleted {label}")


@click.command("lineage")
@click.argument("ref", shell_complete=complete_ref)
@click.option("--format", "fmt", type=click.Choice(["text", "json", "dot", "mermaid", "svg"]), default="text")
@store_options
@command
def lineage(ref: str, fmt: str, home: str | None, db_url: str | None, as_json: bool) -> None:
    """Ancestors (parents, base model) and descendants (child versions, merged artifacts).

    \b
    Examples:
      adapters lineage team/llama-mora:1
      adapters lineage team/llama-mora@prod --format dot | dot -Tpng > lineage.png
      adapters lineage team/llama-mora@prod --format svg > lineage.svg
    """
    from registry.lineage import render

    graph = _open(home, db_url).lineage(ref)
    click.echo(render(graph, "json" if as_json else fmt))


@click.command("verify")
@click.option("--full", is_flag=True,
              help="Re-read and re-hash remote blobs too (default for S3: one HEAD per blob, no content).")
@store_options
@command
def verify(full: bool, home: str | None, db_url: str | None, as_json: bool) -> None:
    """Check every blob and artifact file, walk the audit chain; exit 1 if anything is wrong.

    Local blobs are always re-hashed. S3 blobs get one HEAD each (present, size, recorded
    digest, stored SHA-256 checksum) unless --full re-reads every byte. The result is kept
    as the store's last verify (shown by `adapters ui`).

    \b
    Examples:
      adapters verify
      adapters verify --full --json
    """
    reg = _open(home, db_url)
    prog = ProgressLine(verb="verify")
    rep = reg.verify(progress=prog.add, full=full)
    prog.close()
    reg.record_verify(rep.to_dict())  # what `adapters ui` shows as the last verify
    if as_json:
        emit_json(rep.to_dict())
    else:
        for w in rep.warnings:
            click.echo(f"warning: {w}", err=True)
        for p in rep.problems:
            click.echo(f"PROBLEM: {p}")
        how = "" if rep.mode == "full" else f" [cheap: metadata only, {human_size(rep.bytes_read)} read; --full re-reads]"
        click.echo(f"{'ok' if rep.ok else 'DAMAGED'}: {rep.blobs} blobs ({human_size(rep.bytes)}), "
                   f"{rep.artifacts} artifacts, {rep.events} audit events checked{how}")
    sys.exit(0 if rep.ok else 1)


@click.command("gc")
@click.option("--dry-run", is_flag=True, help="Only report what would be removed.")
@click.option("--grace", "grace_s", type=float, default=None, metavar="SECONDS",
              help="Keep unreferenced blobs younger than this (S3 default 3600: a concurrent push "
                   "uploads before it commits; 0 is safe only when no push runs).")
@store_options
@command
def gc(dry_run: bool, grace_s: float | None, home: str | None, db_url: str | None, as_json: bool) -> None:
    """Remove blobs no version references and leftovers of interrupted writes (mark and sweep).

    \b
    Examples:
      adapters gc --dry-run
      adapters gc --json
      adapters gc --grace 600
    """
    rep = _open(home, db_url).gc(dry_run=dry_run, grace_s=grace_s)
    if as_json:
        emit_json(rep.to_dict())
    else:
        verb = "would free" if dry_run else "freed"
        click.echo(f"{verb} {human_size(rep.bytes_freed)}: {len(rep.blobs)} blobs, {len(rep.leftovers)} leftovers")


@click.command("audit")
@click.argument("ref", required=False, shell_complete=complete_ref)
@click.option("--limit", type=COUNT, default=None, help="Only the N newest events (0: all).")
@store_options
@command
def audit(ref: str | None, limit: int | None, home: str | None, db_url: str | None, as_json: bool) -> None:
    """Audit events, oldest first (all, or those of REF).

    \b
    Examples:
      adapters audit --limit 20
      adapters audit team/llama-mora:2 --json
    """
    events = _open(home, db_url).events(ref, limit=limit)
    if as_json:
        emit_json(events)
        return
    table([[str(e["seq"]), e["at"][:19].replace("T", " "), e["actor"], e["action"], e["subject"]] for e in events],
           ["SEQ", "TIME", "ACTOR", "ACTION", "SUBJECT"])


@click.group("db")
def db() -> None:
    """Database schema management.

    \b
    Example:
      adapters db upgrade --db-url postgresql+psycopg://user@host/adapters
    """


@db.command("upgrade")
@store_options
@command
def db_upgrade(home: str | None, db_url: str | None, as_json: bool) -> None:
    """Upgrade the registry schema to the newest migration (needed on PostgreSQL after updates).

    \b
    Example:
      adapters db upgrade --db-url postgresql+psycopg://user@host/adapters
    """
    from registry.api import resolve_home, resolve_url
    from registry.db import SCHEMA_HEAD, make_engine, upgrade

    home_p = resolve_home(home)
    before = upgrade(make_engine(resolve_url(home_p, db_url)), home_p / ".schema.lock")
    if as_json:
        emit_json({"from": before, "to": SCHEMA_HEAD})
    elif before == SCHEMA_HEAD:
        click.echo(f"schema already at {SCHEMA_HEAD}")
    else:
        click.echo(f"schema {before or '(empty)'} -> {SCHEMA_HEAD}")
