"""The table of eval tasks: name -> sample generator, and the named sets the command line expands.

Kept apart from the generators so that `synthetic` and `code_debug` never import each other, and
`suite`/`cli` see one registry.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from longserve.errors import InvalidParameterError
from longserve.eval.code_debug import code_debug
from longserve.eval.natural import natural_multikey, natural_multivalue, natural_prose, natural_single
from longserve.eval.niah import niah_multikey, niah_multiquery, niah_multivalue, niah_single
from longserve.eval.sample import Sample
from longserve.eval.specs import split_list
from longserve.eval.synthetic import cwe, fwe, passkey, vt

Generator = Callable[..., Sample]

TASKS: dict[str, Generator] = {
    "niah_single": niah_single,
    "niah_single_1": partial(niah_single, value_type="number"),
    "niah_single_2": partial(niah_single, value_type="word"),
    "niah_single_3": partial(niah_single, value_type="uuid"),
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "vt": vt,
    "cwe": cwe,
    "fwe": fwe,
    "passkey": passkey,
    "code_debug": code_debug,
    "natural_single": natural_single,
    "natural_multikey": natural_multikey,
    "natural_multivalue": natural_multivalue,
    "natural_prose": natural_prose,
}
#: Tasks whose single needle is placed at evenly spaced depths across a suite's samples.
DEPTH_SWEPT = {
    "niah_single",
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "passkey",
    "natural_single",
    "natural_prose",
}
#: The natural-text needle suite (`natural`): real prose haystacks instead of repeated filler.
NATURAL = ("natural_single", "natural_multikey", "natural_multivalue", "natural_prose")


#: RULER's synthetic categories as implemented here (its qa_1/qa_2 need SQuAD/HotpotQA: use --longbench).
RULER = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
)


def parse_tasks(text: str) -> list[str]:
    """Comma list of task names; `ruler` expands to the RULER set, `natural` to the natural-text needle
    suite and `all` to every synthetic task."""
    sets = {"ruler": RULER, "natural": NATURAL, "all": tuple(TASKS)}
    tasks: list[str] = []
    for name in split_list(text):
        expanded = sets.get(name, (name,))
        tasks += [t for t in expanded if t not in tasks]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise InvalidParameterError(
            f"unknown task(s) {', '.join(unknown)}; known: ruler, natural, all, {', '.join(TASKS)}"
        )
    return tasks
