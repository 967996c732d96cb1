"""The HF target adapter, the draft heads and the embedded default model.

Both draft-head formats are defined on import, so each has registered with the one loader
(``head_loader.load_draft_head``, behind every ``from_pretrained``) whichever head module a
caller imports first."""

from eagle2_kernels.models import draft_head, eagle3_head  # noqa: F401  (registers both head formats)
