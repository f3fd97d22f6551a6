"""Safetensors checkpoints: exact round trips, refusal of damaged files, atomic saves, recovery, rotation, and
the legacy torch.save converter.
"""

from __future__ import annotations

import errno
import json
import os
import random

import numpy as np
import pytest
import torch
from safetensors import SafetensorError

from groundthink import convert_legacy
from groundthink.training import checkpoint as ck
from groundthink.training.checkpoint import (
    CheckpointError,
    capture_rng_state,
    find_last_good_checkpoint,
    link_checkpoint,
    load_checkpoint,
    remove_stale_temp_files,
    restore_rng_state,
    rotate_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from groundthink.training.lightning_io import SafetensorsCheckpointIO


class PickledOnly:
    """A custom class: torch.save can store it only through pickle."""

    def __init__(self) -> None:
        self.value = 3


def _trained_model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-2,
        betas=(0.9, 0.95),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    for _ in range(3):
        loss = model(torch.randn(5, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model, opt


def _assert_same(a, b, where="root"):
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}.{i}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _save_simple(directory, name, value: float, step: int):
    return save_checkpoint(directory, name, {"model.w": torch.full((3, 2), value)}, {"step": step})


def _training_checkpoint(model, opt, carried, rng) -> dict:
    """The nested dict Lightning hands the checkpoint IO, with what LMTrainingModule.on_save_checkpoint adds."""
    return {
        "global_step": 3,
        "state_dict": dict(model.state_dict()),
        "optimizer_states": [opt.state_dict()],
        "loops": {"fit_loop": {"epoch_progress": {"current": {"ready": 1, "completed": 0}}}},
        "carried_state": {"tensors": carried, "position": 96},
        "rng": rng,
        "groundthink": {"step": 3, "run_id": "abcd1234", "metrics": {"train/loss": float("nan")}},
    }


def test_full_training_state_round_trip_continues_identically(tmp_path):
    """The checkpoint IO every run uses: model, optimizer (tuples and int keys included), carried state, RNG and
    run metadata come back exactly, and training continues bit for bit."""
    model, opt = _trained_model_and_optimizer()
    carried = {"layers.0.rwkv.wkv": torch.randn(2, 1, 3, 3), "layers.0.rwkv.shift": torch.randn(2, 4)}
    random.seed(5)
    np.random.seed(5)
    checkpoint = _training_checkpoint(model, opt, carried, capture_rng_state())
    io = SafetensorsCheckpointIO()
    io.save_checkpoint(checkpoint, tmp_path / "last.safetensors")
    path = tmp_path / "last.safetensors"
    sidecar = json.loads((tmp_path / "last.json").read_text())
    assert sidecar["format_version"] == ck.FORMAT_VERSION and sidecar["step"] == 3 and sidecar["run_id"] == "abcd1234"
    assert sidecar["integrity"]["bytes"] == path.stat().st_size and len(sidecar["integrity"]["sha256"]) == 64
    expected = (torch.randn(4), np.random.rand(3), random.random())

    back = io.load_checkpoint(path)
    _assert_same(back["state_dict"], checkpoint["state_dict"])
    _assert_same(back["optimizer_states"], checkpoint["optimizer_states"])
    assert isinstance(back["optimizer_states"][0]["param_groups"][0]["betas"], tuple)
    _assert_same(back["carried_state"], checkpoint["carried_state"])
    assert back["groundthink"]["metrics"]["train/loss"] != back["groundthink"]["metrics"]["train/loss"]  # nan
    restore_rng_state(back["rng"])
    again = (torch.randn(4), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]

    model2, opt2 = _trained_model_and_optimizer(seed=1)
    model2.load_state_dict(back["state_dict"])
    opt2.load_state_dict(back["optimizer_states"][0])
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_last_is_a_hard_link_to_the_newest_step_and_verifies(tmp_path):
    """`last` costs no second copy of the tensors, and survives the rotation of the step file it links to."""
    _save_simple(tmp_path, "step_0000010", 1.0, 10)
    link_checkpoint(tmp_path, "step_0000010", "last")
    last = tmp_path / "last.safetensors"
    assert last.stat().st_ino == (tmp_path / "step_0000010.safetensors").stat().st_ino
    assert verify_checkpoint(last)["step"] == 10
    assert json.loads((tmp_path / "last.json").read_text())["integrity"]["file"] == "last.safetensors"
    _save_simple(tmp_path, "step_0000020", 2.0, 20)
    rotate_checkpoints(tmp_path, keep=1)
    assert not (tmp_path / "step_0000010.safetensors").exists()
    tensors, meta = load_checkpoint(last)
    assert meta["step"] == 10 and torch.equal(tensors["model.w"], torch.full((3, 2), 1.0))


def test_temp_files_of_killed_saves_are_removed_when_a_run_starts(tmp_path):
    _save_simple(tmp_path, "last", 1.0, 5)
    stale = [tmp_path / ".last.safetensors.tmp-1a2b3c4d", tmp_path / ".last.json.tmp-1a2b3c4d"]
    for p in stale:
        p.write_bytes(b"x" * 100)
    assert rotate_checkpoints(tmp_path, keep=3) == [] and all(p.exists() for p in stale)  # young: maybe in use
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(stale)
    assert not any(p.exists() for p in stale) and (tmp_path / "last.safetensors").exists()


def test_shared_and_non_contiguous_tensors_are_saved(tmp_path):
    w = torch.randn(4, 3)
    path = save_checkpoint(tmp_path, "tied", {"a": w, "b": w, "c": w.t(), "d": w[1:3]}, {})
    t, _ = load_checkpoint(path)
    assert torch.equal(t["a"], w) and torch.equal(t["b"], w) and torch.equal(t["c"], w.t())
    assert torch.equal(t["d"], w[1:3])


def test_reserved_or_non_json_meta_is_refused(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path, "x", {"a": torch.ones(1)}, {"integrity": 1})
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path, "x", {"a": torch.ones(1)}, {"obj": object()})
    assert not list(tmp_path.iterdir())


def _truncate(d):
    p = d / "last.safetensors"
    p.write_bytes(p.read_bytes()[:-7])


def _flip_byte(d):
    p = d / "last.safetensors"
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x01
    p.write_bytes(bytes(data))


def _drop_sidecar(d):
    (d / "last.json").unlink()


def _edit_sidecar_meta(d):
    p = d / "last.json"
    s = json.loads(p.read_text())
    s["step"] = 999
    p.write_text(json.dumps(s))


def _edit_sidecar_hash(d):
    p = d / "last.json"
    s = json.loads(p.read_text())
    s["integrity"]["sha256"] = "0" * 64
    p.write_text(json.dumps(s))


def _garble_sidecar(d):
    (d / "last.json").write_text("{not json")


def _garble_header(d):
    # A broken header with a sidecar that matches it: only the safetensors parse check can catch this.
    p = d / "last.safetensors"
    data = b"\xff" * 8 + p.read_bytes()[8:]
    p.write_bytes(data)
    s = json.loads((d / "last.json").read_text())
    import hashlib

    s["integrity"]["sha256"] = hashlib.sha256(data).hexdigest()
    (d / "last.json").write_text(json.dumps(s))


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (_truncate, "truncated"),
        (_flip_byte, "sha256"),
        (_drop_sidecar, "missing its sidecar"),
        (_edit_sidecar_meta, "tampered"),
        (_edit_sidecar_hash, "sha256"),
        (_garble_sidecar, "unreadable"),
        (_garble_header, "safetensors cannot parse"),
    ],
)
def test_damaged_checkpoint_is_refused_with_a_useful_message(tmp_path, damage, words):
    _save_simple(tmp_path, "step_0000010", 1.0, 10)
    _save_simple(tmp_path, "last", 2.0, 20)
    damage(tmp_path)
    for check in (load_checkpoint, ck.verify_checkpoint):
        with pytest.raises(CheckpointError) as err:
            check(tmp_path / "last.safetensors")
        msg = str(err.value)
        assert "last.safetensors" in msg and words in msg
        assert "step_0000010.safetensors" in msg  # tells the user what to use instead
    assert find_last_good_checkpoint(tmp_path) == tmp_path / "step_0000010.safetensors"


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_failure_while_writing_tensors_keeps_previous_checkpoint(tmp_path, monkeypatch):
    _save_simple(tmp_path, "last", 1.0, 1)
    before = sorted(p.name for p in tmp_path.iterdir())

    def dies_mid_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x10\x00\x00\x00partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_file", dies_mid_write)
    with pytest.raises(CheckpointError) as err:
        _save_simple(tmp_path, "last", 2.0, 2)
    msg = str(err.value)
    assert "last.safetensors" in msg and "disk is full" in msg and "intact" in msg
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary files left behind
    tensors, meta = load_checkpoint(tmp_path / "last.safetensors")
    assert meta["step"] == 1 and torch.equal(tensors["model.w"], torch.full((3, 2), 1.0))


def test_failure_between_the_two_renames_restores_previous_checkpoint(tmp_path, monkeypatch):
    _save_simple(tmp_path, "last", 1.0, 1)
    real_replace = os.replace

    def refuse_sidecar(src, dst):
        if str(dst).endswith(".json"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", refuse_sidecar)
    with pytest.raises(CheckpointError, match="read-only"):
        _save_simple(tmp_path, "last", 2.0, 2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.json", "last.safetensors"]
    tensors, meta = load_checkpoint(tmp_path / "last.safetensors")
    assert meta["step"] == 1 and torch.equal(tensors["model.w"], torch.full((3, 2), 1.0))


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (OSError(errno.EROFS, "Read-only file system"), "read-only"),
        (
            SafetensorError(
                'Error while serializing: I/O error: No space left on device (os error 28) at path "x"'
            ),
            "disk is full",
        ),
    ],
)
def test_unwritable_directory_gives_a_clear_error(tmp_path, monkeypatch, error, words):
    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(ck, "save_file", fails)
    with pytest.raises(CheckpointError) as err:
        _save_simple(tmp_path / "ckpt", "last", 1.0, 1)
    msg = str(err.value)
    assert str(tmp_path / "ckpt" / "last.safetensors") in msg and words in msg
    assert "paths.output_root" in msg
    assert list((tmp_path / "ckpt").iterdir()) == []


def test_checkpoint_folder_that_is_a_file_gives_a_clear_error(tmp_path):
    (tmp_path / "ckpt").write_text("not a folder")
    with pytest.raises(CheckpointError, match="could not write checkpoint"):
        _save_simple(tmp_path / "ckpt", "last", 1.0, 1)


def test_find_last_good_checkpoint_falls_back_over_steps(tmp_path):
    ckpt = tmp_path / "checkpoints"
    assert find_last_good_checkpoint(tmp_path) is None
    for step in (10, 20, 30):
        _save_simple(ckpt, f"step_{step:07d}", float(step), step)
    _save_simple(ckpt, "last", 20.0, 20)
    # step_30 was written but the process died before `last` was updated: step_30 is the newest good one.
    assert find_last_good_checkpoint(tmp_path) == ckpt / "step_0000030.safetensors"
    _save_simple(ckpt, "last", 30.0, 30)
    assert find_last_good_checkpoint(tmp_path) == ckpt / "last.safetensors"
    _truncate(ckpt)
    assert find_last_good_checkpoint(tmp_path) == ckpt / "step_0000030.safetensors"
    (ckpt / "step_0000030.json").unlink()
    assert find_last_good_checkpoint(ckpt) == ckpt / "step_0000020.safetensors"
    for step in (10, 20):
        (ckpt / f"step_{step:07d}.safetensors").write_bytes(b"junk")
    assert find_last_good_checkpoint(tmp_path) is None


def test_rotation_keeps_last_and_newest_k(tmp_path):
    for step in (100, 200, 300, 400, 500):
        _save_simple(tmp_path, f"step_{step:07d}", float(step), step)
    _save_simple(tmp_path, "last", 500.0, 500)
    stale = tmp_path / ".step_0000050.safetensors.tmp-deadbeef"
    stale.write_bytes(b"x")
    os.utime(stale, (0, 0))
    assert rotate_checkpoints(tmp_path, keep=-1) == []
    removed = rotate_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == [
        "step_0000300.safetensors",
        "step_0000200.safetensors",
        "step_0000100.safetensors",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "last.json",
        "last.safetensors",
        "step_0000400.json",
        "step_0000400.safetensors",
        "step_0000500.json",
        "step_0000500.safetensors",
    ]
    rotate_checkpoints(tmp_path, keep=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.json", "last.safetensors"]


def test_convert_legacy_raw_state_dict(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    src = tmp_path / "old.pt"
    torch.save(sd, src)
    out = convert_legacy.convert_legacy_checkpoint(src, tmp_path / "out")
    assert out == tmp_path / "out" / "old.safetensors"
    tensors, meta = load_checkpoint(out)
    assert set(tensors) == {"model.0.weight", "model.0.bias"}
    assert torch.equal(tensors["model.0.weight"], model[0].weight.detach())
    assert meta["converted_from"]["path"] == str(src.resolve())
    assert len(meta["converted_from"]["sha256"]) == 64 and meta["converted_from"]["stripped_prefixes"] == [
        "module."
    ]
    assert meta["kind"] == "weights" and meta["num_params"] == 8 and "git_sha" in meta["provenance"]


def test_convert_legacy_wrapped_state_dict_via_cli(tmp_path, capsys):
    sd = {"model.emb.weight": torch.randn(5, 2), "model.head.weight": torch.randn(5, 2)}
    src = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": sd, "epoch": 3, "hyper": {"lr": 0.1}, "optimizer": {"x": torch.ones(1)}}, src)
    assert convert_legacy.main([str(src), str(tmp_path / "out"), "--name", "imported"]) == 0
    tensors, meta = load_checkpoint(tmp_path / "out" / "imported.safetensors")
    assert set(tensors) == {"model.emb.weight", "model.head.weight"}
    assert meta["legacy_extra"] == {"epoch": 3, "hyper": {"lr": 0.1}}
    assert meta["legacy_dropped_keys"] == ["optimizer"]
    assert "imported.safetensors" in capsys.readouterr().out


def test_convert_legacy_refuses_pickled_objects(tmp_path, capsys):
    src = tmp_path / "pickled.pt"
    torch.save({"model": {"w": torch.ones(2)}, "extra": PickledOnly()}, src)
    with pytest.raises(convert_legacy.LegacyConversionError) as err:
        convert_legacy.convert_legacy_checkpoint(src, tmp_path / "out")
    msg = str(err.value)
    assert "PickledOnly" in msg and "refuses" in msg and "runs code" in msg
    assert not (tmp_path / "out").exists()
    assert convert_legacy.main([str(src), str(tmp_path / "out")]) == 1
    assert "refuses" in capsys.readouterr().err


def test_convert_legacy_without_a_state_dict_is_explained(tmp_path):
    src = tmp_path / "odd.pt"
    torch.save({"weights": [1, 2, 3]}, src)
    with pytest.raises(convert_legacy.LegacyConversionError, match="none of"):
        convert_legacy.convert_legacy_checkpoint(src, tmp_path / "out")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_and_cuda_rng_round_trip(tmp_path):
    torch.cuda.manual_seed_all(7)
    rng = capture_rng_state()
    assert len(rng["cuda"]) == torch.cuda.device_count()
    expected = torch.randn(3, device="cuda")
    io = SafetensorsCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.randn(2, 2, device="cuda")}, "rng": rng}, tmp_path / "last")
    back = io.load_checkpoint(tmp_path / "last.safetensors")
    restore_rng_state(back["rng"])
    assert torch.equal(torch.randn(3, device="cuda"), expected)
