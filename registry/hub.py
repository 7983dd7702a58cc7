"""The Hugging Face Hub, through huggingface_hub only: `hf:ORG/NAME[@REVISION]` references
for base models and adapter repos, `import` of a PEFT adapter repo, `publish` to a repo.

- **Resolution** is `huggingface_hub.snapshot_download` into its own cache, so
  `HF_HUB_OFFLINE=1`, `HF_HUB_CACHE`/`HF_HOME`, `HF_ENDPOINT` and `HF_TOKEN` behave as
  everywhere else; the resolved commit is the snapshot folder's name
  (`models--ORG--NAME/snapshots/<commit>`). Only weights in safetensors form, configs and
  tokenizer files are fetched: pickle checkpoints never are.
- **Base identity** recorded by a push with `--base hf:...`: the repo id (`base_model`),
  the resolved commit (`base_revision`) and the weight files' digests (`base_files`).
- **Base folder**: a snapshot is a folder of symlinks into the cache's `blobs/`, which the
  model-folder rule (`mora_core.checkpoint.member`: no symlink leaving the folder) refuses.
  The merge reads a view instead: `<home>/hub/<ORG--NAME>/<commit>/`, real hard links to
  the cached files (a copy where the home is on another filesystem), built once per commit
  and atomically.
- **Import** pushes the adapter files of a repo's snapshot (hard links into a temp
  folder in the home, so nothing is copied when the cache is on the same disk), with
  `source=hf:ORG/NAME` and `source_revision=<commit>` in the version's metadata.
- **Publish** uploads a version's PEFT folder or a merged artifact's files with a model
  card (`registry.model_card`); `dry_run_dir` writes exactly the files that would be
  uploaded instead. `upload_folder` is the whole upload.

huggingface_hub is imported inside these functions, never at module level.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.errors import IntegrityError, RegistryError

PREFIX = "hf:"
BASE_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                 "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                 "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json",
                 # sentence-transformers: its modules and their folders (`1_Pooling/config.json`;
                 # a Dense module's weights match *.safetensors), so a merge is a complete model
                 "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                 "[0-9]*_*/*.json"]
ADAPTER_PATTERNS = ["adapter_config.json", "adapter_model.safetensors"]
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_REV_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")


@dataclass(frozen=True)
class HubRef:
    """`hf:ORG/NAME[@REVISION]` parsed; `revision` None means the default branch."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{PREFIX}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class HubSnapshot:
    """A repo revision in the local Hugging Face cache."""

    ref: HubRef
    commit: str
    path: Path


def is_hub_ref(text: object) -> bool:
    return isinstance(text, (str, os.PathLike)) and str(text).startswith(PREFIX)


def parse_hub_ref(text: str) -> HubRef:
    """`hf:ORG/NAME[@REVISION]` -> HubRef; a one-line RegistryError for anything else."""
    raw = str(text)
    if not raw.startswith(PREFIX):
        raise RegistryError(f"{raw!r}: expected hf:ORG/NAME[@REVISION]")
    repo, _, rev = raw[len(PREFIX):].partition("@")
    if not _REPO_RE.match(repo) or ".." in repo or "--" in repo:
        raise RegistryError(f"{raw!r}: {repo!r} is not a Hub repo id (ORG/NAME)")
    if rev and (not _REV_RE.match(rev) or ".." in rev):
        raise RegistryError(f"{raw!r}: {rev!r} is not a revision (a branch, tag or commit)")
    return HubRef(repo, rev or None)


def snapshot(ref: HubRef | str, patterns: list[str]) -> HubSnapshot:
    """Download (or find offline) the files of `ref` matching `patterns`; returns the snapshot."""
    if isinstance(ref, str):
        ref = parse_hub_ref(ref)
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns))
    except Exception as exc:
        raise hub_error(exc, str(ref)) from None
    return HubSnapshot(ref, path.name, path)


def hub_error(exc: BaseException, what: str) -> BaseException:
    """One line for the ways the Hub says no (unknown repo/revision, offline, auth, network)."""
    try:
        from huggingface_hub import errors as he
    except ImportError:  # pragma: no cover - a dependency
        return exc
    if isinstance(exc, RegistryError):
        return exc
    if isinstance(exc, he.RevisionNotFoundError):
        return RegistryError(f"{what}: no such revision on the Hub")
    if isinstance(exc, he.GatedRepoError):
        return RegistryError(f"{what}: gated repo; accept its terms on the Hub and set HF_TOKEN")
    if isinstance(exc, he.RepositoryNotFoundError):
        return RegistryError(f"{what}: no such repo on the Hub (or it is private: set HF_TOKEN)")
    if isinstance(exc, he.LocalEntryNotFoundError):
        from huggingface_hub import constants

        why = "HF_HUB_OFFLINE is set and" if constants.HF_HUB_OFFLINE else "the Hub is unreachable and"
        return RegistryError(f"{what}: {why} no copy is in the Hugging Face cache ({constants.HF_HUB_CACHE})")
    if isinstance(exc, he.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return RegistryError(f"{what}: the Hub answered {status} ({first})")
    if isinstance(exc, (OSError, ValueError)) and not isinstance(exc, IntegrityError):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return RegistryError(f"{what}: {first}")
    return exc


# ----------------------------------------------------------------------------- bases

@dataclass(frozen=True)
class ResolvedBase:
    """A base model argument resolved to a folder, with its Hub identity when it came from there."""

    folder: Path
    repo_id: str | None = None
    commit: str | None = None


def resolve_base(arg: str | os.PathLike | None, home: str | os.PathLike | None) -> ResolvedBase | None:
    """A `--base` argument of any command (push, merge, export --slots, pack): a local folder
    as it is, `hf:ORG/NAME[@REV]` through the cache (then the folder is the snapshot's view
    under the store's home: `home`, else ADAPTERS_HOME or the default, see
    `registry.config.resolve_home`; only a Hub reference resolves the home)."""
    if arg is None:
        return None
    if not is_hub_ref(arg):
        return ResolvedBase(Path(arg))
    from registry.config import resolve_home

    home = resolve_home(home)
    snap = snapshot(parse_hub_ref(str(arg)), BASE_PATTERNS)
    if not any(p.name.endswith(".safetensors") for p in snap.path.iterdir()):
        raise RegistryError(f"{snap.ref}: the snapshot {snap.commit[:12]} holds no .safetensors weights "
                            "(pickle checkpoints are not fetched)")
    return ResolvedBase(snapshot_view(snap, home), snap.ref.repo_id, snap.commit)


def snapshot_view(snap: HubSnapshot, home: Path) -> Path:
    """`<home>/hub/<ORG--NAME>/<commit>`: the snapshot's files as real files (sub-folders too:
    sentence-transformers' module folders)."""
    dest = Path(home) / "hub" / snap.ref.repo_id.replace("/", "--") / snap.commit
    names = _view_files(snap.path)
    if dest.is_dir() and _view_files(dest) == names:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{snap.commit}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        for name in names:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(snap.path / name, tmp / name)
        if dest.is_dir():  # an older, partial view (files added to the allow list since)
            shutil.rmtree(dest, ignore_errors=True)
        os.rename(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not dest.is_dir():  # another process won the rename race: fine if it is there
            raise
    return dest


def _view_files(folder: Path) -> list[str]:
    """The files of a snapshot (or of its view) as sorted relative posix paths; hidden ones left out."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def base_identity(base: ResolvedBase, base_model: str | None,
                  base_revision: str | None) -> tuple[str | None, str | None]:
    """(base_model, base_revision) to record: a Hub base names its repo and resolved commit;
    an explicit --base-model/--base-revision must agree with it."""
    if base.repo_id is None:
        return base_model, base_revision
    if base_model is not None and base_model != base.repo_id:
        raise RegistryError(f"--base-model {base_model} conflicts with --base hf:{base.repo_id}")
    if base_revision is not None and not base.commit.startswith(base_revision) and base_revision not in (
            "main",):
        raise RegistryError(f"--base-revision {base_revision} conflicts with the resolved commit {base.commit}")
    return base.repo_id, base.commit


# ----------------------------------------------------------------------------- import

def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link `src` (resolved: the cache keeps symlinks to blobs) to `dst`, or copy it."""
    real = src.resolve()
    try:
        os.link(real, dst)
    except OSError:
        shutil.copyfile(real, dst)


def import_adapter(reg: Any, source: str, name: str, *, meta: dict[str, str] | None = None,
                   **push_options: Any) -> Any:
    """Push the PEFT adapter of Hub repo `source` (`hf:ORG/NAME[@REV]`) as the next version of
    `name`; its source and resolved commit are recorded in the metadata and audited."""
    ref = parse_hub_ref(source)
    snap = snapshot(ref, ADAPTER_PATTERNS)
    missing = [p for p in ADAPTER_PATTERNS if not (snap.path / p).is_file()]
    if missing:
        raise RegistryError(f"{ref}: not a PEFT adapter repo (no {missing[0]} at commit {snap.commit[:12]})")
    work = reg.home / f".import-{os.getpid()}-{secrets.token_hex(4)}"
    work.mkdir(parents=True)
    try:
        for p in ADAPTER_PATTERNS:
            link_or_copy(snap.path / p, work / p)
        all_meta = dict(meta or {})
        all_meta.update({"source": f"{PREFIX}{ref.repo_id}", "source_revision": snap.commit})
        info = reg.push(work, name, meta=all_meta, **push_options)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    reg.audit("import", info.ref, {"source": f"{PREFIX}{ref.repo_id}", "revision": ref.revision,
                                   "commit": snap.commit, "digest": info.digest}, name=info.name)
    return info


# ----------------------------------------------------------------------------- publish

@dataclass
class PublishPlan:
    """What `publish` uploads: {path in repo: local file} plus the model card text."""

    ref: str
    files: dict[str, Path]
    card: str
    relation: str


def plan_publish(reg: Any, ref: str) -> PublishPlan:
    """Gather a version's verified PEFT files, or an artifact's files (re-hashed against its
    record: an altered artifact is refused), and write the model card."""
    from registry.copying import hash_file
    from registry.model_card import CARD_NAME, artifact_card, version_card
    from registry.names import parse_ref

    if parse_ref(ref).is_artifact:
        art = reg.artifact(ref)
        root = Path(art.path)
        files: dict[str, Path] = {}
        for rel, digest in sorted(art.files.items()):
            p = root if root.is_file() else root / rel
            if not p.is_file():
                raise RegistryError(f"{art.ref}: {p} is missing (moved or deleted); cannot publish it")
            if hash_file(p)[0] != digest:
                raise IntegrityError(f"{art.ref}: {p} is altered (digest differs from the record); "
                                     "not publishing it")
            if rel != CARD_NAME:  # the output's own card: replaced by the same card with the store's record
                files[rel] = p
        card = artifact_card(art, {r: reg.resolve(r) for r, _ in art.inputs})
        return PublishPlan(art.ref, files, card, "merge")
    info = reg.resolve(ref)
    folder = reg.materialize(info.ref)
    files = {f["path"]: folder / f["path"] for f in info.files or []}
    card = version_card(info, reg.lineage(info.ref))
    return PublishPlan(info.ref, files, card, "adapter")


def write_plan(plan: PublishPlan, dest: Path) -> list[str]:
    """Write exactly the files of `plan` (and README.md) into `dest`, atomically; their names."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise RegistryError(f"{dest}: already exists and is not an empty folder")
    if "README.md" in plan.files:
        raise RegistryError(f"{plan.ref}: holds its own README.md; the model card would replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        for rel, src in plan.files.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(src, target)
        (tmp / "README.md").write_text(plan.card, encoding="utf-8")
        if dest.exists():
            dest.rmdir()
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted([*plan.files, "README.md"])


def publish(reg: Any, ref: str, repo_id: str, *, private: bool = False, revision: str | None = None,
            dry_run_dir: Path | None = None) -> dict[str, Any]:
    """Upload `ref` to Hub repo `repo_id` (created if needed, on branch `revision`), or with
    `dry_run_dir` write what would be uploaded there. Returns a JSON-able summary; audited."""
    parse_hub_ref(f"{PREFIX}{repo_id}")  # same repo id rules
    if revision is not None:
        parse_hub_ref(f"{PREFIX}{repo_id}@{revision}")
    plan = plan_publish(reg, ref)
    summary: dict[str, Any] = {"ref": plan.ref, "repo": repo_id, "revision": revision or "main",
                               "base_model_relation": plan.relation}
    if dry_run_dir is not None:
        summary["files"] = write_plan(plan, Path(dry_run_dir))
        summary["dry_run"] = str(Path(dry_run_dir))
        return summary
    staging = reg.home / f".publish-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        summary["files"] = write_plan(plan, staging)
        from huggingface_hub import HfApi

        api = HfApi()
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
            info = api.upload_folder(folder_path=str(staging), repo_id=repo_id, repo_type="model",
                                     revision=revision, commit_message=f"Publish {plan.ref}")
        except Exception as exc:
            raise hub_error(exc, f"publish to {repo_id}") from None
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(staging)
    summary.update(commit=info.oid, url=info.commit_url, private=private)
    name = None if plan.ref.startswith("artifact:") else plan.ref.rsplit(":", 1)[0]
    reg.audit("publish", plan.ref, {"repo": repo_id, "revision": revision or "main", "commit": info.oid,
                                    "files": summary["files"]}, name=name)
    return summary
