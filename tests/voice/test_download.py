"""download-vosk-model against a real HTTP server on 127.0.0.1 serving zips made here."""

from __future__ import annotations

import functools
import hashlib
import re
import http.server
import threading
import zipfile

import pytest
from click.testing import CliRunner

from demos.voice_assistant.cli import main
from demos.voice_assistant.download import SMALL_EN_US, ModelArchive, download_vosk_model
from demos.voice_assistant.errors import DownloadError
from demos.voice_assistant.stt import vosk_model_problems

NAME = SMALL_EN_US.name
MODEL_FILES = {"am/final.mdl": b"acoustic", "conf/model.conf": b"--beam=10\n", "conf/mfcc.conf": b"",
               "graph/HCLr.fst": b"fst", "graph/Gr.fst": b"fst", "README": b"test model"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _zip(path, files, prefix=f"{NAME}/") -> str:
    with zipfile.ZipFile(path, "w") as archive:
        for rel, data in files.items():
            archive.writestr(prefix + rel, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_verifies_and_unpacks(server, tmp_path):
    root, url = server
    digest = _zip(root / "good.zip", MODEL_FILES)
    dest = tmp_path / "models"
    path = download_vosk_model(dest, ModelArchive(f"{url}/good.zip", digest, NAME), progress=False)
    assert path == dest / NAME
    assert vosk_model_problems(path) == []
    assert (path / "README").read_bytes() == b"test model"
    assert sorted(p.name for p in dest.iterdir()) == [NAME]  # no temporary files left
    again = download_vosk_model(dest, ModelArchive(f"{url}/missing.zip", digest, NAME), progress=False)
    assert again == path  # already there: no second download


def test_checksum_mismatch_is_a_clear_error_and_leaves_nothing(server, tmp_path):
    root, url = server
    digest = _zip(root / "tampered.zip", MODEL_FILES)
    dest = tmp_path / "models"
    dest.mkdir()
    wrong = "0" * 64
    with pytest.raises(DownloadError) as caught:
        download_vosk_model(dest, ModelArchive(f"{url}/tampered.zip", wrong, NAME), progress=False)
    message = str(caught.value)
    assert "checksum mismatch" in message and wrong in message and digest in message
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("case", ["404", "not-zip", "not-model", "unsafe"])
def test_bad_downloads_leave_nothing_behind(server, tmp_path, case):
    root, url = server
    name = f"{case}.zip"
    if case == "not-zip":
        (root / name).write_bytes(b"<html>not a zip</html>")
    elif case == "not-model":
        _zip(root / name, {"README": b"hello"})
    elif case == "unsafe":
        _zip(root / name, {"../../escape.txt": b"x", **MODEL_FILES})
    digest = hashlib.sha256((root / name).read_bytes()).hexdigest() if (root / name).exists() else "0" * 64
    dest = tmp_path / "models"
    with pytest.raises(DownloadError):
        download_vosk_model(dest, ModelArchive(f"{url}/{name}", digest, NAME), progress=False)
    assert not dest.exists()  # it did not exist before, so it must not exist now
    assert not (tmp_path / "escape.txt").exists()


def test_cli_command_uses_a_mirror_and_reports_mismatch_in_one_line(server, tmp_path):
    root, url = server
    digest = _zip(root / "cli.zip", MODEL_FILES)
    runner = CliRunner()
    ok = runner.invoke(main, ["download-vosk-model", "--dest", str(tmp_path / "a"), "--url", f"{url}/cli.zip",
                              "--sha256", digest])
    assert ok.exit_code == 0, ok.output
    assert "Vosk model ready" in ok.output and (tmp_path / "a" / NAME / "am" / "final.mdl").is_file()
    bad = runner.invoke(main, ["download-vosk-model", "--dest", str(tmp_path / "b"), "--url", f"{url}/cli.zip"])
    assert bad.exit_code == 1  # the pinned checksum of the real model does not match our test zip
    assert "checksum mismatch" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "b").exists()


def test_pinned_archive_fields_agree_with_each_other():
    """The archive unpacks to dest/NAME and must hold a top folder NAME: a URL bumped to another release without
    its name (or a checksum pasted in another format) would fail every download. (The real archive's bytes
    cannot be fetched here, so its checksum itself is not re-checked.)"""
    archive_file = SMALL_EN_US.url.rsplit("/", 1)[1]
    assert SMALL_EN_US.url.startswith("https://") and archive_file == SMALL_EN_US.name + ".zip"
    assert re.fullmatch(r"[0-9a-f]{64}", SMALL_EN_US.sha256)
