import stat
import subprocess
import sys

import pytest
import requests

from tutorial_api.class_keys import class_keys
from tutorial_api.cli import main
from tutorial_api.settings import Settings
from tutorial_api.web.access import keys_from

URL = "http://192.168.1.23:6006"


def make_keys(*arguments):
    return subprocess.run(
        [sys.executable, "-m", "tutorial_api", "keys", *arguments],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_keys_writes_a_key_file_and_prints_the_student_sheet(tmp_path):
    key_file = tmp_path / "class-keys.txt"
    result = make_keys("12", "--prefix", "group", "--file", str(key_file), "--url", URL)
    assert result.returncode == 0, result.stderr
    entries = [line for line in key_file.read_text().splitlines() if not line.startswith("#")]
    names = [entry.split(":", 1)[0] for entry in entries]
    secrets = [entry.split(":", 1)[1] for entry in entries]
    assert names == [f"group{n:02d}" for n in range(1, 13)]
    assert len(set(secrets)) == 12 and min(map(len, secrets)) >= 20
    sheet = (
        result.stdout.splitlines()
    )  # only the sheet on stdout, so `> sheet.txt` keeps just the students' lines
    assert [line.split() for line in sheet] == [
        [name, URL, secret] for name, secret in zip(names, secrets, strict=True)
    ]
    assert f"--api-key-file {key_file}" in result.stderr
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600  # it holds every student's key


def test_the_server_accepts_the_written_file(tmp_path, serve):
    key_file = tmp_path / "class-keys.txt"
    main(["keys", "3", "--file", str(key_file)])
    keys = keys_from(Settings(api_key_file=key_file))
    assert [key.name for key in keys] == ["student01", "student02", "student03"]
    server = serve(api_key_file=key_file)
    for key in keys:
        answer = requests.post(
            server.url,
            json={"prompt": "hi", "max_length": 40},
            headers={"Authorization": f"Bearer {key.secret}"},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
    assert (
        requests.post(
            server.url,
            json={"prompt": "hi"},
            headers={"Authorization": "Bearer student01"},
            timeout=60,
        ).status_code
        == 401
    )


def test_an_existing_key_file_is_kept_unless_forced(tmp_path, capsys):
    key_file = tmp_path / "class-keys.txt"
    key_file.write_text("teacher:handed-out-already\n")
    with pytest.raises(SystemExit, match="already exists.*--force"):
        main(["keys", "5", "--file", str(key_file)])
    assert key_file.read_text() == "teacher:handed-out-already\n" and not capsys.readouterr().out
    main(["keys", "5", "--file", str(key_file), "--force"])
    assert [key.name for key in keys_from(Settings(api_key_file=key_file))] == [
        f"student0{n}" for n in range(1, 6)
    ]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["0"], "count: ask for at least one key"),
        (["3", "--prefix", "class a:"], "prefix: 'class a:' must be letters"),
        (["3", "--file", "no-such-folder/keys.txt"], "Cannot make the keys: .*No such file"),
    ],
    ids=["no-keys", "prefix-with-colon", "missing-folder"],
)
def test_bad_arguments_stop_with_a_message_naming_them(tmp_path, monkeypatch, arguments, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=message):
        main(["keys", *arguments])
    assert not list(tmp_path.iterdir())


def test_the_names_keep_their_order_past_99_students():
    names = [key.name for key in class_keys(120, "s")]
    assert names[0] == "s001" and names[-1] == "s120" and names == sorted(names)
