"""Benchmarks/soak.py, the teacher's rehearsal: its options, and short real runs against the tiny
model.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import soak  # noqa: E402
from serve_benchmark import free_port  # noqa: E402

from tutorial_api.class_keys import class_keys, write_key_file  # noqa: E402


@pytest.fixture
def class_server(serve, tmp_path):
    """the tiny model behind three students' keys, with short answers; its url and key file."""
    key_file = tmp_path / "class-keys.txt"
    write_key_file(key_file, class_keys(3))
    return serve(api_key_file=key_file, max_new_tokens=8).url, key_file


def test_defaults_start_a_server_for_32_students_for_a_minute():
    """The defaults start a server here, for 32 students, for a minute."""
    args = soak.parse_args([])
    assert (args.url, args.clients, args.duration, args.table, args.keys) == (
        None,
        32,
        60,
        False,
        [None],
    )


def test_keys_for_a_running_server_come_from_flags_or_file(tmp_path):
    """Keys for a running server come from the flags, then the key file."""
    key_file = tmp_path / "class-keys.txt"
    key_file.write_text("# the class\nstudent01:one\n\nstudent02:two\n")
    args = soak.parse_args(
        [
            "--url",
            "http://192.168.1.23:6006/",
            "--api-key",
            "teacher:zero",
            "--api-key-file",
            str(key_file),
        ]
    )
    assert args.url == "http://192.168.1.23:6006" and args.keys == ["zero", "one", "two"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--url", "192.168.1.23:6006"], "not a whole address: write it as http://"),
        (["--clients", "0"], "--clients: 0 is not above 0"),
        (["--clients", "many"], "--clients: invalid int value"),
        (["--duration", "-5"], "--duration: -5 is not above 0"),
        (
            ["--url", "http://h:6006", "--model", "tiny-qwen2"],
            "with --url the server's own settings apply",
        ),
        (["--api-key", "abc"], "are for a server given with --url"),
        (
            ["--url", "http://h:6006", "--api-key-file", "no-such-keys.txt"],
            "--api-key-file: .*no-such-keys.txt",
        ),
        (
            ["--url", "http://h:6006", "--api-key", "alice:"],
            "--api-key: API key number 1 \\(alice\\) is empty",
        ),
        (
            ["--table", "--clients", "30"],
            "with --table, --class-sizes and --asking set how many ask",
        ),
        (["--asking", "50"], "--class-sizes and --asking are for --table"),
        (["--table", "--asking", "150"], "--asking: 150 is not a percentage"),
    ],
    ids=[
        "bare-address",
        "no-clients",
        "clients-not-a-number",
        "negative-duration",
        "model-with-url",
        "key-without-url",
        "missing-key-file",
        "empty-key",
        "clients-with-table",
        "asking-without-table",
        "over-100-percent",
    ],
)
def test_bad_options_stop_with_a_message_naming_them(capsys, arguments, message):
    with pytest.raises(SystemExit) as stopped:
        soak.parse_args(arguments)
    assert stopped.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_missing_or_refusing_server_stops_the_rehearsal(class_server):
    """A server that is not there, or refuses the key, stops the rehearsal at once."""
    url, _ = class_server
    with pytest.raises(SystemExit, match="refused the key .*--api-key"):
        soak.main(["--url", url, "--api-key", "not-a-student"])
    nobody = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SystemExit, match=f"(?s)Cannot reach {nobody}.*Is the server running"):
        soak.main(["--url", nobody])


@pytest.mark.slow
def test_a_rehearsal_against_a_running_server_passes(class_server):
    """A rehearsal against a running server passes and says what happened."""
    url, key_file = class_server
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "soak.py"),
            "--url",
            url,
            "--api-key-file",
            str(key_file),
            "--clients",
            "3",
            "--duration",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"3 students for 4 s against {url} (tiny-qwen2):"
    answered = next(line for line in lines if line.split()[0] == "answered")
    assert int(answered.split()[1]) > 0 and "latency p50" in answered and "tokens/s" in answered
    assert (
        "FAIL" not in result.stdout
        and "PASS: no request lost, malformed or answered with a server error" in lines
    )


@pytest.mark.slow
def test_the_capacity_table_has_a_row_per_class_and_share(class_server, capsys):
    """The capacity table has a row for each class size and share."""
    url, key_file = class_server
    with pytest.raises(SystemExit) as finished:
        soak.main(
            [
                "--url",
                url,
                "--api-key-file",
                str(key_file),
                "--table",
                "--class-sizes",
                "2",
                "3",
                "--asking",
                "50",
                "100",
                "--duration",
                "1",
            ]
        )
    assert finished.value.code == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert table[0].startswith("| students | asking at once | answered |")
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]
    assert [(row[0], row[1]) for row in rows] == [("2", "1"), ("2", "2"), ("3", "2"), ("3", "3")]
    assert all(int(row[2]) > 0 and row[4] == "0" for row in rows)
