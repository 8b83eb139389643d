"""The documentation cannot go stale silently: every repository path it names exists, every link and anchor
leads somewhere, and every command it offers composes and passes the settings check.

What counts as a repository path: a word (in prose, code or a YAML comment) whose first segment is one of the
repository's top-level entries (`mvtec_seg/...`, `tests/...`, `benchmarks/...`, `docs/...`, `tools/...`,
`Makefile`, ...), after stripping Markdown punctuation; `<placeholders>` are skipped and a `*` is a glob that
must match. Run-folder, cache and user paths (`outputs/...`, `/data/mvtec`, `checkpoints/best.ckpt`) start
with no top-level entry and are not checked. Relative Markdown link targets are checked against the linking
file's folder, with their `#anchor` against the target's headings.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from conftest import compose_cfg

from mvtec_seg.cli import arg_types, command_args, compose_command

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted(
    [
        ROOT / "README.md",
        ROOT / "CHANGELOG.md",
        ROOT / "benchmarks" / "README.md",
        *(ROOT / "docs").glob("*.md"),
    ]
)
YAMLS = sorted((ROOT / "mvtec_seg" / "conf").rglob("*.yaml"))
TOP = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")} - {"outputs", "multirun", "shared"}
PATHLIKE = re.compile(r"[\w.*/-]+")
LINK = re.compile(r"\]\(([^)\s]+)\)")
COMMAND = re.compile(r"python -m (mvtec_seg(?:\.\w+)?)((?:[ \t]+[^\s`|#]+)*)")


def _words(text: str) -> set[str]:
    return {w.strip(".,;:") for w in PATHLIKE.findall(text)}


def _repo_paths(text: str) -> set[str]:
    """The words of `text` that name a repository path (see the module docstring)."""
    return {w for w in _words(text) if "/" in w and w.split("/")[0] in TOP or w in TOP - {"LICENSE"}}


def _exists(path: str) -> bool:
    return any(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()


def _yaml_comments(path: Path) -> str:
    return "\n".join(line.split("#", 1)[1] for line in path.read_text().splitlines() if "#" in line)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


@pytest.mark.parametrize("path", [*DOCS, *YAMLS], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_repository_path_named_exists(path: Path) -> None:
    text = _yaml_comments(path) if path.suffix == ".yaml" else path.read_text()
    missing = sorted(p for p in _repo_paths(text) if not _exists(p))
    assert not missing, f"{path.relative_to(ROOT)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_anchor_leads_somewhere(path: Path) -> None:
    for target in LINK.findall(path.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{path.relative_to(ROOT)}: link to {target} leads nowhere"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), (
                f"{path.relative_to(ROOT)}: no heading #{anchor} in {file or path.name}"
            )


def test_the_path_rule_catches_a_removed_file() -> None:
    """The rule sees paths in prose, code and comments, and skips user and run-folder paths."""
    text = "see benchmarks/gpu_transfusion.sh, `mvtec_seg/conf/mask/pseudo.yaml`; outputs/x /data/mvtec `best.ckpt`"
    assert _repo_paths(text) == {"benchmarks/gpu_transfusion.sh", "mvtec_seg/conf/mask/pseudo.yaml"}
    assert not _exists("benchmarks/gpu_transfusion.sh") and _exists("mvtec_seg/conf/category/visa/*.yaml")


# --- the commands the docs offer ----------------------------------------------------------------------------


def _commands() -> list[tuple[str, str, list[str]]]:
    """(where, module, key=value overrides) of every `python -m mvtec_seg...` in the docs. Values that name
    the user's files or folders (absolute paths, `<placeholders>`, shell variables) and Hydra's own settings
    are left out: they need data or a launcher, not the settings check."""
    found = []
    for path in DOCS:
        if path.name == "CHANGELOG.md":
            continue
        text = path.read_text().replace("\\\n", " ")
        for module, args in COMMAND.findall(text):
            if "--config-dir" in args:
                continue  # composes the user's own folder
            tokens = [t.strip("[]") for t in shlex.split(args, comments=True)]
            overrides = [
                t
                for t in tokens
                if "=" in t
                and not t.startswith(("hydra", "-"))
                and not re.search(r"<|\$|\.\.\.|=/|glob\(", t)
            ]
            for job in _sweep_jobs(overrides) if "-m" in tokens else [overrides]:
                found.append((f"{path.relative_to(ROOT)}: {module} {' '.join(job)}", module, job))
    return found


def _sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """A multirun's jobs, each value of a comma list once (the first values, then one change at a time)."""
    values = [(o.split("=", 1)[0], o.split("=", 1)[1].split(",")) for o in overrides]
    base = [f"{k}={v[0]}" for k, v in values]
    jobs = [base]
    for i, (key, options) in enumerate(values):
        jobs += [[*base[:i], f"{key}={v}", *base[i + 1 :]] for v in options[1:]]
    return jobs


COMMANDS = _commands()


def test_the_docs_offer_commands() -> None:
    modules = {m for _, m, _ in COMMANDS}
    assert {
        "mvtec_seg",
        "mvtec_seg.compare",
        "mvtec_seg.predict",
        "mvtec_seg.export",
        "mvtec_seg.report",
    } <= modules
    assert any("mask=pseudo" in o for _, _, o in COMMANDS)


@pytest.mark.parametrize(("where", "module", "overrides"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_offered_setting_passes_the_check(
    tmp_path, where: str, module: str, overrides: list[str]
) -> None:
    """Each command composes and its settings pass the check a run starts with (on a CPU: a GPU trainer is
    checked with the CPU accelerator)."""
    from mvtec_seg import export, predict
    from mvtec_seg.report import build
    from mvtec_seg.train import check_config

    command = module.rpartition(".")[2]
    if command in ("predict", "export", "report"):
        fn = {"predict": predict.predict, "export": export.export_onnx, "report": build.build_report}[command]
        cfg = compose_command(command, overrides)
        assert set(command_args(cfg, fn)) == set(arg_types(cfg, fn))
        return
    cpu = ["trainer.accelerator=cpu"] if any(o.startswith("trainer=") for o in overrides) else []
    if command == "compare" and not any(o.startswith("experiment=") for o in overrides):
        overrides = [*overrides, "mask=pseudo"]  # the comparison's PSEUDO job: the widest set of settings
    settings = check_config(compose_cfg(tmp_path, [*overrides, *cpu]))
    for override in overrides:
        key, value = override.split("=", 1)
        if "." in key and key in settings:
            assert str(settings[key]) == value or value in ("true", "false"), (where, override)


INLINE = re.compile(r"`([a-z_]+(?:\.[a-z_0-9]+)+)=([^`\s]+)`")
REFUSED_ON_PURPOSE = "robustness.md"  # its table shows the values that are refused, and what each says
NEEDS = {"mask.select=auto": ["mask.candidates=[{rounds: 0}]"]}  # a setting offered with its companion
SOURCE_OF = {"mask.gt_images": "mask=mixed"}  # a setting only some mask sources have: checked under one
REFUSED = {
    "model.max_epochs=0",
    "trainer.max_epochs=0",
    "trainer.limit_train_batches=0",
}  # said to be refused


def _inline_settings() -> list[tuple[str, str]]:
    """(where, key=value) of every `dotted.key=value` in the docs' prose; `a|b` offers each; placeholders,
    paths and Python values are left out."""
    found = []
    for path in DOCS:
        if path.name in (REFUSED_ON_PURPOSE, "CHANGELOG.md"):
            continue
        for key, value in INLINE.findall(path.read_text()):
            if key.split(".")[0] in ("hydra", "logger", "compare") or re.search(r"^/|[<{$]|\.\.\.", value):
                continue
            found += [(f"{path.relative_to(ROOT)}: {key}={v}", f"{key}={v}") for v in value.split("|")]
    return sorted(set(found))


INLINE_SETTINGS = _inline_settings()


@pytest.mark.parametrize(("where", "override"), INLINE_SETTINGS, ids=[w for w, _ in INLINE_SETTINGS])
def test_every_setting_offered_in_prose_passes_the_check(tmp_path, where: str, override: str) -> None:
    """`mask.threshold.strategy=otsu` in a sentence is a value a user will type: it must be accepted (with
    mask=pseudo and TransFusion in use, where every mask and teacher setting applies; `mask.gt_images` with
    mask=mixed, which adds it), or refused where the docs say so."""
    from mvtec_seg.errors import UserError
    from mvtec_seg.train import check_config

    assert len(INLINE_SETTINGS) > 20
    source = SOURCE_OF.get(override.split("=", 1)[0], "mask=pseudo")
    cfg = compose_cfg(tmp_path, [source, override, *NEEDS.get(override, [])])
    if override in REFUSED:  # the docs say these are refused: hold them to it
        with pytest.raises(UserError, match="tested untrained"):
            check_config(cfg)
    else:
        check_config(cfg)
