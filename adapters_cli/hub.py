"""`adapters import` and `adapters publish`: the Hugging Face Hub (through huggingface_hub).

`--base hf:ORG/NAME[@REVISION]` on push and merge is handled by the library
(`registry.hub.resolve_base`); these two commands move adapters in and out of the Hub.
"""

from __future__ import annotations

from pathlib import Path

import click

from adapters_cli.common import (
    blob_url,
    complete_ref,
    emit_json,
    guarded,
    store_options,
    version_options,
)


def _open(home: str | None, db_url: str | None):
    from registry.api import Registry

    return Registry.open(home=home, db_url=db_url, blob_url=blob_url())


@click.command("import")
@click.argument("source", metavar="hf:ORG/NAME[@REVISION]")
@version_options
@store_options
@guarded
def import_(source: str, name: str, base_model: str | None, base_revision: str | None, base_dir: str | None,
            parent: str | None, tags: tuple[str, ...], meta: tuple[str, ...], message: str | None,
            home: str | None, db_url: str | None, as_json: bool) -> None:
    """Import the PEFT adapter (LoRA or MoRA) of a Hub repo as the next version of NAME.

    The repo's adapter_config.json and adapter_model.safetensors are fetched through the
    Hugging Face cache (HF_HUB_OFFLINE, HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN apply); the
    version records source=hf:ORG/NAME and source_revision=<resolved commit>.

    \b
    Examples:
      adapters import hf:someone/llama-lora --name team/their-lora --tag staging
      adapters import hf:someone/llama-mora@v2 --name team/m --base hf:meta-llama/Llama-3.2-1B
    """
    from registry.api import parse_meta
    from registry.hub import import_adapter

    reg = _open(home, db_url)
    info = import_adapter(reg, source, name, meta=parse_meta(list(meta)), base_model=base_model,
                          base_revision=base_revision, base_dir=base_dir, parent=parent, tags=tags,
                          message=message)
    if as_json:
        emit_json(info.to_dict())
    else:
        click.echo(f"{info.ref} <- {source} ({info.meta.get('source_revision', '')[:12]})")


@click.command("publish")
@click.argument("ref", shell_complete=complete_ref)
@click.option("--repo", required=True, metavar="ORG/NAME", help="Hub repo to upload to (created if needed).")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", metavar="BRANCH", help="Branch to commit to (created if needed; default main).")
@click.option("--dry-run", is_flag=True, help="Upload nothing: write what would be uploaded to -o DIR.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="With --dry-run: the folder to write.")
@store_options
@guarded
def publish(ref: str, repo: str, private: bool, revision: str | None, dry_run: bool, output: Path | None,
            home: str | None, db_url: str | None, as_json: bool) -> None:
    """Upload a version's PEFT folder, or a merged artifact, to the Hub with a model card.

    The card's metadata carries base_model and base_model_relation (adapter or merge); its
    text gives the base's commit and digests, the adapter spec, the lineage and file digests.

    \b
    Examples:
      adapters publish team/llama-lora:3 --repo my-org/llama-lora --private
      adapters publish artifact:7 --repo my-org/llama-merged --revision experiments
      adapters publish team/llama-lora@prod --repo my-org/x --dry-run -o ./to-upload
    """
    from adapters_cli.common import UserError
    from registry.hub import publish as do_publish

    if dry_run != (output is not None):
        raise UserError("--dry-run and -o DIR go together (the dry run writes what would be uploaded to DIR)")
    summary = do_publish(_open(home, db_url), ref, repo, private=private, revision=revision,
                         dry_run_dir=output)
    if as_json:
        emit_json(summary)
    elif dry_run:
        click.echo(f"{summary['ref']} -> {output} (dry run: {len(summary['files'])} files, "
                   f"base_model_relation {summary['base_model_relation']})")
    else:
        click.echo(f"{summary['ref']} -> {summary['url']}")
