"""The README as a newcomer uses it: the two commands first, at most 15,000 characters, and every
```python block runs as written, in order, from a folder where `make demo` has run (here a small
demo with the same names)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_readme_is_short_and_starts_with_the_two_commands():
    assert len(README) <= 15_000
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    assert first_block.splitlines()[0].startswith("make demo") and "make test" in first_block
    for link in re.findall(
        r"\]\(((?:docs|saekit|data|benchmarks|results)/[^)#]+|DESIGN\.md)\)", README
    ):
        assert (ROOT / link).exists(), link


def test_every_python_block_runs_after_the_demo(tmp_path):
    demo = [
        sys.executable,
        "-m",
        "saekit",
        "demo",
        "--out",
        "runs/demo",
        "--tokens",
        "4000",
        "--calib-tokens",
        "1000",
        "--eval-tokens",
        "1500",
        "--train-tokens",
        "8192",
        "--batch-size",
        "256",
        "--ce-tokens",
        "256",
    ]
    r = subprocess.run(demo, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) >= 4
    script = tmp_path / "readme_examples.py"
    script.write_text("\n".join(blocks))
    r = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (
        "latents at resid_post.15" in r.stdout
        and "CE recovered" in r.stdout
        and "theta" in r.stdout
    )
    assert (tmp_path / "runs" / "my_sae" / "train_config.json").exists()
