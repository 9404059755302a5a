"""What the notebooks share: read results, write LaTeX tables and figures.

Data flows one way: results/<device>/* -> notebooks/*.ipynb -> paper/tables/<id>.tex and
figures/<name>.pdf/.png. Nothing in the outputs is typed by hand; `make figures` rebuilds them.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "results"
TABLES = REPO / "paper" / "tables"
FIGURES = REPO / "figures"

# Display names, in the order tables and figures show them (by size)
MODELS = {"mixtral_8x7b": "Mixtral-8x7B", "qwen2_57b_a14b": "Qwen2-57B-A14B", "deepseek_v3": "DeepSeek-V3"}
DASH = "---"  # LaTeX em dash: nothing was measured in this cell


# The latest full test suite on the H100 as JUnit files of the same code (one file since the interpreter-only smoke
# tests are skipped on the GPU; a run stopped at a call's time limit would be continued by gpu_session.sh's
# TEST_RESUME into a second file, listed here too)
GPU_FULL_SUITE = [RESULTS / "NVIDIA_H100_80GB_HBM3" / "junit_cuda_full.xml"]
# Tests no part finished, and why (the notebooks check that none of them has a record there)
GPU_FULL_SUITE_UNFINISHED: dict[str, str] = {}


def junit_testcases(paths):
    """The <testcase> elements of one suite's JUnit files, in order, tests only. Left out: empty records without a
    name (pytest-xdist writes them), and pytest's own "internal" error where it is the interrupt of a run stopped
    at its time limit; any other internal error stops the caller."""
    import xml.etree.ElementTree as ET
    for path in paths:
        for case in ET.parse(path).getroot().iter("testcase"):
            if not case.get("name"):
                assert not len(case), f"{rel(path)}: a test record without a name has contents"
                continue
            if (case.get("classname"), case.get("name")) == ("pytest", "internal"):
                text = "".join(e.text or "" for e in case)
                assert "KeyboardInterrupt" in text, f"{rel(path)}: pytest's internal error is not the time limit's interrupt"
                continue
            yield case


def model_order(name: str):
    """Sort key: the models of MODELS in its order, any other after them."""
    return (list(MODELS).index(name), "") if name in MODELS else (len(MODELS), name)


def rel(path) -> str:
    """A path as the repository names it (for captions and file headers)."""
    return Path(path).resolve().relative_to(REPO).as_posix()


def load_jsonl(path) -> pd.DataFrame:
    """One row per JSON line. Not pd.read_json: it would turn dates and "13.0" into other types."""
    with open(path) as f:
        return pd.DataFrame([json.loads(line) for line in f if line.strip()])


_TEX = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": "$<$", ">": "$>$"}


def tex(s) -> str:
    """Plain text for LaTeX: escape what it treats specially (< and > too: OT1 fonts print them as ¡ ¿)."""
    return "".join(_TEX.get(c, c) for c in str(s))


def fmt(x, sig: int = 3) -> str:
    """`sig` significant digits in fixed point (0.187, 2.15, 21.1, 86.7); missing -> dash."""
    if x is None or not math.isfinite(x):
        return DASH
    decimals = max(0, sig - 1 - math.floor(math.log10(abs(x)))) if x else 0
    return f"{x:.{decimals}f}"


def fmt_ratio(x) -> str:
    """Speedups and ratios: two decimals, so a column lines up."""
    return DASH if x is None or not math.isfinite(x) else f"{x:.2f}"


def geomean(s: pd.Series) -> float:
    s = s.dropna()
    return float(math.exp(s.map(math.log).mean())) if len(s) else float("nan")


def _t_set(ts, all_ts) -> str:
    """T values as a range when they are a contiguous run of the sweep, else listed."""
    ts, all_ts = sorted(ts), sorted(all_ts)
    i = all_ts.index(ts[0])
    if len(ts) == 1:
        return f"$T={ts[0]}$"
    if all_ts[i:i + len(ts)] == ts:
        return f"$T={ts[0]}$--${ts[-1]}$"
    return "$T \\in \\{" + ",".join(map(str, ts)) + "\\}$"


def provenance(df: pd.DataFrame, by: str = "model") -> str:
    """Caption text naming where rows come from: device, software, and each commit with the
    (model, T) it measured (a rerun replaces only the rows it measured, so commits mix).
    ``by="E"``: rows of one model's shape at several expert counts (the skew experiment)."""
    def one(col):
        return ", ".join(tex(v) for v in sorted(df[col].astype(str).unique()))

    def names(keys):
        if set(keys) == set(df[by]):
            return "all models" if by == "model" else f"every ${by}$"
        if by == "model":
            return ", ".join(MODELS.get(m, tex(m)) for m in sorted(keys, key=model_order))
        return f"${by}=" + ", ".join(str(k) for k in sorted(keys)) + "$"

    all_ts = set(df["T"])
    commits = []
    for commit, g in df.sort_values("date").groupby("commit", sort=False):
        by_ts = {}  # keys (models, or E) that share the same T values under this commit
        for key, gk in g.groupby(by):
            by_ts.setdefault(tuple(sorted(set(gk["T"]))), []).append(key)
        parts = [f"{_t_set(ts, all_ts)} of {names(keys)}" for ts, keys in by_ts.items()]
        commits.append(f"\\texttt{{{commit[:7]}}} ({'; '.join(parts)})")
    dates = pd.to_datetime(df["date"], utc=True)
    if dates.min().date() == dates.max().date():
        when = f"{dates.min():%Y-%m-%d}, {dates.min():%H:%M}--{dates.max():%H:%M} UTC"
    else:
        when = f"{dates.min():%Y-%m-%d %H:%M} to {dates.max():%Y-%m-%d %H:%M} UTC"
    dirty = " (some rows from a tree with uncommitted changes)" if df.get("dirty", pd.Series([False])).any() else ""
    gpu = ", ".join(sorted(df["device"].str.replace("_", " ").unique()))  # results/ dirs use _ for spaces
    return (f"{gpu} (driver {one('driver')}, CUDA {one('cuda')}), "
            f"torch {one('torch')}, Triton {one('triton')}; "
            f"commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}{dirty}; measured {when}.")


def write_table(name: str, head: list, groups: dict, caption: str, colspec: str, source: str,
                notes: str | None = None) -> Path:
    """paper/tables/<name>.tex: a booktabs table. `head` and each group's rows are lists of
    cells (joined with &) or raw LaTeX lines (e.g. a \\cmidrule); a non-empty group title
    becomes an italic line spanning the table."""
    ncol = max(len(r) for r in head if not isinstance(r, str))

    def line(r):
        return r if isinstance(r, str) else " & ".join(r) + r" \\"

    out = [f"% Generated by {source} from the committed results; do not edit (make figures rebuilds it).",
           r"% Needs \usepackage{booktabs}.",
           r"\begin{table}[tbp]", r"\centering", r"\small",
           rf"\caption{{{caption}}}", rf"\label{{tab:{name}}}",
           rf"\begin{{tabular}}{{{colspec}}}", r"\toprule", *map(line, head), r"\midrule"]
    for i, (title, rows) in enumerate(groups.items()):
        if i:
            out.append(r"\midrule")
        if title:
            out.append(rf"\multicolumn{{{ncol}}}{{@{{}}l}}{{\textit{{{title}}}}} \\")
        out += map(line, rows)
    out += [r"\bottomrule", r"\end{tabular}"]
    if notes:
        out += [r"\par\smallskip", rf"\parbox{{\linewidth}}{{\footnotesize {notes}}}"]
    out.append(r"\end{table}")
    TABLES.mkdir(parents=True, exist_ok=True)
    path = TABLES / f"{name}.tex"
    path.write_text("\n".join(out) + "\n")
    return path


def save_figure(fig, name: str) -> list[Path]:
    """figures/<name>.pdf (for the paper) and .png (for GitHub). No creation date in the PDF,
    so rebuilding unchanged data leaves the files unchanged."""
    FIGURES.mkdir(exist_ok=True)
    paths = [FIGURES / f"{name}.pdf", FIGURES / f"{name}.png"]
    fig.savefig(paths[0], bbox_inches="tight", metadata={"CreationDate": None})
    fig.savefig(paths[1], bbox_inches="tight", dpi=200)
    return paths


def write_macros(name: str, macros: dict, source: str) -> Path:
    """paper/generated/<name>.tex: one \\newcommand per entry, so the paper's prose quotes
    numbers without typing them. Names must be letters only (TeX control words); values are
    written as given (escape them with `tex` first where needed)."""
    import re
    out = [f"% Generated by {source} from the committed results; do not edit (make figures rebuilds it)."]
    for key, value in macros.items():
        if not re.fullmatch(r"[A-Za-z]+", key):
            raise ValueError(f"macro name {key!r}: letters only")
        out.append(f"\\newcommand{{\\{key}}}{{{value}}}")
    path = REPO / "paper" / "generated" / f"{name}.tex"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n")
    return path
