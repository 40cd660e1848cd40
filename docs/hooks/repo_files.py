"""MkDocs hook: publish a few repository files that live outside docs/ (a published run's plot) in the site.

The files stay where the repository keeps them (results/ is checked by tests/test_results.py), so the docs show
the same image as the README without a copy that could drift. A missing file fails the build.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

# site path (what pages link to, relative to docs/) -> repository path (relative to the folder of mkdocs.yml)
REPO_FILES = {
    "assets/smollm2-alpaca/loss_curve.png": "results/smollm2-alpaca/seed42/loss_curve.png",
    "assets/smollm2-r-sweep/sweep.html": "results/smollm2-r-sweep/sweep.html",
}


def on_files(files, config):
    root = Path(config.config_file_path).resolve().parent
    for site_path, repo_path in REPO_FILES.items():
        source = root / repo_path
        if not source.is_file():
            raise FileNotFoundError(f"docs: {repo_path} (published as {site_path}) is missing")
        files.append(File.generated(config, site_path, abs_src_path=str(source)))
    return files
