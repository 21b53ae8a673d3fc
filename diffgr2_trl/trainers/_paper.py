"""The paper the trainers implement, in TRL's ``_paper`` form (read by ``create_model_card``)."""

from __future__ import annotations

import textwrap

DIFFUSION_GR2_PAPER = {
    "title": "Diffusion-GR2",
    "id": "2607.01170",
    # docstyle-ignore
    "citation": textwrap.dedent("""\
        @article{diffusion_gr2,
            title        = {{Diffusion-GR2}},
            year         = 2026,
            eprint       = {arXiv:2607.01170},
        }"""),
}
