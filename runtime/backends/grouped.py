"""grouped: slots sorted by expert, one custom op per direction (runtime/grouped.py), with the
strategies `loop` (CPU default), `grouped_mm` (torch._grouped_mm, CUDA) and `padded` (bmm)."""

from . import Backend


def _load():
    from ..grouped import grouped_forward

    return grouped_forward


ENTRY = Backend(name="grouped", summary="slots sorted by expert, grouped GEMMs (auto's choice)", load=_load, order=1)
