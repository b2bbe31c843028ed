"""An upcycled transformers model's `save_pretrained` moved to runtime/pretrained.py: the subclass
it installs is held by every upcycled model, and a trained model needs only the runtime. These
names stay importable here so that pickles of models made before the move still load."""

from upcycle.runtime.pretrained import _unpickle_upcycled, _UpcycledMixin, is_transformers_model, mark_upcycled  # noqa: F401
