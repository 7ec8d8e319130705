"""privet installs one top-level package, so it cannot collide with a user's `server`,
`common`, `clients` or `experiments` package (Flower still loads the app from its folder)."""

import os
import subprocess
import sys
import zipfile

from privet.common.config import CONFIGS_DIR, PROJECT_DIR


def test_the_wheel_holds_one_top_level_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(tmp_path), str(PROJECT_DIR)], check=True)
    wheel = next(tmp_path.glob("privet-*.whl"))
    names = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {name for name in names if not name.endswith(".dist-info")} == {"privet"}
    assert "privet/common/data/adult/adult.data.gz" in zipfile.ZipFile(wheel).namelist()


def test_a_run_next_to_packages_named_like_privets_parts(tmp_path):
    """A user's folder holds packages named server, common, clients and experiments; privet
    runs a round there, and the user's packages stay theirs."""
    names = ("server", "common", "clients", "experiments")
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"MINE = {name!r}\n")
    out = tmp_path / "run"
    code = (f"import {', '.join(names)}\n"
            "import privet\n"
            f"run = privet.simulate({str(CONFIGS_DIR / 'tiny.toml')!r}, {{'rounds': 1}}, "
            f"out={str(out)!r})\n"
            f"import {', '.join(names)}\n"
            f"assert [m.MINE for m in ({', '.join(names)})] == {list(names)!r}\n"
            "print(run.summary['status'])\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "complete"
