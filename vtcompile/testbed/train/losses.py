"""The training losses besides the answer cross-entropy: linear probes on the vision features (phases 1-2) and
the grounding loss on the decoder's attention (phase 2). Training aids only: nothing here is saved."""

from __future__ import annotations

from .. import build, scenes


class PatchHeads:
    """Linear probes on the selected vision features: colour / shape of the object under each patch
    (0 = background), whether the patch is an object's first patch (one per object), and the patch's row and
    column (classes of the grid plus the scaled row and column as numbers, object patches weighted
    ``OBJECT_WEIGHT`` x: an object's content must not wash out where it is, which relative-position questions
    need); in phase 2 also a readout of the answer position's mid-decoder state (``readout_loss``)."""

    OBJECT_WEIGHT = 4.0

    def __init__(self, width: int):
        import torch

        self.grid = build.IMAGE_SIZE // build.PATCH_SIZE
        self.color = torch.nn.Linear(width, len(scenes.COLOR_NAMES) + 1)
        self.shape = torch.nn.Linear(width, len(scenes.SHAPES) + 1)
        self.anchor = torch.nn.Linear(width, 2)
        self.where = torch.nn.Linear(width, 2 * self.grid + 2)
        self.readout = torch.nn.Linear(width, 2)

    def named_parameters(self):
        for name in ("color", "shape", "anchor", "where", "readout"):
            for n, p in getattr(self, name).named_parameters():
                yield f"aux_{name}.{n}", p

    @staticmethod
    def targets(objects):
        """The probes' per-patch targets of one scene: (colour classes, shape classes, anchor patches)."""
        colors, shapes = scenes.patch_labels(objects, build.PATCH_SIZE)
        anchor = scenes.patch_anchors(objects, build.PATCH_SIZE)
        return colors, shapes, anchor[anchor >= 0]

    def readout_loss(self, hidden, target):
        """Relative-position readout from the answer position's mid-decoder state (MSE on the relative-position
        questions): pushes the two objects' positions through the attention values."""
        err = ((self.readout(hidden) - target[:, :2]) ** 2).sum(-1) * target[:, 2]
        return err.sum() / target[:, 2].sum().clamp_min(1.0)

    def loss(self, feats, targets):
        """Sum of the patch probes' losses on ``feats`` [B, N, D] against ``targets`` (one ``targets()`` per row)."""
        import numpy as np
        import torch

        ce = torch.nn.functional.cross_entropy
        B, N, _ = feats.shape
        col = torch.from_numpy(np.stack([t[0] for t in targets])).flatten()
        shp = torch.from_numpy(np.stack([t[1] for t in targets])).flatten()
        anc = torch.zeros(B, N, dtype=torch.long)
        for b, t in enumerate(targets):
            anc[b, torch.from_numpy(t[2])] = 1
        f = feats.flatten(0, 1)
        idx = torch.arange(N).repeat(B)
        w = 1.0 + (self.OBJECT_WEIGHT - 1.0) * (col > 0).float()
        logits = self.where(f)
        g = self.grid
        rc = torch.stack([idx // g, idx % g], -1)
        where = (ce(logits[:, :g], rc[:, 0], reduction="none") + ce(logits[:, g:2 * g], rc[:, 1], reduction="none")
                 + 4.0 * ((logits[:, 2 * g:] - (rc.float() / (g - 1) * 2 - 1)) ** 2).sum(-1))
        return ce(self.color(f), col) + ce(self.shape(f), shp) + ce(self.anchor(f), anc.flatten()) \
            + (w * where).sum() / w.sum()


def attention_loss(attentions, layers, ids, image_id, positions, targets, sink):
    """Grounding loss: layer 0 - the answer position reads its question: -log(share of its attention, mean
    over each half of the heads, on that half's words: the two named objects of a relative-position question,
    the whole question otherwise); the layers in ``layers`` - it looks at the evidence: -log(share of its
    visual attention, mean over each half of the heads, on that half's evidence tokens), except on counts
    (``sink`` [Q, 2]: per half): cross-entropy to the uniform distribution over that half's sink and one token
    per counted object, so the sink's share of that attention is 1 / (count + 1) (first half, BOS) or
    n / (count + n) (second half, with an n-token sink). Mean of the terms."""
    import torch

    b_idx, p_idx = positions[:, 0], positions[:, 1]
    v = (ids == image_id)[b_idx]  # [Q, S]
    att0 = attentions[0][b_idx, :, p_idx, :]
    half = att0.shape[1] // 2
    terms = [-torch.log((heads.mean(1) * targets[:, 2 + g]).sum(-1) + 1e-6).mean()
             for g, heads in enumerate((att0[:, :half], att0[:, half:]))]
    for layer in layers:
        att = attentions[layer][b_idx, :, p_idx, :]  # [Q, H, S]
        half = att.shape[1] // 2
        for g, heads in enumerate((att[:, :half], att[:, half:])):
            a = heads.mean(1)
            mass_v = (a * v).sum(-1)
            mass_e = (a * targets[:, g]).sum(-1)
            share = -torch.log(mass_e / mass_v.clamp_min(1e-9) + 1e-6)
            uniform = -(targets[:, g] * torch.log(a + 1e-6)).sum(-1) / targets[:, g].sum(-1).clamp_min(1.0)
            terms.append(torch.where(sink[:, g], uniform, share).mean())
    return sum(terms) / len(terms)
