"""The `adapters` command: the composition root.

Subcommands live in their own modules and are imported only when invoked, so that
`adapters list` never pays for torch, transformers or alembic.
"""

from __future__ import annotations

import importlib
import sys

import click

# command name -> "module:attribute". Kept sorted for `adapters --help`.
COMMANDS: dict[str, str] = {
    "audit": "registry.commands:audit",
    "db": "registry.commands:db",
    "gc": "registry.commands:gc",
    "lineage": "registry.commands:lineage",
    "list": "registry.commands:list_",
    "merge": "exporters.cli_merge:merge",
    "pull": "registry.commands:pull",
    "push": "registry.commands:push",
    "rm": "registry.commands:rm",
    "run": "exporters.run_cmd:run",
    "show": "registry.commands:show",
    "tag": "registry.commands:tag",
    "untag": "registry.commands:untag",
    "verify": "registry.commands:verify",
}


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module on first use."""

    def __init__(self, *args, lazy: dict[str, str], **kwargs):
        super().__init__(*args, **kwargs)
        self._lazy = dict(lazy)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._lazy))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self._lazy:
            module_name, attr = self._lazy[cmd_name].split(":")
            return getattr(importlib.import_module(module_name), attr)
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="adapter-registry")
def cli() -> None:
    """Keep LoRA/MoRA adapters, fold them into base models, ship validated ONNX.

    \b
    Examples:
      adapters merge ./my-mora --base ./llama --to safetensors -o ./merged
      adapters push ./my-mora --name team/llama-mora --base-model meta-llama/Llama-3-8B
      adapters list --json
    """


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code instead of raising SystemExit."""
    try:
        cli.main(args=argv, prog_name="adapters", standalone_mode=True)
    except SystemExit as exc:  # click always exits; keep the code
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
