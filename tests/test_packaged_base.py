"""`finetune get-base`'s checks without the model: what a second call verifies, what it refuses, and how the
test fixture behaves when the base cannot be had. The real install and conversion are in test_gemma3.py."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from finetune.packaged_base import GEMMA_3_270M, STAMP_NAME, BaseInstallError, _write_stamp, verify_folder


@pytest.fixture
def stamped(tmp_path):
    """A small folder stamped as get-base stamps a converted one."""
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "gemma3_text"}\n')
    (folder / "model.safetensors").write_bytes(b"\x00" * 1000)
    _write_stamp(folder, GEMMA_3_270M)
    return folder


def test_a_stamped_folder_verifies_and_its_files_are_owner_only(stamped):
    verify_folder(stamped, GEMMA_3_270M)
    stamp = json.loads((stamped / STAMP_NAME).read_text())
    assert sorted(stamp["files"]) == ["config.json", "model.safetensors"]
    assert stamp["gguf_sha256"] == GEMMA_3_270M.gguf_sha256
    assert "Gemma Terms of Use" in stamp["licence"]
    assert {p.stat().st_mode & 0o777 for p in stamped.iterdir()} == {0o600}


@pytest.mark.parametrize("damage, expected", [
    (lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 999 + b"\x01"), "model.safetensors differs"),
    (lambda f: (f / "config.json").unlink(), "config.json is missing"),
    (lambda f: (f / STAMP_NAME).write_text("{not json"), "is damaged"),
    (lambda f: (f / STAMP_NAME).unlink(), "was not made by get-base"),
    (lambda f: (f / STAMP_NAME).write_text(json.dumps({"files": {}, "gguf_sha256": "0" * 64})), "from another file"),
])
def test_a_damaged_folder_is_refused_naming_what_and_how_to_rebuild(stamped, damage, expected):
    damage(stamped)
    with pytest.raises(BaseInstallError, match=expected) as error:
        verify_folder(stamped, GEMMA_3_270M)
    assert f"get-base gemma-3-270m --out {stamped} --force" in str(error.value)


def test_get_base_refuses_a_folder_it_did_not_make_and_leaves_it_alone(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my own files")
    proc = run_cli("get-base", "gemma-3-270m", "--out", out)
    assert proc.returncode == 1
    assert f"error: {out} exists but was not made by get-base" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_the_fixture_fails_under_ci_and_skips_elsewhere_when_the_base_cannot_be_had(tmp_path, monkeypatch, ci, outcome):
    from tests.support.real_base import gemma_base_or_skip

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("BUNSHIN_CACHE", str(tmp_path / "file" / "cache"))  # under a file: cannot be created
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="Gemma 3 270M cannot be had: cannot create"):
        gemma_base_or_skip()


def test_the_conversion_parses_the_gguf_once_and_writes_what_transformers_alone_writes(tmp_path, monkeypatch):
    """get-base converts through transformers with one shared reader (packaged_base.one_gguf_reader): the same bytes
    as transformers' own three-reader path, on a tiny Gemma 3 file laid out as the real one."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from finetune.packaged_base import convert_gguf
    from tests.support.tiny_gguf import write_tiny_gemma3_gguf

    source = write_tiny_gemma3_gguf(tmp_path / "tiny.gguf")
    alone, shared = tmp_path / "alone", tmp_path / "shared"
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=source.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=source.name, local_files_only=True,
                                                 dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True))
    model.save_pretrained(str(alone))
    tokenizer.save_pretrained(str(alone))

    parsed = []
    parse = gguf.GGUFReader.__init__
    monkeypatch.setattr(gguf.GGUFReader, "__init__", lambda self, *a, **kw: (parsed.append(a), parse(self, *a, **kw))[1])
    shared.mkdir()
    convert_gguf(source, shared)
    assert len(parsed) == 1  # config, tokenizer and weights read from one parse of the header
    assert gguf.GGUFReader.__name__ == "GGUFReader"  # and the library is as it was after
    files = sorted(p.name for p in alone.iterdir())
    assert files == sorted(p.name for p in shared.iterdir()) and "model.safetensors" in files
    for name in files:
        assert (shared / name).read_bytes() == (alone / name).read_bytes(), name
