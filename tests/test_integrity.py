"""Integrity on load: every file of an output folder against upcycle.json's size and sha256 (on by
default, verify=False skips), refused with the file's name; the same for upcycle-export-run inputs
(the upcycled folder a run started from, the checkpoint's checksums.json)."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _hostile import check_refusal, entries, llama_config, llama_dir, snapshot, write_run_folder  # noqa: E402

import upcycle  # noqa: E402
from upcycle.compiler.cli import run  # noqa: E402
from upcycle.compiler.errors import ModelError  # noqa: E402
from upcycle.runtime import MoELayer  # noqa: E402


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """One output folder of each kind: native in memory, streamed (sharded), save_pretrained."""
    base = tmp_path_factory.mktemp("outs")
    model = llama_dir(base / "llama")
    assert run(["e8g1t2", str(model), "-o", str(base / "native"), "--no-progress"]) == 0
    assert run(["e8g1t2", str(model), "-o", str(base / "sharded"), "--no-progress", "--stream",
                "--max-shard-size", "100KB"]) == 0
    moe = upcycle.load(base / "native")
    moe.save_pretrained(base / "pretrained")
    return base


@pytest.fixture(params=["native", "sharded", "pretrained"])
def folder(outputs, tmp_path, request):
    dst = tmp_path / request.param
    shutil.copytree(outputs / request.param, dst)
    return dst


def _weights(folder):
    return sorted(folder.glob("model*.safetensors"))


def _flip(path, at=None):
    data = bytearray(path.read_bytes())
    i = len(data) - 7 if at is None else at
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def test_intact_folders_load(folder):
    model = upcycle.load(folder)
    assert isinstance(model.model.layers[0].mlp, MoELayer)
    manifest = json.loads((folder / "upcycle.json").read_text())
    assert all("sha256" in e for e in manifest["files"].values())  # save_pretrained hashes too now


def test_flipped_byte_refused_with_the_file_name(folder):
    victim = _weights(folder)[-1]
    _flip(victim)  # inside the tensor data: the header still parses, the size is the same
    with pytest.raises(ModelError) as info:
        upcycle.load(folder)
    msg = str(info.value)
    assert str(victim) in msg and "sha256" in msg and "verify=False" in msg and len(msg.splitlines()) == 1
    model = upcycle.load(folder, verify=False)  # skipping the check loads the changed bytes, as asked
    assert isinstance(model.model.layers[0].mlp, MoELayer)


@pytest.mark.parametrize("victim", ["config.json", "upcycle_spec.yaml"])
def test_every_file_is_checked(folder, victim):
    p = folder / victim
    p.write_text(p.read_text().replace("2", "3", 1))
    with pytest.raises(ModelError, match=victim):
        upcycle.load(folder)


def test_truncated_and_missing_files(folder):
    victim = _weights(folder)[0]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(ModelError, match=r"is \d+ bytes but upcycle.json records"):
        upcycle.load(folder)
    victim.unlink()
    with pytest.raises(ModelError, match="missing"):
        upcycle.load(folder)


def test_a_file_added_after_writing_is_not_read(outputs, tmp_path):
    """A shard index slipped into a single-file folder would redirect loading: it is not in the manifest."""
    folder = tmp_path / "f"
    shutil.copytree(outputs / "native", folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model.safetensors"}}))
    with pytest.raises(ModelError, match="not listed in upcycle.json"):
        upcycle.load(folder)


def test_index_and_manifest_names_stay_inside_the_folder(outputs, tmp_path):
    folder = tmp_path / "f"
    shutil.copytree(outputs / "sharded", folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../../native/model.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    for verify in (True, False):
        with pytest.raises(ModelError, match="not a plain file name"):
            upcycle.load(folder, verify=verify)
    manifest = json.loads((folder / "upcycle.json").read_text())
    manifest["files"]["/etc/passwd"] = {"bytes": 1, "sha256": "0" * 64}
    (folder / "upcycle.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="not a plain file name"):
        upcycle.load(folder)


@pytest.mark.parametrize("text", ["{", "[1, 2]", '{"files": [1]}', '{"files": {"model.safetensors": {"bytes": "x"}}}',
                                  "[" * 100000])
def test_damaged_manifest_is_one_line(outputs, tmp_path, text):
    folder = tmp_path / "f"
    shutil.copytree(outputs / "native", folder)
    (folder / "upcycle.json").write_text(text)
    with pytest.raises(ModelError) as info:
        upcycle.load(folder)
    assert "upcycle.json" in str(info.value) and len(str(info.value).splitlines()) == 1


def test_folder_without_manifest_is_not_an_upcycle_output(outputs, tmp_path):
    folder = tmp_path / "f"
    shutil.copytree(outputs / "native", folder)
    (folder / "upcycle.json").unlink()
    with pytest.raises(ModelError, match="no upcycle.json; not an upcycle output folder"):
        upcycle.load(folder)


def test_trainer_files_beside_a_save_pretrained_are_ignored(outputs, tmp_path):
    """Trainer writes optimizer.pt, trainer_state.json, ... after save_pretrained: not in the manifest,
    not read by load, so they do not stop it; the files load reads are all checked."""
    folder = tmp_path / "ckpt"
    shutil.copytree(outputs / "pretrained", folder)
    (folder / "optimizer.pt").write_bytes(b"\x00" * 100)
    (folder / "trainer_state.json").write_text("{}")
    assert isinstance(upcycle.load(folder).model.layers[1].mlp, MoELayer)


def test_hashing_is_cheap(tmp_path):
    """The check costs little: sha256 with read-ahead hashes over 200 MB per CPU-second (measured in
    CPU time, so a busy machine does not fail it; 1.3-1.8 GB/s on an idle core here)."""
    import hashlib
    import time

    from upcycle.runtime.checksums import sha256_file

    f = tmp_path / "big"
    f.write_bytes(torch.randint(0, 255, (64 << 20,), dtype=torch.uint8).numpy().tobytes())
    t0 = time.process_time()
    size, digest = sha256_file(f)
    cpu = time.process_time() - t0
    assert size == 64 << 20 and digest == hashlib.sha256(f.read_bytes()).hexdigest()
    assert size / cpu > 200e6, f"{size / cpu / 1e6:.0f} MB per CPU-second"


# ---- upcycle-export-run inputs -------------------------------------------------------------------

@pytest.fixture
def run_folder(tmp_path):
    from transformers import LlamaForCausalLM

    from upcycle.specs import load_spec

    torch.manual_seed(0)
    cfg = llama_config()
    moe = upcycle.compile_upcycle(LlamaForCausalLM(cfg).eval(), "e8g1t2")
    return write_run_folder(tmp_path / "run", moe, load_spec("e8g1t2").to_dict(), cfg)


def _export(capsys, run_dir, out):
    from upcycle.compiler.export_run import main

    capsys.readouterr()
    rc = main([str(run_dir), "-o", str(out)])
    return rc, capsys.readouterr().err


def test_export_run_checks_the_checkpoint(run_folder, tmp_path, capsys):
    ckpt = run_folder / "checkpoints" / "step-000001"
    assert (ckpt / "checksums.json").is_file()
    rc, err = _export(capsys, run_folder, tmp_path / "ok")
    assert rc == 0, err
    data = next(ckpt.glob("*.distcp"))
    _flip(data, at=len(data.read_bytes()) // 2)
    before = snapshot(run_folder)
    rc, err = _export(capsys, run_folder, tmp_path / "bad")
    check_refusal(rc, err, needle=[str(data), "sha256", "checksums.json"], prog="upcycle-export-run",
                  out=tmp_path / "bad")
    assert snapshot(run_folder) == before


def test_export_run_checks_the_upcycled_folder_it_started_from(outputs, tmp_path, capsys):
    """A run that started from an upcycle output (source kind 'upcycled') rebuilds from that folder:
    damaged, it is refused by the same integrity check as upcycle.load."""
    src = tmp_path / "start"
    shutil.copytree(outputs / "native", src)
    model = upcycle.load(src)
    from upcycle.runtime.train_checkpoint import save_training_checkpoint

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"source": {"kind": "upcycled", "path": str(src)}}))
    save_training_checkpoint(run_dir / "checkpoints" / "step-000001", model, torch.optim.SGD(model.parameters(), lr=0.1),
                             step=1, data_position=0)
    rc, err = _export(capsys, run_dir, tmp_path / "ok")
    assert rc == 0, err
    _flip(src / "model.safetensors")
    rc, err = _export(capsys, run_dir, tmp_path / "bad")
    check_refusal(rc, err, needle=[str(src / "model.safetensors"), "sha256"], prog="upcycle-export-run",
                  out=tmp_path / "bad")


def test_old_checkpoints_without_checksums_still_export(run_folder, tmp_path, capsys):
    (run_folder / "checkpoints" / "step-000001" / "checksums.json").unlink()
    rc, err = _export(capsys, run_folder, tmp_path / "o")
    assert rc == 0, err
    assert entries(tmp_path / "o") >= {"model.safetensors", "upcycle.json"}
