"""The HTML contact sheet of a run folder: one row per round, one column per frame, and the
story world's consistency table when the story is a story-world story.

Written by ``python -m pipelines.story_iter`` after every round; the studio links to it.
"""
from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any, Dict, List

from .run_folder import atomic_write_bytes
from .world.metrics import round_metrics

__all__ = ["write_index_html", "world_metrics_html"]


def world_metrics_html(out: Path, manifest: Dict[str, Any]) -> str:
    """Consistency metrics per finished round (a table), when the run's story is a story-world
    story (prompts in the world's grammar, file on disk); else the empty string."""
    scores = round_metrics(out, manifest)
    if not scores:
        return ""

    def f(x):
        return "n/a" if x is None else f"{x:.3f}"

    rows = "".join(
        f"<tr><th>round {r}</th><td>{f(s['identity_cross'])}</td>"
        f"<td>{f(s['identity_cross_all'])}</td><td>{f(s['identity_self'])}</td>"
        f"<td>{f(s['prompt_adherence'])}</td><td>{f(s['copy_paste'])}</td></tr>"
        for r, s in sorted(scores.items()))
    return ("<h2>Consistency (story-world reader)</h2><table><tr><th></th><th>identity-cross</th>"
            "<th>all 4 attributes</th><th>identity-self</th><th>prompt adherence</th>"
            f"<th>copy-paste</th></tr>{rows}</table>"
            "<p><small>identity-cross: attributes equal to the character's reference (chance "
            "0.26); identity-self: agreement of a character with itself across frames; "
            "adherence: scene, count, slot and size as prompted.</small></p>")


def write_index_html(out: Path, manifest: Dict[str, Any]) -> None:
    """Contact sheet: one row per round, one column per frame; missing frames are blank."""
    out = Path(out)
    cfg = manifest["config"]
    n_frames = cfg["frames"]
    n_rounds = cfg["rounds"] + 1
    prompts: List[str] = manifest.get("prompts", [""] * n_frames)
    rounds = {int(k): v for k, v in manifest.get("rounds", {}).items()}
    thumb = 96
    rows = []
    head = "".join(f'<th title="{html.escape(prompts[i])}">{i}</th>' for i in range(n_frames))
    rows.append(f"<tr><th>round</th>{head}</tr>")
    for r in range(n_rounds):
        st = rounds.get(r, {})
        label = f"round {r}"
        if st.get("scale") is not None:
            label += f"<br><small>scale {st['scale']:.3f}</small>"
        if "wall_s" in st:
            label += f"<br><small>{st['wall_s']:.1f} s</small>"
        cells = []
        for i in range(n_frames):
            rel = f"round_{r:02d}/frame_{i:03d}.png"
            if (out / rel).is_file():
                cells.append(f'<td><a href="{rel}"><img src="{rel}" width="{thumb}" '
                             f'height="{thumb}" loading="lazy" title="{html.escape(prompts[i])}">'
                             "</a></td>")
            else:
                cells.append("<td class=missing></td>")
        rows.append(f"<tr><th>{label}</th>{''.join(cells)}</tr>")
    title = html.escape(manifest.get("story", {}).get("title", "Story-Iter"))
    status = html.escape(str(manifest.get("status", "")))
    doc = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
table {{ border-collapse: collapse; }}
th, td {{ padding: 2px; border: 1px solid #ddd; text-align: center; font-size: 11px; }}
th:first-child {{ position: sticky; left: 0; background: #fff; min-width: 6em; }}
td.missing {{ background: #f4f4f4; width: {thumb}px; height: {thumb}px; }}
img {{ display: block; image-rendering: auto; }}
</style></head><body>
<h1>{title}</h1>
<p>{n_frames} frames x {n_rounds} rounds ({html.escape(cfg['backbone'])}, {cfg['steps']} steps,
guidance {cfg['guidance']}, seed {cfg['seed']}). Status: {status}.
Hover a thumbnail for its prompt; <a href="manifest.json">manifest.json</a>.</p>
{world_metrics_html(out, manifest)}
<div style="overflow-x: auto"><table>
{chr(10).join(rows)}
</table></div>
<p><small>written {time.strftime('%Y-%m-%d %H:%M:%S')}</small></p>
</body></html>
"""
    atomic_write_bytes(out / "index.html", doc.encode())
