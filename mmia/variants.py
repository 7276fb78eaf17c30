"""Models derived from the target, embedded into the cache like any model: each has its own
fingerprint (derived from the target's, so a warm run never builds anything) and `get()`
builds it from the target only when something must be embedded.

- `DropoutPass` (attack mcd): the target with dropout p on its attention weights, one
  stochastic forward pass. Pass j of P has its own fingerprint; its dropout masks are seeded by
  the pass and the padded batch's content, so a rerun over the same batches repeats them (other
  batch sizes, a partly filled cache or another torchrun share draw other masks: each is an
  equally valid draw of the same pass, but not the same numbers).
- `WhiteboxNorms` (attacks loss, grad): per image and per caption, the ratio ‖h‖ / ‖u‖ of the
  projection layer's input h to its output u = W h (what turns the gradient of a loss with
  respect to the normalised feature into its gradient with respect to W), and the model's
  logit scale, as a 2-column "feature": the white-box attacks need nothing else beyond the
  normalised features already cached.

Nothing here imports torch until a variant is built.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
from collections.abc import Iterator

import numpy as np

from mmia.errors import MmiaError
from mmia.modelref import built_model, make_fingerprint

VARIANT_VERSION = 2  # bump when a variant computes something else (2: forked, strided seeding)
MCD_DROPOUT = 0.05  # Gomez's recipe: p = 0.05 on attention dropout, 10 passes
MCD_PASSES = 10


class ModelVariant:
    """A model computed from `base` (a LoadedModel or anything with `.fingerprint`,
    `.description` and `.get()`); the `LoadedModel` interface of `mmia.embed.embed_shards`."""

    kind = "variant"

    def __init__(self, base, **params) -> None:
        self.base, self.params = base, params

    @property
    def fingerprint(self) -> str:
        return make_fingerprint({"base": self.base.fingerprint, "variant": self.kind,
                                 "version": VARIANT_VERSION, **self.params})

    @property
    def description(self) -> dict:
        return {**self.base.description, "variant": {"kind": self.kind, **self.params}}

    def base_model(self):
        return built_model(self.base)

    def get(self):
        raise NotImplementedError


class DropoutPass(ModelVariant):
    """One MC-dropout pass of the target: attention dropout `p` on at inference."""

    kind = "mc_dropout"

    def __init__(self, base, p: float = MCD_DROPOUT, index: int = 0, shared: dict | None = None):
        super().__init__(base, p=p, index=index)
        self._shared = {} if shared is None else shared  # one dropout copy for all passes

    def get(self):
        loaded = self.base_model()
        key = (id(loaded.model), self.params["p"])
        if key not in self._shared:
            self._shared.clear()
            self._shared[key] = with_attention_dropout(loaded.model, self.params["p"])
        return dataclasses.replace(
            loaded, model=self._shared[key], fingerprint=self.fingerprint,
            description=self.description, forward_seed=self.params["index"])


def dropout_passes(base, passes: int = MCD_PASSES, p: float = MCD_DROPOUT) -> list[DropoutPass]:
    """The P passes of MC dropout over `base`, sharing one dropout-enabled copy of it."""
    shared: dict = {}
    return [DropoutPass(base, p, i, shared) for i in range(passes)]


def with_attention_dropout(model, p: float):
    """A copy of `model` in eval mode but for dropout `p` on the attention weights of every
    attention layer: torch's nn.MultiheadAttention (open_clip's default blocks) and modules
    with an `attn_drop` dropout (open_clip's and timm's own attention)."""
    import torch

    model = copy.deepcopy(model).eval()
    layers = 0
    for module in model.modules():
        if isinstance(module, torch.nn.MultiheadAttention):
            module.dropout = p
        elif isinstance(getattr(module, "attn_drop", None), torch.nn.Dropout):
            module.attn_drop.p = p
            module.attn_drop.training = True
        else:
            continue
        module.training = True  # this module alone: its other parts have no training mode
        layers += 1
    if not layers:
        raise MmiaError("mcd: the model has no attention layer whose dropout can be enabled "
                        "(nn.MultiheadAttention, or a module with an attn_drop dropout)")
    return model


HASHED_VALUES = 1 << 16  # at most this many evenly spaced input values seed a pass


def batch_seed(batch, seed: int) -> int:
    """A seed for one forward pass from the batch's content (a strided sample of its values:
    cheap for any batch size) and the pass's own seed."""
    flat = batch.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // HASHED_VALUES)].cpu().contiguous().numpy()
    digest = hashlib.blake2b(sample.tobytes(), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") >> 1


@contextlib.contextmanager
def seeded(batch, seed: int | None, device) -> Iterator[None]:
    """Run a stochastic pass under a seed from its batch, restoring the random state after
    (nothing else in the process sees its draws); nothing at all for seed None."""
    if seed is None:
        yield
        return
    import torch

    devices = [device] if getattr(device, "type", "cpu") == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(batch_seed(batch, seed))
        yield


class WhiteboxNorms(ModelVariant):
    """Per input, [‖h‖ / ‖u‖, logit scale] of the target's projection layer (see module)."""

    kind = "whitebox_norms"

    def __init__(self, base) -> None:
        super().__init__(base)

    def get(self):
        loaded = self.base_model()
        return dataclasses.replace(loaded, model=ProjectionNorms(loaded.model),
                                   fingerprint=self.fingerprint, description=self.description)


class ProjectionNorms:
    """encode_image / encode_text returning (n, 2): ‖h‖/‖u‖ of the projection and the
    logit scale, for an open_clip CLIP (visual.proj; text_projection on the model or its
    text tower, a matrix or an nn.Linear)."""

    def __init__(self, model) -> None:
        self.model = model
        self.text_owner = model if hasattr(model, "text_projection") else \
            getattr(model, "text", None)
        visual = getattr(model, "visual", None)
        if getattr(visual, "proj", None) is None or \
                getattr(self.text_owner, "text_projection", None) is None:
            raise MmiaError("loss/grad: the model has no visual.proj and text_projection "
                            "(an open_clip CLIP with projection layers is needed)")

    def encode_image(self, images, normalize: bool = True):
        visual = self.model.visual
        with _without(visual, "proj") as proj:
            h = visual(images)
        return self._ratios(h, proj)

    def encode_text(self, tokens, normalize: bool = True):
        encode = self.model.encode_text if self.text_owner is self.model else self.text_owner
        with _without(self.text_owner, "text_projection") as proj:
            h = encode(tokens)
        return self._ratios(h, proj)

    def _ratios(self, h, proj):
        """[‖h‖/‖u‖, logit scale] per row, in float32 whatever the model's precision."""
        import torch

        with torch.autocast(h.device.type, enabled=False):
            h = h.float()
            if isinstance(proj, torch.nn.Linear):
                bias = None if proj.bias is None else proj.bias.float()
                u = torch.nn.functional.linear(h, proj.weight.float(), bias)
            else:
                u = h @ proj.float()
            ratio = h.norm(dim=-1) / u.norm(dim=-1).clamp_min(1e-12)
            scale = self.model.logit_scale.float().exp().expand_as(ratio)
            return torch.stack([ratio, scale], dim=-1)


@contextlib.contextmanager
def _without(owner, name: str) -> Iterator[object]:
    """Temporarily remove `owner.<name>` (its forward then skips it); yields it."""
    value = getattr(owner, name)
    setattr(owner, name, None)
    try:
        yield value
    finally:
        setattr(owner, name, value)


def whitebox_features(norms_image: np.ndarray, norms_text: np.ndarray) -> np.ndarray:
    """(n, 3) [image ‖h‖/‖u‖, text ‖h‖/‖u‖, logit scale] from the two cached stores."""
    return np.c_[norms_image[:, 0], norms_text[:, 0], norms_image[:, 1]].astype(np.float32)
