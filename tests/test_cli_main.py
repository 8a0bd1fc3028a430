"""The top-level command: version text and a fast start without torch."""

from __future__ import annotations

import subprocess
import sys

from instructune.cli.main import main


def test_version_names_instructune_torch_and_platform(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("instructune 0.1.0 (torch 2.")
    assert "Python 3." in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: instructune" in capsys.readouterr().out


def test_help_does_not_import_torch_or_transformers():
    code = (
        "import sys\n"
        "from instructune.cli.main import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "finetune" in result.stdout or "data" in result.stdout
