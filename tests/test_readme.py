"""The README's Python examples run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.integration
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, capsys):
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})
    assert capsys.readouterr().out.strip()  # every example prints its result


def readme_commands() -> list[str]:
    """Every `longserve ...` command in the README's bash blocks (pipes and `&&` split, comments cut)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.splitlines():
            for part in re.split(r"\s*(?:\|(?!\|)|&&)\s*", line.split("  #")[0]):
                if part.startswith("longserve "):
                    commands.append(part.strip())
    return commands


def test_readme_commands_parse():
    """The README's command lines use flags the CLI really has (parsed, not run)."""
    import shlex

    from longserve.cli import build_parser

    commands = readme_commands()
    assert len(commands) >= 10
    parser = build_parser()
    for command in commands:
        try:
            parser.parse_args(shlex.split(command)[1:])
        except SystemExit:
            pytest.fail(f"README command does not parse: {command}")
