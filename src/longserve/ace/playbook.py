"""An ACE playbook: itemized strategies with ids and helpful/harmful counters, grown by delta updates.

The curator (a model) only *proposes* operations; `Playbook.apply` merges them deterministically:
`add` (de-duplicated against what is there, by normalized text or embedding similarity), `update`,
`remove` and `tag` (helpful/harmful). Rewriting the whole context each step is what causes brevity bias
and context collapse (Zhang et al., 2025); deltas keep every earlier lesson unless one is removed.
Saved as JSON with an atomic replace; a corrupt file is reported, never overwritten.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from longserve.errors import LongserveError

FORMAT = "longserve-playbook/1"
Embed = Callable[[list[str]], torch.Tensor]


class PlaybookError(LongserveError):
    """A playbook file that cannot be read; it is left as it is."""


@dataclass
class Bullet:
    id: str
    section: str
    content: str
    helpful: int = 0
    harmful: int = 0


@dataclass
class Playbook:
    bullets: list[Bullet] = field(default_factory=list)
    version: int = 0  # bumped by every apply() that changed something
    next_id: int = 1

    def get(self, bullet_id: str) -> Bullet | None:
        return next((b for b in self.bullets if b.id == bullet_id), None)

    def render(self) -> str:
        """The playbook as prompt text, grouped by section; each bullet shows its id and counters."""
        if not self.bullets:
            return "(empty playbook)"
        out, sections = [], dict.fromkeys(b.section for b in self.bullets)
        for section in sections:
            out.append(f"## {section}")
            out += [
                f"[{b.id}] (helpful={b.helpful}, harmful={b.harmful}) {b.content}"
                for b in self.bullets
                if b.section == section
            ]
        return "\n".join(out)

    # ---- delta updates -------------------------------------------------------------------------
    def apply(self, ops: list[dict], embed: Embed | None = None, threshold: float = 0.92) -> list[str]:
        """Merge the curator's operations in order; returns one line per operation saying what it did
        (invalid operations are skipped and reported, never guessed at)."""
        log, changed = [], False
        for op in ops:
            kind = op.get("op") if isinstance(op, dict) else None
            bullet = self.get(str(op.get("id", ""))) if isinstance(op, dict) else None
            content = str(op.get("content", "")).strip() if isinstance(op, dict) else ""
            if kind == "add" and content:
                twin = self.find_duplicate(content, embed, threshold)
                if twin is not None:
                    twin.helpful += 1
                    log.append(f"add: duplicate of {twin.id}, counted as helpful")
                else:
                    new = Bullet(f"b{self.next_id}", str(op.get("section") or "strategies"), content)
                    self.bullets.append(new)
                    self.next_id += 1
                    log.append(f"add: {new.id}")
                changed = True
            elif kind == "update" and bullet is not None and content:
                bullet.content = content
                log.append(f"update: {bullet.id}")
                changed = True
            elif kind == "remove" and bullet is not None:
                self.bullets.remove(bullet)
                log.append(f"remove: {bullet.id}")
                changed = True
            elif kind == "tag" and bullet is not None and op.get("tag") in ("helpful", "harmful"):
                setattr(bullet, op["tag"], getattr(bullet, op["tag"]) + 1)
                log.append(f"tag: {bullet.id} {op['tag']}")
                changed = True
            else:
                log.append(f"skipped invalid operation {json.dumps(op)[:120]}")
        if changed:
            self.version += 1
        return log

    def find_duplicate(self, content: str, embed: Embed | None, threshold: float) -> Bullet | None:
        key = _normal(content)
        for b in self.bullets:
            if _normal(b.content) == key:
                return b
        if embed is None or not self.bullets:
            return None
        vectors = embed([content] + [b.content for b in self.bullets])
        similarity = vectors[1:] @ vectors[0]
        best = int(similarity.argmax())
        return self.bullets[best] if float(similarity[best]) >= threshold else None

    # ---- disk ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Atomic: a crash mid-write leaves the previous file intact."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": FORMAT, "version": self.version, "next_id": self.next_id}
        data["bullets"] = [asdict(b) for b in self.bullets]
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, ensure_ascii=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> Playbook:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} file")
            bullets = [Bullet(**b) for b in data["bullets"]]
            return cls(bullets, int(data["version"]), int(data["next_id"]))
        except FileNotFoundError:
            raise PlaybookError(f"playbook not found: {path}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PlaybookError(
                f"corrupt playbook {path}: {exc}; fix or delete it (it was not changed)"
            ) from None


def _normal(text: str) -> str:
    return re.sub(r"\W+", " ", text.casefold()).strip()


def parse_operations(text: str) -> list[dict] | None:
    """The curator's operations: the first JSON list (or {"operations": [...]}) in its output; None
    when there is none (an explicit `[]` means "nothing new")."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[\[{]", text):
        try:
            value, _ = decoder.raw_decode(text[match.start() :])
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            value = value.get("operations", [value] if "op" in value else None)
        if isinstance(value, list) and all(isinstance(v, dict) for v in value):
            return value
    return None
