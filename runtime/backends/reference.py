"""reference: a loop over experts with torch.where (runtime/experts.py), the ground truth every
other backend is tested against."""

from . import Backend


def _load():
    from ..experts import reference_forward

    return reference_forward


ENTRY = Backend(name="reference", summary="loop over experts (the ground truth)", load=_load, order=0)
