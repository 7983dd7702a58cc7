"""Every byte of a merge run read once: the base hashed at most once per run (and not at all
when merged again), the output never re-read for registration, its recorded digests those
of the files on disk. The registry's file hasher is wrapped to count what it reads."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import torch

from exporters.pipeline import MergeOptions, run_merge
from tests.builders import llama_like, mora_shapes, write_mora_adapter, write_tensor_base


def sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def hashed(monkeypatch) -> list[Path]:
    """Paths the registry hashes (file-digest cache misses and artifact re-hashing)."""
    import registry.artifacts
    import registry.copying
    import registry.file_digests
    from registry.copying import hash_file

    seen: list[Path] = []

    def counting(path, *args, **kwargs):
        seen.append(Path(path).resolve())
        return hash_file(path, *args, **kwargs)

    monkeypatch.setattr(registry.file_digests, "hash_file", counting)
    monkeypatch.setattr(registry.artifacts, "hash_file", counting)
    monkeypatch.setattr(registry.copying, "hash_file", counting)  # what callers outside the registry import
    return seen


def test_base_hashed_once_then_never_and_output_never(tmp_path, reg, registry_home, db_url, hashed):
    base = write_tensor_base(tmp_path / "base", llama_like(dtype=torch.bfloat16), shards=3)
    write_mora_adapter(tmp_path / "a", mora_shapes(), r=8, mora_type=6)
    time.sleep(0.1)  # files stamped in the last tick are hashed but not cached (git's racy rule)
    version = reg.push(tmp_path / "a", "team/a", base_model="tiny", base_dir=base)  # hashes the base once
    shards = sorted(p.resolve() for p in base.glob("*.safetensors"))
    hashed.clear()

    def merge(out: str, ref: str) -> dict:
        return run_merge(MergeOptions(adapters=[ref], base_dir=base, target="safetensors", out_dir=tmp_path / out,
                                      home=registry_home, db_url=db_url))

    first = merge("out1", version.ref)  # the base check and the recipe take the digests push cached
    assert [p for p in hashed if p in shards] == []
    assert not any(p.is_relative_to((tmp_path / "out1").resolve()) for p in hashed)
    hashed.clear()
    second = merge("out2", str(tmp_path / "a"))  # a folder adapter: its file is hashed, the base is not
    assert [p for p in hashed if p in shards] == []
    assert not any(p.is_relative_to((tmp_path / "out2").resolve()) for p in hashed)

    for summary, out in ((first, tmp_path / "out1"), (second, tmp_path / "out2")):
        art = reg.artifact(summary["artifact"]["ref"])
        on_disk = {p.name: sha(p) for p in sorted(out.iterdir())}
        assert art.files == on_disk
        assert art.recipe["base"]["files"] == {p.name: sha(p) for p in shards}
    assert reg.verify().ok


def test_first_merge_of_a_new_base_hashes_each_shard_once(tmp_path, registry_home, hashed):
    base = write_tensor_base(tmp_path / "base", llama_like(), shards=2)
    write_mora_adapter(tmp_path / "a", mora_shapes())
    time.sleep(0.1)
    shards = sorted(p.resolve() for p in base.glob("*.safetensors"))
    run_merge(MergeOptions(adapters=[str(tmp_path / "a")], base_dir=base, target="safetensors",
                           out_dir=tmp_path / "o1", home=registry_home))
    assert sorted(p for p in hashed if p in shards) == shards
    hashed.clear()
    run_merge(MergeOptions(adapters=[str(tmp_path / "a")], base_dir=base, target="safetensors",
                           out_dir=tmp_path / "o2", home=registry_home))
    assert [p for p in hashed if p in shards] == []


def test_a_folder_adapter_is_hashed_once_for_its_card_and_its_record_then_never(tmp_path, reg, registry_home,
                                                                                db_url, hashed):
    """The model card and the recorded recipe name the same adapter digest, found once per run
    (`exporters.recipe.AdapterDigests`): a new file is hashed once, a cached one not at all."""
    base = write_tensor_base(tmp_path / "base", llama_like(), shards=2)
    write_mora_adapter(tmp_path / "a", mora_shapes())
    weights = (tmp_path / "a" / "adapter_model.safetensors").resolve()
    time.sleep(0.1)  # files stamped in the last tick are hashed but not cached (git's racy rule)
    for run, times in (("o1", 1), ("o2", 0)):
        hashed.clear()
        summary = run_merge(MergeOptions(adapters=[str(tmp_path / "a")], base_dir=base, target="safetensors",
                                         out_dir=tmp_path / run, home=registry_home, db_url=db_url))
        assert hashed.count(weights) == times, run
        recipe = reg.artifact(summary["artifact"]["ref"]).recipe
        assert [a["folder_digest"] for a in recipe["adapters"]] == [sha(weights)]
        assert sha(weights) in (tmp_path / run / "README.md").read_text()


def test_registering_through_a_worker_records_what_registering_here_records(tmp_path, registry_home, hashed):
    """`registry_process=True` (the CLI's way): the same recipe and shard digests as a merge
    registering in its own process, the base's digests from the cache (not hashed again), no
    pending output left, and the merge's process never imports SQLAlchemy."""
    import json
    import subprocess
    import sys

    from registry import outputs
    from registry.api import Registry

    base = write_tensor_base(tmp_path / "base", llama_like(dtype=torch.bfloat16), shards=2)
    write_mora_adapter(tmp_path / "a", mora_shapes(), r=8, mora_type=6)
    time.sleep(0.1)
    shards = sorted(p.resolve() for p in base.glob("*.safetensors"))
    here = run_merge(MergeOptions(adapters=[str(tmp_path / "a")], base_dir=base, target="safetensors",
                                  out_dir=tmp_path / "here", home=registry_home))
    hashed.clear()
    apart = run_merge(MergeOptions(adapters=[str(tmp_path / "a")], base_dir=base, target="safetensors",
                                   out_dir=tmp_path / "apart", home=registry_home, registry_process=True))
    assert [p for p in hashed if p in shards] == []
    with Registry.open(registry_home) as reg:
        a, b = reg.artifact(here["artifact"]["ref"]), reg.artifact(apart["artifact"]["ref"])
        assert b.recipe["base"] == a.recipe["base"] and b.recipe["adapters"] == a.recipe["adapters"]
        assert {k: v for k, v in b.files.items() if k != "README.md"} == \
            {k: v for k, v in a.files.items() if k != "README.md"}
        assert b.files == {p.name: sha(p) for p in sorted((tmp_path / "apart").iterdir())}
        assert outputs.pending(reg.db) == []

    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from exporters.pipeline import MergeOptions, run_merge\n"
        "s = run_merge(MergeOptions(adapters=[sys.argv[1]], base_dir=Path(sys.argv[2]), target='safetensors',\n"
        "              out_dir=Path(sys.argv[3]), home=Path(sys.argv[4]), registry_process=True))\n"
        "print(json.dumps({'sqlalchemy': 'sqlalchemy' in sys.modules, 'ref': s['artifact']['ref']}))\n")
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "a"), str(base), str(tmp_path / "third"),
                          str(registry_home)], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-2000:]
    answer = json.loads(run.stdout.strip().splitlines()[-1])
    assert answer["sqlalchemy"] is False
    with Registry.open(registry_home) as reg:
        assert reg.artifact(answer["ref"]).recipe["base"] == a.recipe["base"]


def test_a_failed_merge_through_a_worker_leaves_no_pending_output(tmp_path, registry_home):
    from mora_core.errors import MergeError
    from registry import outputs
    from registry.api import Registry

    base = write_tensor_base(tmp_path / "base", llama_like(dtype=torch.float16))
    write_mora_adapter(tmp_path / "a", mora_shapes())
    with pytest.raises(MergeError, match="not finite in float16"):  # fails mid-merge, after begin_output
        run_merge(MergeOptions(adapters=[str(tmp_path / "a")], base_dir=base, target="safetensors",
                               out_dir=tmp_path / "out", weights=[1e30], home=registry_home, registry_process=True))
    assert not (tmp_path / "out").exists()
    with Registry.open(registry_home) as reg:
        assert outputs.pending(reg.db) == []
