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
    from mvtec_seg.preflight import check_config
    from mvtec_seg.report import build

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
NEEDS = {  # a setting offered with its companion
    "mask.select=auto": ["mask.candidates=[{rounds: 0}]"],
    "synthetic_val.enabled=false": ["mask.monitor=val/pixel_AP"],  # PSEUDO's checkpoint is chosen on it
}
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
    from mvtec_seg.preflight import check_config

    assert len(INLINE_SETTINGS) > 20
    source = SOURCE_OF.get(override.split("=", 1)[0], "mask=pseudo")
    cfg = compose_cfg(tmp_path, [source, override, *NEEDS.get(override, [])])
    if override in REFUSED:  # the docs say these are refused: hold them to it
        with pytest.raises(UserError, match="tested untrained"):
            check_config(cfg)
    else:
        check_config(cfg)


OFFERED_IN_COMMENT = re.compile(r"^(\s*)([a-z_]+):\s*([^#\s]*)\s*#\s*(.*)$")
VALUE = re.compile(r"^[A-Za-z0-9_./-]+$")
NOT_A_VALUE = {"a", "an", "the", "one"}
NEEDS_DATA = {"data.layout"}  # a layout reads the folder's files: its values are checked in test_layouts.py


def _offered_in_comments() -> list[tuple[str, str]]:
    """(where, key=value) of every value a conf comment offers for its setting: the alternatives of
    `key: value  # a | b (why) | c: ...` and the `e.g. X` of `key: null  # e.g. 128`."""
    found = []
    for path in sorted((ROOT / "mvtec_seg" / "conf").glob("*.yaml")) + sorted(
        (ROOT / "mvtec_seg" / "conf").glob("[mt]*/*.yaml")
    ):
        group = path.parent.name if path.parent.name in ("mask", "teacher", "model") else ""
        parents: list[tuple[int, str]] = []
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            bare = re.match(r"^(\s*)([a-z_]+):\s*(#.*)?$", line)
            m = OFFERED_IN_COMMENT.match(line)
            if bare:  # a node: the parent of the settings indented under it
                indent = len(bare.group(1))
                parents = [p for p in parents if p[0] < indent] + [(indent, bare.group(2))]
            if not m or not m.group(3):
                continue
            indent, key, _, comment = len(m.group(1)), m.group(2), m.group(3), m.group(4)
            parents = [p for p in parents if p[0] < indent]
            dotted = ".".join([*([group] if group else []), *(p[1] for p in parents), key])
            if dotted.startswith("teacher.") and "teacher" in dotted[8:]:
                continue
            offered: list[str] = []
            if key == "monitor":  # the metrics named in the comment and its continuation lines
                follow = [ln for ln in lines[i + 1 : i + 3] if ln.strip().startswith("#")]
                offered = re.findall(r"val/\w+", " ".join([comment, *follow]))
            elif "|" in comment:
                offered = [seg.strip().split(" ")[0].rstrip(":") for seg in comment.split("|")]
            elif comment.startswith("e.g. "):
                offered = [comment[5:].split(" ")[0].rstrip(":,;")]
            for value in offered:
                if VALUE.match(value) and value not in NOT_A_VALUE and dotted not in NEEDS_DATA:
                    found.append((f"{path.relative_to(ROOT)}: {dotted}={value}", f"{dotted}={value}"))
    return sorted(set(found))


OFFERED_IN_COMMENTS = _offered_in_comments()


def test_the_conf_comments_offer_values() -> None:
    """The reader of the comment parser: it finds the alternatives the mask and data settings offer."""
    offered = {o for _, o in OFFERED_IN_COMMENTS}
    assert {
        "mask.threshold.strategy=otsu",
        "mask.gate.strategy=separation",
        "mask.target=soft",
        "evaluation.resolution=native",
        "data.train_crop=128",
        "mask.monitor=val/synthetic_pixel_AUPRO",
    } <= offered


@pytest.mark.parametrize(("where", "override"), OFFERED_IN_COMMENTS, ids=[w for w, _ in OFFERED_IN_COMMENTS])
def test_every_value_a_conf_comment_offers_passes_the_check(tmp_path, where: str, override: str) -> None:
    """A value a config file's comment offers is one a user will type: it passes the settings check (with
    mask=pseudo and TransFusion in use, where every mask and teacher setting applies)."""
    from mvtec_seg.preflight import check_config

    check_config(compose_cfg(tmp_path, ["mask=pseudo", override, *NEEDS.get(override, [])]))
